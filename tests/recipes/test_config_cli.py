"""references/config_cli.py: defaults < --config YAML < flags, and every bad key or value of the YAML
file refused in one line naming it (torchvision's own command lines: test_cli_matches_torchvision_script.py)."""

import pytest

import train_config
from helpers import raises_naming, tiny_config


def test_yaml_then_flags_precedence(tmp_path, data_root):
    cfg_path = tiny_config(tmp_path, data_root, lr=0.05)
    cfg, loss, _ = train_config.resolve(
        ["--config", cfg_path, "--lr", "0.5", "-b", "3", "--loss-preset", "mmdetection"]
    )
    assert cfg.training.lr == 0.5 and cfg.training.batch_size == 3  # flags win
    assert cfg.training.epochs == 1  # from the YAML
    assert cfg.training.momentum == 0.9  # built-in default (torchvision's)
    assert loss.rpn_head.bbox_loss == "l1"
    cfg, _, _ = train_config.resolve([])  # torchvision's defaults
    assert (cfg.training.lr, cfg.training.epochs, cfg.training.lr_steps, cfg.model.name) == (
        0.02,
        26,
        [16, 22],
        "maskrcnn_resnet50_fpn",
    )
    assert cfg.data.data_path == train_config.TORCHVISION_COCO_PATH
    assert cfg.data.bad_annotations == "drop"  # COCO 2017 has degenerate boxes; reported, not fatal
    cfg, _, _ = train_config.resolve(["--config", cfg_path])
    assert cfg.data.bad_annotations == "stop"  # your own data: stop and list the problems


# each error names the key (and its flag), the bad value or the rule, and the key meant
@pytest.mark.parametrize(
    "yaml_text,names",
    [
        ("training:\n  lrr: 0.1\n", ["'training.lrr'", "'training.lr'"]),
        ("trainning:\n  lr: 0.1\n", ["'trainning'", "'training'"]),
        ("training:\n  gradient_clip:\n    max_nrom: 1\n",
         ["'training.gradient_clip.max_nrom'", "'training.gradient_clip.max_norm'"]),
        ("training:\n  lr: fast\n", ["training.lr", "--lr", "number"]),
        ("training:\n  batch_size: 0\n", ["training.batch_size", "-b", ">= 1"]),
        ("training:\n  nan_policy: ignore\n", ["training.nan_policy", "--nan-policy", "stop, skip", "'ignore'"]),
        ("model:\n  roi_head:\n    cls_pos_weight: -2\n", ["model.roi_head.cls_pos_weight", "> 0"]),
        ("model:\n  roi_head:\n    clss_pos_weight: 2\n",
         ["'model.roi_head.clss_pos_weight'", "'model.roi_head.cls_pos_weight'"]),
        ("data:\n  dataset: coco_json\n",
         ["--dataset coco_json", "--train-ann", "--train-images", "--val-ann", "--val-images"]),
        ("data:\n  shapes:\n    num_trian: 3\n", ["'data.shapes.num_trian'", "'data.shapes.num_train'"]),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path, yaml_text, names):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with raises_naming(train_config.ConfigError, *names):
        train_config.resolve(["--config", str(p)])


def test_guide_config_schema_is_accepted(tmp_path):
    p = tmp_path / "guide.yaml"
    p.write_text(
        "model:\n  rpn_head:\n    cls_pos_weight: 1.0\n    loss_cls_weight: 1.0\n    loss_bbox_weight: 1.0\n"
        "  roi_head:\n    cls_pos_weight: 2.0\n    loss_cls_weight: 1.0\n    loss_bbox_weight: 1.0\n"
        "    loss_mask_weight: 1.0\n"
        "training:\n  gradient_clip:\n    enabled: true\n    max_norm: 35.0\n    norm_type: 2\n"
    )
    cfg, loss, _ = train_config.resolve(["--config", str(p)])
    assert loss.roi_head.cls_pos_weight == 2.0 and cfg.training.gradient_clip.enabled
    cfg, _, _ = train_config.resolve(["--config", str(p), "--clip-grad-norm", "0"])
    assert not cfg.training.gradient_clip.enabled
