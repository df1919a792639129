"""The lr check before step 1: a warning against the linear-scaling rule, and --auto-scale-lr."""

import pytest
import yaml

import train
from helpers import assert_names, records, tiny_config

pytestmark = pytest.mark.slow  # references/train.py end to end


def test_lr_check_before_step_one_and_auto_scale(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1, lr=0.02, warmup_iters=0)
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    out = capsys.readouterr().out
    warning = next(x for x in out.splitlines() if x.startswith("WARNING: lr 0.02"))
    assert_names(warning, "8.0x", "linear-scaling", "2 images per step", "0.0025")
    assert out.index(warning) < out.index("epoch 0 [")  # before step one
    assert records(tmp_path / "out", "lr_check")[0]["linear_scaling_lr"] == 0.0025
    assert train.main(["--config", cfg, "--no-data-report", "--auto-scale-lr", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert_names(out, "lr 0.02", "16 images per step", "2 per step", "-> lr 0.0025")
    assert "WARNING: lr" not in out
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["training"]["lr"] == 0.0025
