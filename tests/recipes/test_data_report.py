"""The data and anchor report's computations (references/data_report.py): coverage against brute force
and the model's own anchors and resize, at its RPN matcher's thresholds, its warnings and advice,
anchors from YAML."""

import math

import numpy as np
import pytest
import torch
import yaml
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

import data_report as R
import models
import train
from helpers import records, tiny_config


def _brute_force(boxes, levels):
    best = np.zeros(len(boxes))
    for cell, (gh, gw), (sh, sw) in levels:
        ys, xs = np.meshgrid(np.arange(gh) * sh, np.arange(gw) * sw, indexing="ij")
        shifts = np.stack([xs.ravel(), ys.ravel(), xs.ravel(), ys.ravel()], 1)
        anchors = (shifts[:, None, :] + cell[None]).reshape(-1, 4)
        iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(anchors)).numpy()
        best = np.maximum(best, iou.max(1))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_best_anchor_iou_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    levels = []
    for stride in (4, 8, 16):
        size = rng.uniform(4, 80, size=(3,))
        ratio = rng.uniform(0.3, 3.0, size=(3,))
        w, h = size / np.sqrt(ratio), size * np.sqrt(ratio)
        cell = np.round(np.stack([-w, -h, w, h], 1) / 2)
        levels.append((cell, (int(128 / stride), int(96 / stride)), (stride, stride)))
    xy = rng.uniform(-10, 100, size=(200, 2))
    wh = rng.uniform(1, 90, size=(200, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    np.testing.assert_allclose(R.best_anchor_iou(boxes, levels), _brute_force(boxes, levels), rtol=1e-9, atol=1e-12)


def _coco(sizes, image_hw=(96, 128), n_images=6, seed=0):
    rng = np.random.default_rng(seed)
    h, w = image_hw
    images = [{"id": i + 1, "width": w, "height": h, "file_name": f"{i}.png"} for i in range(n_images)]
    anns, k = [], 0
    for img in images:
        for s in sizes:
            k += 1
            bw, bh = s * rng.uniform(0.7, 1.3), s * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append(
                {
                    "id": k,
                    "image_id": img["id"],
                    "category_id": 1 + k % 3,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.mark.parametrize("name", ["maskrcnn_tiny", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_coverage_uses_the_models_real_anchors(name):
    """Against torchvision's own AnchorGenerator on the real feature maps of the padded input."""
    model, _ = models.build_model(
        name=name,
        num_classes=4,
        stock=True,
        kwargs={"min_size": 96, "max_size": 128} if name != "maskrcnn_tiny" else {},
    )
    model.eval()
    data = _coco([8, 20, 40, 70])
    geo = R.AnchorGeometry(model)
    boxes = R.resized_boxes(data, geo)
    ours = R.coverage(boxes, geo)
    ph, pw = (int(v) for v in boxes.padded_hw[0])
    assert (boxes.padded_hw == boxes.padded_hw[0]).all()
    # The boxes and the padded size are the model's own: its transform on image 1 (the first 4 boxes).
    xywh = torch.tensor([a["bbox"] for a in data["annotations"] if a["image_id"] == 1], dtype=torch.float32)
    xywh[:, 2:] += xywh[:, :2]
    with torch.no_grad():
        batch, targets = model.transform([torch.zeros(3, 96, 128)], [{"boxes": xywh, "labels": torch.ones(4).long()}])
    assert tuple(batch.image_sizes[0]) == tuple(boxes.resized_hw[0])
    assert tuple(batch.tensors.shape[-2:]) == (ph, pw)
    np.testing.assert_allclose(boxes.xyxy[:4], targets[0]["boxes"].numpy(), rtol=1e-5)
    assert (boxes.image_ids[:4] == 1).all() and boxes.labels.tolist()[:4] == [2, 3, 1, 2]
    with torch.no_grad():
        feats = list(model.backbone(torch.zeros(1, 3, ph, pw)).values())
        anchors = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, ph, pw), [(ph, pw)]), feats)[0]
    theirs = box_iou(torch.from_numpy(boxes.xyxy).float(), anchors).max(1).values.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("hw", [(60, 150), (150, 60), (97, 101), (300, 40)])
def test_the_boxes_resized_and_padded_sizes_are_the_models_transforms(hw):
    """Images of other shapes than the model's: the resize (one side to min_size, capped by max_size)
    and the padding to size_divisible the report measures at are the ones the model's transform makes."""
    model = models.maskrcnn_tiny(4, image_size=100, max_size=160)
    model.eval()
    h, w = hw
    data = {
        "images": [{"id": 7, "height": h, "width": w, "file_name": "x.png"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1.0, 2.0, 20.0, 30.0], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}],
    }
    boxes = R.resized_boxes(data, R.AnchorGeometry(model))
    target = {"boxes": torch.tensor([[1.0, 2.0, 21.0, 32.0]]), "labels": torch.ones(1).long()}
    with torch.no_grad():
        batch, targets = model.transform([torch.zeros(3, h, w)], [target])
    assert tuple(boxes.resized_hw[0]) == tuple(batch.image_sizes[0])
    assert tuple(boxes.padded_hw[0]) == tuple(batch.tensors.shape[-2:])
    np.testing.assert_allclose(boxes.xyxy, targets[0]["boxes"].numpy(), rtol=1e-5)
    assert boxes.image_sizes.tolist() == [[h, w]] and boxes.native_wh.tolist() == [[20.0, 30.0]]


def test_report_flags_poor_coverage_and_its_advice_raises_coverage():
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, stock=True, kwargs={"image_size": 128})
    # Objects between two anchor sizes (12 and 24), large enough for the scale rule (scale.py).
    data = _coco([17, 18, 19, 30], image_hw=(128, 128), n_images=20)
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


def _torchvision_best_iou(model, boxes):
    """Every box's best IoU with the anchors torchvision's own AnchorGenerator makes on the model's real
    feature maps (all images of one padded size)."""
    ph, pw = (int(v) for v in boxes.padded_hw[0])
    assert (boxes.padded_hw == boxes.padded_hw[0]).all()
    with torch.no_grad():
        feats = list(model.backbone(torch.zeros(1, 3, ph, pw)).values())
        anchors = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, ph, pw), [(ph, pw)]), feats)[0]
    return box_iou(torch.from_numpy(boxes.xyxy).float(), anchors).max(1).values.numpy()


@pytest.mark.parametrize("fg, bg", [(0.6, 0.55), (0.8, 0.6)])
def test_coverage_and_the_scale_rule_follow_the_models_rpn_matcher(fg, bg):
    """rpn_fg_iou_thresh / rpn_bg_iou_thresh (model.kwargs) set the RPN's Matcher: the report's fractions,
    its thresholds line and the scale rule's anchor yardstick are at the matcher's thresholds, not 0.7 / 0.3."""
    kwargs = {"image_size": 128, "rpn_fg_iou_thresh": fg, "rpn_bg_iou_thresh": bg}
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, stock=True, kwargs=kwargs)
    model.eval()
    data = _coco([10, 17, 30, 50], image_hw=(128, 128), n_images=10)
    report = R.data_report(None, model, dataset=data)
    best = _torchvision_best_iou(model, R.resized_boxes(data, R.AnchorGeometry(model)))
    assert (best >= fg).mean() != (best >= 0.7).mean() and (best >= bg).mean() != (best >= 0.3).mean()
    assert report.thresholds == {"fg": fg, "bg": bg, "low_quality": True}
    assert report.coverage["all"]["fg"] == pytest.approx((best >= fg).mean())
    assert report.coverage["all"]["bg"] == pytest.approx((best >= bg).mean())
    assert f"anchor coverage (best IoU >= {fg:g} / >= {bg:g}" in report.text()
    # The scale rule: a box reaches IoU fg centred on the 12 px anchor from sqrt(fg) x 12 px; 2 strides = 8 px.
    assert report.scale["fg_iou"] == fg and report.scale["required"] == pytest.approx(max(math.sqrt(fg) * 12, 8))
    assert f"reaches IoU {fg:g} centred" in report.text()


def test_without_low_quality_matches_the_report_says_so_where_coverage_is_poor():
    model = models.maskrcnn_tiny(4, image_size=128)
    model.rpn.proposal_matcher = Matcher(0.7, 0.3, allow_low_quality_matches=False)
    data = _coco([17, 18, 19, 30], image_hw=(128, 128), n_images=20)  # poor coverage: boxes between two anchors
    report = R.data_report(None, model, dataset=data)
    assert report.thresholds == {"fg": 0.7, "bg": 0.3, "low_quality": False}
    assert "allow_low_quality_matches off" in report.text()
    poor = next(w for w in report.warnings if w.startswith("all:"))
    assert "allow_low_quality_matches" in poor
    on = R.data_report(None, models.maskrcnn_tiny(4, image_size=128), dataset=data)
    assert on.coverage["all"] == report.coverage["all"]  # the rule changes what is said, not the figures
    assert "allow_low_quality_matches" not in next(w for w in on.warnings if w.startswith("all:"))


def test_a_model_without_a_matcher_is_one_line_naming_it():
    model = models.maskrcnn_tiny(4)
    model.rpn.proposal_matcher = None
    with pytest.raises(models.ModelError, match="rpn.proposal_matcher") as e:
        R.Thresholds.of(model)
    assert "\n" not in str(e.value)


def test_report_counts_classes_empty_images_and_imbalance():
    model = models.maskrcnn_tiny(4)
    data = _coco([30], n_images=4)
    data["images"].append({"id": 99, "width": 128, "height": 96, "file_name": "e.png"})
    data["annotations"] = [dict(a, category_id=1) for a in data["annotations"][:3]] + [
        dict(data["annotations"][3], category_id=3)
    ]
    r = R.data_report(None, model, dataset=data)
    assert r.objects == {"a": 3, "b": 0, "c": 1} and r.imbalance == 3.0
    assert r.empty_fraction == pytest.approx(1 / 5)


def test_anchor_settings_are_validated_against_the_feature_maps():
    model = models.maskrcnn_tiny(4)  # 4 feature maps, 3 anchors per location
    with pytest.raises(models.ModelError, match="has 3 lists but the backbone gives 4 feature maps"):
        models.set_anchors(model, [[8], [16], [32]], None)
    with pytest.raises(models.ModelError, match="same number of anchors per location"):
        models.set_anchors(model, [[8], [16, 20], [32], [64]], None)
    with pytest.raises(models.ModelError, match="give one list, or one per feature map"):
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
    assert "anchors from the config: rpn.anchor_generator: sizes [[8], [16], [32], [64]]" in out
    assert "re-initialised (3 -> 1 anchors per location)" in out
    report = records(tmp_path / "out", "data_report")[0]
    assert report["anchors"]["sizes"] == [[8], [16], [32], [64]]
    data["model"]["anchor_sizes"] = [[8], [16]]
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(models.ModelError, match="has 2 lists but the backbone gives 4 feature maps"):
        train.main(["--config", str(p)])
    assert "images," not in capsys.readouterr().out  # refused before any data was read
