import dataclasses
import math

import pytest

from tv_lossfix import LossConfig, LossConfigError, RoILossConfig


def test_defaults_are_torchvision():
    cfg = LossConfig()
    assert cfg.is_default() and LossConfig.preset("torchvision") == cfg
    assert cfg.rpn_head.smooth_l1_beta == pytest.approx(1 / 9)
    assert cfg.roi_head.bbox_avg_factor == "sampled" and not cfg.sync_avg_factor


def test_from_dict_bare_and_full_training_config():
    bare = LossConfig.from_dict({"roi_head": {"cls_pos_weight": 2}})
    full = LossConfig.from_dict({"model": {"roi_head": {"cls_pos_weight": 2}, "name": "x"}, "training": {"lr": 1}})
    assert bare == full and bare.roi_head.cls_pos_weight == 2.0


@pytest.mark.parametrize(
    "key, meant",
    [
        ("roi_heads", "roi_head"),
        ("rpn-head", "rpn_head"),
        ("loss_presets", "loss_preset"),
        ("sync_avg_factr", "sync_avg_factor"),
    ],
)
def test_a_misspelt_loss_key_of_a_training_config_is_refused_naming_it(key, meant):
    """Under model: the library reads its loss keys; a key that reads as one of them misspelt is refused
    (another key, such as the architecture's name, is the training script's)."""
    with pytest.raises(LossConfigError, match=f"'model.{key}'; did you mean 'model.{meant}'"):
        LossConfig.from_dict({"model": {key: {}, "name": "x"}})


def test_yaml_bare_and_guide_schema(tmp_path):
    bare = tmp_path / "loss.yaml"
    bare.write_text("rpn_head:\n  cls_pos_weight: 2.0\nsync_avg_factor: true\n")
    cfg = LossConfig.from_yaml(bare)
    assert cfg.rpn_head.cls_pos_weight == 2.0 and cfg.sync_avg_factor
    guide = tmp_path / "config.yaml"
    guide.write_text(
        "model:\n  rpn_head:\n    cls_pos_weight: 1.0\n    loss_cls_weight: 1.0\n    loss_bbox_weight: 1.0\n"
        "  roi_head:\n    cls_pos_weight: 3.0\n    loss_mask_weight: 0.5\n"
        "training:\n  gradient_clip:\n    enabled: true\n    max_norm: 35.0\n    norm_type: 2\n"
    )
    cfg = LossConfig.coerce(str(guide))
    assert cfg.roi_head.cls_pos_weight == 3.0 and cfg.roi_head.loss_mask_weight == 0.5


def test_presets_and_overrides():
    mm = LossConfig.coerce("mmdetection")
    assert mm.rpn_head.bbox_loss == "l1" and mm.roi_head.bbox_loss == "l1"
    assert mm.rpn_head.cls_avg_factor == "sampled_per_image"
    pos = LossConfig.from_dict({"preset": "positive", "roi_head": {"cls_pos_weight": 2.0}})
    assert pos.roi_head.bbox_avg_factor == "positive" and pos.roi_head.cls_pos_weight == 2.0


@pytest.mark.parametrize(
    "data,match",
    [
        (
            {"roi_head": {"cls_pos_wieght": 2}},
            r"unknown key 'roi_head\.cls_pos_wieght'; did you mean 'roi_head\.cls_pos_weight'\?",
        ),
        ({"rpn_heads": {}}, r"'rpn_heads'.*did you mean 'rpn_head'"),
        ({"roi_head": {"cls_pos_weight": "2"}}, r"roi_head\.cls_pos_weight must be a number"),
        ({"roi_head": {"loss_mask_weight": True}}, r"roi_head\.loss_mask_weight must be a number"),
        ({"rpn_head": {"loss_cls_weight": -1}}, r"rpn_head\.loss_cls_weight must be a finite number >= 0"),
        ({"rpn_head": {"loss_bbox_weight": math.nan}}, r"rpn_head\.loss_bbox_weight must be a finite"),
        ({"roi_head": {"loss_bbox_weight": math.inf}}, r"roi_head\.loss_bbox_weight must be a finite"),
        ({"roi_head": {"bbox_loss": "gio"}}, r"roi_head\.bbox_loss must be one of .*did you mean 'giou'"),
        ({"roi_head": {"bbox_avg_factor": "sampled_per_image"}}, r"roi_head\.bbox_avg_factor must be one of"),
        ({"rpn_head": {"cls_avg_factor": "positive"}}, r"rpn_head\.cls_avg_factor must be one of"),
        ({"roi_head": {"class_weight": 2.0}}, r"roi_head\.class_weight must be a list"),
        ({"roi_head": {"class_weight": [1.0, -2.0]}}, r"roi_head\.class_weight\[1\] must be a finite"),
        ({"sync_avg_factor": "yes"}, r"sync_avg_factor must be true or false"),
        ({"preset": "mmdet"}, r"preset must be one of .*did you mean 'mmdetection'"),
        ({"roi_head": [1, 2]}, r"roi_head must be a mapping"),
    ],
)
def test_bad_config_names_the_key(data, match):
    with pytest.raises(LossConfigError, match=match):
        LossConfig.from_dict(data)


def test_class_weight_length_checked_against_model():
    cfg = RoILossConfig(class_weight=[1, 2, 3])
    cfg.check_num_classes(3)
    with pytest.raises(LossConfigError, match="class_weight has 3 entries but the model has 4 classes"):
        cfg.check_num_classes(4)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(LossConfigError, match="not found"):
        LossConfig.from_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("rpn_head: [unclosed\n")
    with pytest.raises(LossConfigError, match="broken.yaml: not valid YAML"):
        LossConfig.from_yaml(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("roi_head:\n  bbox_los: l1\n")
    with pytest.raises(LossConfigError, match=r"wrong.yaml: unknown key 'roi_head\.bbox_los'"):
        LossConfig.from_yaml(wrong)
    with pytest.raises(LossConfigError, match="neither a preset"):
        LossConfig.coerce("fancy")


def test_config_is_immutable_and_round_trips():
    cfg = LossConfig.from_dict({"roi_head": {"class_weight": [1, 2, 3], "bbox_loss": "ciou"}, "sync_avg_factor": True})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.roi_head.cls_pos_weight = 3.0
    assert LossConfig.from_dict(cfg.to_dict()) == cfg


def test_changed_keys_are_the_dotted_keys_that_differ_from_the_defaults_or_a_base():
    assert LossConfig().changed_keys() == {}
    cfg = LossConfig.from_dict(
        {"rpn_head": {"cls_loss": "focal"}, "roi_head": {"class_weight": [1, 2], "num": 64}, "sync_avg_factor": True}
    )
    assert cfg.changed_keys() == {
        "rpn_head.cls_loss": "focal",
        "roi_head.num": 64,
        "roi_head.class_weight": [1.0, 2.0],
        "sync_avg_factor": True,
    }
    base = LossConfig.from_dict({"rpn_head": {"cls_loss": "focal"}, "roi_head": {"num": 32}})
    assert cfg.changed_keys(base) == {"roi_head.num": 64, "roi_head.class_weight": [1.0, 2.0], "sync_avg_factor": True}
    assert set(LossConfig.preset("mmdetection").changed_keys()) == {
        "rpn_head.bbox_loss",
        "rpn_head.cls_avg_factor",
        "rpn_head.bbox_avg_factor",
        "roi_head.bbox_loss",
    }
