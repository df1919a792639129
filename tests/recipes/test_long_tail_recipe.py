"""The recipe's long-tail classifiers: model.roi_head.cls_loss through --print-config, the federated loss's
image counts resolved from the training set (and kept on --resume), Seesaw / EQLv2 statistics in the
checkpoint and restored by --resume."""

import json

import pytest
import torch
import yaml

import train
import train_config
from data import image_classes
from helpers import TINY_SHAPES, assert_names, raises_naming, records, tiny_config
from shapes import ShapesSpec, ensure_shapes


def _config(tmp_path, data_root, roi, **training):
    path = tiny_config(tmp_path, data_root, iters_per_epoch=1, **training)
    cfg = yaml.safe_load(open(path))
    cfg["model"]["roi_head"] = roi
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def ckpt_settings(run_dir):
    return torch.load(run_dir / "checkpoint.pth", weights_only=True)["model_settings"]


def _image_counts(data_root):
    """Training images per class of the tiny shapes set, counted here from the file itself."""
    with open(ensure_shapes(data_root, ShapesSpec(**TINY_SHAPES))["train_ann"]) as f:
        data = json.load(f)
    classes = image_classes(data["annotations"], [im["id"] for im in data["images"]])
    return [sum(1 for cs in classes if c in cs) for c in (1, 2, 3, 4)]


@pytest.mark.parametrize("name", ["sigmoid", "federated", "seesaw", "eqlv2"])
def test_print_config_shows_each_loss(tmp_path, data_root, capsys, name):
    cfg = _config(tmp_path, data_root, {"cls_loss": name})
    assert train.main(["--config", cfg, "--print-config"]) == 0
    roi = yaml.safe_load(capsys.readouterr().out)["model"]["roi_head"]
    assert roi["cls_loss"] == name
    assert roi["fed_image_counts"] == ("auto" if name == "federated" else None)


def test_loss_key_of_another_loss_is_refused_in_one_line(tmp_path, data_root):
    cfg = _config(tmp_path, data_root, {"cls_loss": "sigmoid", "seesaw_p": 0.5})
    with raises_naming(train_config.ConfigError, "model.roi_head.seesaw_p", "(0.5)", "'sigmoid'"):
        train.main(["--config", cfg, "--print-config"])


@pytest.mark.slow
def test_federated_counts_are_resolved_saved_and_kept_on_resume(tmp_path, data_root, capsys):
    cfg = _config(tmp_path, data_root, {"cls_loss": "federated", "fed_num_classes": 3})
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    counts, run_dir = _image_counts(data_root), tmp_path / "out"
    out = capsys.readouterr().out
    assert_names(next(x for x in out.splitlines() if "fed_image_counts: auto" in x), f"-> {counts}", "training images")
    assert_names(out, "box_score_thresh 0.0001", "box_detections_per_img 300", "LVIS")
    assert ckpt_settings(run_dir)["box_score_thresh"] == 1e-4
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert ckpt["model_settings"]["loss_cfg"]["roi_head"]["fed_image_counts"] == counts
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["roi_head"]["fed_image_counts"] == counts
    args = ["--config", cfg, "--no-data-report", "--epochs", "2", "--resume", str(run_dir / "checkpoint.pth")]
    assert train.main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "fed_image_counts: auto" in x)
    assert_names(line, "--resume", "checkpoint", counts)
    assert [r["from"] for r in records(run_dir, "fed_image_counts")] == ["training data", "checkpoint"]


@pytest.mark.slow
@pytest.mark.parametrize("name,key", [("seesaw", "cum_samples"), ("eqlv2", "pos_grad")])
def test_running_statistics_are_checkpointed_and_resumed(tmp_path, data_root, capsys, name, key):
    cfg = _config(tmp_path, data_root, {"cls_loss": name, "cosine_classifier": True})
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    out, run_dir = capsys.readouterr().out, tmp_path / "out"
    assert "NormedLinear" in out  # the replaced classifier is named
    first = torch.load(run_dir / "checkpoint.pth", weights_only=True)["model"][f"roi_heads.cls_criterion.{key}"]
    assert first.sum() > 0
    args = ["--config", cfg, "--no-data-report", "--epochs", "2", "--resume", str(run_dir / "checkpoint.pth")]
    assert train.main(args) == 0
    second = torch.load(run_dir / "checkpoint.pth", weights_only=True)["model"][f"roi_heads.cls_criterion.{key}"]
    assert (second >= first).all() and second.sum() > first.sum()  # accumulated on top of the resumed values
