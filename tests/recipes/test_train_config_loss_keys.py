"""references/train_config.py reads the loss keys of a training YAML exactly as the library's
LossConfig.from_yaml does: one loader, the same errors."""

from tv_lossfix import LossConfig, LossConfigError

import train_config
from helpers import raises_naming


def test_training_config_loss_keys_read_one_way(tmp_path):
    text = "model:\n  name: maskrcnn_tiny\n  loss_preset: mmdetection\n  roi_head:\n    cls_pos_weight: 2\n"
    p = tmp_path / "train.yaml"
    p.write_text(text + "training:\n  lr: 1e-3\n")
    lib = LossConfig.from_yaml(p)
    assert lib.rpn_head.bbox_loss == "l1" and lib.rpn_head.cls_avg_factor == "sampled_per_image"
    assert lib.roi_head.cls_pos_weight == 2.0 and lib.roi_head.bbox_loss == "l1"
    assert train_config.resolve(["--config", str(p)])[1] == lib  # the training script reads the same
    p.write_text("model:\n  roi_heads:\n    cls_pos_weight: 2\n")
    with raises_naming(LossConfigError, "'model.roi_heads'", "'model.roi_head'"):
        LossConfig.from_yaml(p)
    with raises_naming(train_config.ConfigError, "'model.roi_heads'", "'model.roi_head'"):
        train_config.resolve(["--config", str(p)])
    p.write_text("model:\n  preset: positive\n  loss_preset: mmdetection\n")
    with raises_naming(LossConfigError, "model.loss_preset", "model.preset"):
        LossConfig.from_yaml(p)
    p.write_text("rpn_head:\n  loss_cls_weight: 1e-1\n  loss_cls_weight: 2\n")
    with raises_naming(LossConfigError, "'loss_cls_weight'", "twice", "lines 2 and 3"):
        LossConfig.from_yaml(p)


def test_the_library_reads_every_recipe_model_key_and_the_recipe_refuses_a_misspelt_one(tmp_path):
    """tv_lossfix lists only its loss keys; the recipe's other model: keys pass through the library's reader
    (none reads as a misspelt loss key) and the recipe's schema refuses a key it does not have."""
    from tv_lossfix.config import MODEL_LOSS_KEYS

    others = sorted(train_config.SECTIONS["model"] - set(MODEL_LOSS_KEYS))
    assert "name" in others and "class_agnostic_bbox" in others
    p = tmp_path / "train.yaml"
    p.write_text("model:\n" + "".join(f"  {k}: null\n" for k in others) + "  roi_head:\n    cls_pos_weight: 2\n")
    assert LossConfig.from_yaml(p).roi_head.cls_pos_weight == 2.0
    p.write_text("model:\n  nmae: maskrcnn_tiny\n")
    assert LossConfig.from_yaml(p) == LossConfig()  # not a loss key: the training script's to check
    with raises_naming(train_config.ConfigError, "'model.nmae'", "'model.name'"):
        train_config.resolve(["--config", str(p)])
