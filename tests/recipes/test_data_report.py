"""The data and anchor report's computations (references/data_report.py): its figures at the model's RPN
matcher thresholds, its warnings and advice, anchors from YAML."""

import math

import pytest
import yaml
from torchvision.models.detection._utils import Matcher

import anchor_coverage as AC
import data_report as R
import models
import train
from helpers import assert_names, coco_boxes, raises_naming, records, tiny_config


def test_report_flags_poor_coverage_and_its_advice_raises_coverage():
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, stock=True, kwargs={"image_size": 128})
    # Objects between two anchor sizes (12 and 24), large enough for the scale rule (scale.py).
    data = coco_boxes([17, 18, 19, 30], image_hw=(128, 128), n_images=20)
    report = R.data_report(None, model, dataset=data)
    text = report.text()
    assert not report.scale["fires"] and "input scale: object side after the resize" in text
    assert report.coverage["small"]["fg"] < 0.2 and "WARNING: all: only 10% of 80 boxes" in text
    assert "small: only" not in text  # a bucket is flagged only when it is worse than the whole
    advice = report.advice
    assert advice and advice["after"] > advice["before"] + 0.1
    assert report.config == {
        "model": {"anchor_sizes": advice["anchor_sizes"], "aspect_ratios": advice["aspect_ratios"]}
    }
    assert "anchor_sizes:" in text and "aspect_ratios:" in text
    # Following the advice (the YAML keys below) gives the coverage it promised.
    models.set_anchors(model, advice["anchor_sizes"], advice["aspect_ratios"])
    after = R.data_report(None, model, dataset=data)
    assert after.coverage["all"]["fg"] == pytest.approx(advice["after"])
    assert after.coverage["all"]["bg"] == pytest.approx(advice["after_bg"])


@pytest.mark.parametrize("fg, bg", [(0.6, 0.55), (0.8, 0.6)])
def test_coverage_and_the_scale_rule_follow_the_models_rpn_matcher(fg, bg):
    """rpn_fg_iou_thresh / rpn_bg_iou_thresh (model.kwargs) set the RPN's Matcher: the report's fractions,
    its thresholds line and the scale rule's anchor yardstick are at the matcher's thresholds, not 0.7 / 0.3."""
    kwargs = {"image_size": 128, "rpn_fg_iou_thresh": fg, "rpn_bg_iou_thresh": bg}
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, stock=True, kwargs=kwargs)
    model.eval()
    data = coco_boxes([10, 17, 30, 50], image_hw=(128, 128), n_images=10)
    report = R.data_report(None, model, dataset=data)
    assert report.thresholds == {"fg": fg, "bg": bg, "low_quality": True}
    # anchor_coverage's tests hold the table at given thresholds to torchvision's anchors.
    geo, names = AC.AnchorGeometry(model), {1: "a", 2: "b", 3: "c"}
    at_matcher = AC.measure(data, geo, names, AC.Thresholds.of(model)).table
    at_default = AC.measure(data, geo, names, AC.Thresholds(0.7, 0.3)).table
    assert {k: c for k, c in report.coverage.items() if c["n"]} == {k: c for k, c in at_matcher.items() if c["n"]}
    assert report.coverage["all"] != at_default["all"]
    assert f"anchor coverage (best IoU >= {fg:g} / >= {bg:g}" in report.text()
    # The scale rule: a box reaches IoU fg centred on the 12 px anchor from sqrt(fg) x 12 px; 2 strides = 8 px.
    assert report.scale["fg_iou"] == fg and report.scale["required"] == pytest.approx(max(math.sqrt(fg) * 12, 8))
    assert f"reaches IoU {fg:g} centred" in report.text()


def test_without_low_quality_matches_the_report_says_so_where_coverage_is_poor():
    model = models.maskrcnn_tiny(4, image_size=128)
    model.rpn.proposal_matcher = Matcher(0.7, 0.3, allow_low_quality_matches=False)
    data = coco_boxes([17, 18, 19, 30], image_hw=(128, 128), n_images=20)  # poor coverage: boxes between two anchors
    report = R.data_report(None, model, dataset=data)
    assert report.thresholds == {"fg": 0.7, "bg": 0.3, "low_quality": False}
    assert "allow_low_quality_matches off" in report.text()
    poor = next(w for w in report.warnings if w.startswith("all:"))
    assert "allow_low_quality_matches" in poor
    on = R.data_report(None, models.maskrcnn_tiny(4, image_size=128), dataset=data)
    assert on.coverage["all"] == report.coverage["all"]  # the rule changes what is said, not the figures
    assert "allow_low_quality_matches" not in next(w for w in on.warnings if w.startswith("all:"))


def test_report_counts_classes_empty_images_and_imbalance():
    model = models.maskrcnn_tiny(4)
    data = coco_boxes([30], n_images=4)
    data["images"].append({"id": 99, "width": 128, "height": 96, "file_name": "e.png"})
    data["annotations"] = [dict(a, category_id=1) for a in data["annotations"][:3]] + [
        dict(data["annotations"][3], category_id=3)
    ]
    r = R.data_report(None, model, dataset=data)
    assert r.objects == {"a": 3, "b": 0, "c": 1} and r.imbalance == 3.0
    assert r.empty_fraction == pytest.approx(1 / 5)


def test_anchor_settings_are_validated_against_the_feature_maps():
    model = models.maskrcnn_tiny(4)  # 4 feature maps, 3 anchors per location
    with raises_naming(models.ModelError, "model.anchor_sizes", "3 lists", "4 feature maps"):
        models.set_anchors(model, [[8], [16], [32]], None)
    with raises_naming(models.ModelError, "model.anchor_sizes", "model.aspect_ratios", "[3, 6]"):
        models.set_anchors(model, [[8], [16, 20], [32], [64]], None)
    with raises_naming(models.ModelError, "model.aspect_ratios", "2 lists", "(4)"):
        models.set_anchors(model, None, [[1.0], [1.0]])
    head = model.rpn.head.cls_logits
    changed = models.set_anchors(model, [[8], [16], [32], [64]], [[0.5, 1.0, 2.0]])
    assert model.rpn.head.cls_logits is head and len(changed) == 1  # same count: the trained head is kept
    changed = models.set_anchors(model, [[8, 11], [16, 22], [32, 45], [64, 90]], [[0.5, 1.0, 2.0]])
    assert model.rpn.head.cls_logits.out_channels == 6 and "re-initialised (3 -> 6" in changed[1]


@pytest.mark.slow
def test_anchors_from_yaml_train_and_reach_the_report(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1)
    data = yaml.safe_load(open(cfg))
    data["model"]["anchor_sizes"] = [[8], [16], [32], [64]]
    data["model"]["aspect_ratios"] = [[1.0]]
    p = tmp_path / "anchors.yaml"
    p.write_text(yaml.safe_dump(data))
    assert train.main(["--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert_names(out, "rpn.anchor_generator: sizes [[8], [16], [32], [64]]", "re-initialised (3 -> 1")
    report = records(tmp_path / "out", "data_report")[0]
    assert report["anchors"]["sizes"] == [[8], [16], [32], [64]]
    data["model"]["anchor_sizes"] = [[8], [16]]
    p.write_text(yaml.safe_dump(data))
    with raises_naming(models.ModelError, "model.anchor_sizes", "2 lists", "4 feature maps"):
        train.main(["--config", str(p)])
    assert "images," not in capsys.readouterr().out  # refused before any data was read
