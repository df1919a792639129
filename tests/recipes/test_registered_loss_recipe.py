"""A classification loss registered by the user's script (tv_lossfix.cls_losses.register, before
train.cli) trains through references/train.py: the config takes its name and parameter, the run says
the loss it uses, and config.yaml records both, so --resume rebuilds the same model."""

import pytest
import torch.nn.functional as F
import yaml

from tv_lossfix import cls_losses as C

import train
from helpers import records, tiny_config


def poly1(logits, labels, params):
    p_t = F.softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    return F.cross_entropy(logits, labels, reduction="none") + params["poly_epsilon"] * (1 - p_t)


def with_roi_head(path, roi_head):
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["roi_head"] = roi_head
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.fixture
def registered():
    C.register(C.ClsLoss("poly1", "roi_head", per_sample=poly1, params={"poly_epsilon": C.Param(1.0)}))
    yield
    C.unregister("roi_head", "poly1")


@pytest.mark.slow
def test_a_loss_registered_before_train_cli_trains_and_is_recorded(tmp_path, data_root, registered, capsys):
    cfg = with_roi_head(tiny_config(tmp_path, data_root), {"cls_loss": "poly1", "poly_epsilon": 2.0})
    assert train.cli(["--config", cfg, "--no-data-report"]) == 0
    out = capsys.readouterr().out
    assert "poly1" in out and "poly_epsilon" in out
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    head = saved["model"]["roi_head"]  # the complete section, every default written out
    assert (head["cls_loss"], head["poly_epsilon"]) == ("poly1", 2.0)
    assert records(tmp_path / "out", "eval")


def test_the_config_refuses_its_parameter_once_the_loss_is_not_chosen(tmp_path, data_root, registered, capsys):
    cfg = with_roi_head(tiny_config(tmp_path, data_root), {"poly_epsilon": 2.0})
    assert train.cli(["--config", cfg, "--print-config"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "roi_head.poly_epsilon" in err
