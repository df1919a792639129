"""The data and anchor report: coverage against brute force and the model's own anchors, its warnings
and advice, anchors from YAML."""

import numpy as np
import pytest
import torch
import yaml
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

import analyze_data as A
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
    np.testing.assert_allclose(A.best_anchor_iou(boxes, levels), _brute_force(boxes, levels), rtol=1e-9, atol=1e-12)


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
    geo = A.AnchorGeometry(model)
    xyxy, _, padded = A.resized_boxes(data, geo)
    ours = A.coverage(xyxy, padded, geo)
    ph, pw = (int(v) for v in padded[0])
    assert (padded == padded[0]).all()
    # The boxes and the padded size are the model's own: its transform on image 1 (the first 4 boxes).
    image_size, max_size = model.transform.min_size[-1], model.transform.max_size
    boxes = torch.tensor([a["bbox"] for a in data["annotations"] if a["image_id"] == 1], dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]
    with torch.no_grad():
        batch, targets = model.transform([torch.zeros(3, 96, 128)], [{"boxes": boxes, "labels": torch.ones(4).long()}])
    assert tuple(batch.image_sizes[0]) == A.resized_size(96, 128, image_size, max_size)[:2]
    assert tuple(batch.tensors.shape[-2:]) == (ph, pw)
    np.testing.assert_allclose(xyxy[:4], targets[0]["boxes"].numpy(), rtol=1e-5)
    with torch.no_grad():
        feats = list(model.backbone(torch.zeros(1, 3, ph, pw)).values())
        anchors = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, ph, pw), [(ph, pw)]), feats)[0]
    theirs = box_iou(torch.from_numpy(xyxy).float(), anchors).max(1).values.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_resize_matches_the_models_transform():
    model = models.maskrcnn_tiny(4, image_size=100)
    model.eval()
    image = torch.zeros(3, 60, 150)
    out, _ = model.transform([image])
    nh, nw, _ = A.resized_size(60, 150, 100, 100)
    assert tuple(out.image_sizes[0]) == (nh, nw)


def test_report_flags_poor_coverage_and_its_advice_raises_coverage():
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, stock=True, kwargs={"image_size": 128})
    # Objects between two anchor sizes (12 and 24), large enough for the scale rule (scale.py).
    data = _coco([17, 18, 19, 30], image_hw=(128, 128), n_images=20)
    report = A.data_report(None, model, dataset=data)
    text = report.text()
    assert not report.scale["fires"] and "input scale: object side after the resize" in text
    assert report.coverage["small"]["0.7"] < 0.2 and "WARNING: all: only 10% of 80 boxes" in text
    assert "small: only" not in text  # a bucket is flagged only when it is worse than the whole
    advice = report.advice
    assert advice and advice["after"] > advice["before"] + 0.1
    assert report.config == {
        "model": {"anchor_sizes": advice["anchor_sizes"], "aspect_ratios": advice["aspect_ratios"]}
    }
    assert "anchor_sizes:" in text and "aspect_ratios:" in text
    # Following the advice (the YAML keys below) gives the coverage it promised.
    models.set_anchors(model, advice["anchor_sizes"], advice["aspect_ratios"])
    after = A.data_report(None, model, dataset=data)
    assert after.coverage["all"]["0.7"] == pytest.approx(advice["after"])
    assert after.coverage["all"]["0.3"] == pytest.approx(advice["after_03"])


def test_report_counts_classes_empty_images_and_imbalance():
    model = models.maskrcnn_tiny(4)
    data = _coco([30], n_images=4)
    data["images"].append({"id": 99, "width": 128, "height": 96, "file_name": "e.png"})
    data["annotations"] = [dict(a, category_id=1) for a in data["annotations"][:3]] + [
        dict(data["annotations"][3], category_id=3)
    ]
    r = A.data_report(None, model, dataset=data)
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
