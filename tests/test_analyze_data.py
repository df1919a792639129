"""The data and anchor report: coverage against brute force, its warnings and advice, anchors from
YAML, the lr check before step 1, and the gallery's choice of images."""

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
        name,
        4,
        None,
        None,
        None,
        None,
        None,
        True,
        {"min_size": 96, "max_size": 128} if name != "maskrcnn_tiny" else {},
    )
    model.eval()
    data = _coco([8, 20, 40, 70])
    geo = A.AnchorGeometry(model)
    xyxy, _, padded = A.resized_boxes(data, geo)
    ours = A.coverage(xyxy, padded, geo)
    ph, pw = (int(v) for v in padded[0])
    assert (padded == padded[0]).all()
    with torch.no_grad():
        feats = list(model.backbone(torch.zeros(1, 3, ph, pw)).values())
        image_size = model.transform.min_size[-1]  # noqa: F841
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


def test_report_flags_tiny_objects_and_its_advice_raises_coverage():
    model, _ = models.build_model("maskrcnn_tiny", 4, None, None, None, None, None, True, {"image_size": 128})
    data = _coco([5, 6, 7, 30], image_hw=(128, 128), n_images=20)
    report = A.data_report(None, model, dataset=data)
    text = report.text()
    assert report.coverage["small"]["0.3"] < 0.9 and "WARNING: all: only 4% of 80 boxes" in text
    assert "small: only" not in text  # a bucket is flagged only when it is worse than the whole
    advice = report.advice
    assert advice and advice["after"] > advice["before"] + 0.1
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


def test_lr_check_before_step_one_and_auto_scale(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1, lr=0.02, warmup_iters=0)
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    out = capsys.readouterr().out
    warning = "WARNING: lr 0.02 is 8.0x the linear-scaling rule for 2 images per step"
    assert warning in out and out.index(warning) < out.index("epoch 0 [")
    assert records(tmp_path / "out", "lr_check")[0]["linear_scaling_lr"] == 0.0025
    assert train.main(["--config", cfg, "--no-data-report", "--auto-scale-lr"]) == 0
    out = capsys.readouterr().out
    assert "lr 0.02 is for 16 images per step; 2 per step here -> lr 0.0025" in out and "WARNING: lr" not in out
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["training"]["lr"] == 0.0025


def test_per_class_table_each_evaluation(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1, epochs=2)
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    assert capsys.readouterr().out.count("recall@0.05") == 2
    evals = records(tmp_path / "out", "eval")
    assert len(evals) == 2 and set(evals[0]["per_class"]) == {"square", "circle", "triangle", "star"}
    assert {"gt", "dets_per_image", "recall", "bbox_AP", "bbox_AP50", "segm_AP"} <= set(evals[0]["per_class"]["star"])


def test_gallery_shows_the_missed_rare_objects_first():
    from visualize import _miss_score

    def gt(labels, boxes):
        return {"labels": torch.tensor(labels), "boxes": torch.tensor(boxes, dtype=torch.float32)}

    nothing = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}
    found = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9])}
    rarity = {1: 1 / 50, 2: 1 / 2}
    common_missed = _miss_score(gt([1], [[0, 0, 10, 10]]), nothing, 0.05, rarity)
    rare_missed = _miss_score(gt([2], [[0, 0, 10, 10]]), nothing, 0.05, rarity)
    common_found = _miss_score(gt([1], [[0, 0, 10, 10]]), found, 0.05, rarity)
    assert rare_missed > common_missed > common_found == 0.0
