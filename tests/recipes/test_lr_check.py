"""The lr check before step 1: a warning against the linear-scaling rule, and --auto-scale-lr."""

import pytest
import yaml

import train
from helpers import records, tiny_config

pytestmark = pytest.mark.slow  # references/train.py end to end


def test_lr_check_before_step_one_and_auto_scale(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1, lr=0.02, warmup_iters=0)
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    out = capsys.readouterr().out
    warning = "WARNING: lr 0.02 is 8.0x the linear-scaling rule for 2 images per step"
    assert warning in out and out.index(warning) < out.index("epoch 0 [")
    assert records(tmp_path / "out", "lr_check")[0]["linear_scaling_lr"] == 0.0025
    assert train.main(["--config", cfg, "--no-data-report", "--auto-scale-lr", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "lr 0.02 is for 16 images per step; 2 per step here -> lr 0.0025" in out and "WARNING: lr" not in out
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["training"]["lr"] == 0.0025
