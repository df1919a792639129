"""Anchor coverage (references/anchor_coverage.py): the boxes as the model's transform makes them, best
anchor IoUs against brute force and torchvision's own AnchorGenerator, and the fractions at the model's
RPN matcher thresholds."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

import anchor_coverage as AC
import models
from helpers import coco_boxes


def torchvision_best_iou(model, boxes):
    """Every box's best IoU with the anchors torchvision's own AnchorGenerator makes on the model's real
    feature maps (all images of one padded size)."""
    ph, pw = (int(v) for v in boxes.padded_hw[0])
    assert (boxes.padded_hw == boxes.padded_hw[0]).all()
    with torch.no_grad():
        feats = list(model.backbone(torch.zeros(1, 3, ph, pw)).values())
        anchors = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, ph, pw), [(ph, pw)]), feats)[0]
    return box_iou(torch.from_numpy(boxes.xyxy).float(), anchors).max(1).values.numpy()


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
    np.testing.assert_allclose(AC.best_anchor_iou(boxes, levels), _brute_force(boxes, levels), rtol=1e-9, atol=1e-12)


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
    data = coco_boxes([8, 20, 40, 70])
    geo = AC.AnchorGeometry(model)
    boxes = AC.resized_boxes(data, geo)
    ours = AC.coverage(boxes, geo)
    ph, pw = (int(v) for v in boxes.padded_hw[0])
    # The boxes and the padded size are the model's own: its transform on image 1 (the first 4 boxes).
    xywh = torch.tensor([a["bbox"] for a in data["annotations"] if a["image_id"] == 1], dtype=torch.float32)
    xywh[:, 2:] += xywh[:, :2]
    with torch.no_grad():
        batch, targets = model.transform([torch.zeros(3, 96, 128)], [{"boxes": xywh, "labels": torch.ones(4).long()}])
    assert tuple(batch.image_sizes[0]) == tuple(boxes.resized_hw[0])
    assert tuple(batch.tensors.shape[-2:]) == (ph, pw)
    np.testing.assert_allclose(boxes.xyxy[:4], targets[0]["boxes"].numpy(), rtol=1e-5)
    assert (boxes.image_ids[:4] == 1).all() and boxes.labels.tolist()[:4] == [2, 3, 1, 2]
    np.testing.assert_allclose(ours, torchvision_best_iou(model, boxes), atol=1e-5)


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
    boxes = AC.resized_boxes(data, AC.AnchorGeometry(model))
    target = {"boxes": torch.tensor([[1.0, 2.0, 21.0, 32.0]]), "labels": torch.ones(1).long()}
    with torch.no_grad():
        batch, targets = model.transform([torch.zeros(3, h, w)], [target])
    assert tuple(boxes.resized_hw[0]) == tuple(batch.image_sizes[0])
    assert tuple(boxes.padded_hw[0]) == tuple(batch.tensors.shape[-2:])
    np.testing.assert_allclose(boxes.xyxy, targets[0]["boxes"].numpy(), rtol=1e-5)
    assert boxes.image_sizes.tolist() == [[h, w]] and boxes.native_wh.tolist() == [[20.0, 30.0]]


@pytest.mark.parametrize("fg, bg", [(0.6, 0.55), (0.8, 0.6)])
def test_the_fractions_are_at_the_models_rpn_matcher_thresholds(fg, bg):
    """rpn_fg_iou_thresh / rpn_bg_iou_thresh (model.kwargs) set the RPN's Matcher; the fractions are of the
    boxes whose best IoU with torchvision's own anchors reaches them, not 0.7 / 0.3."""
    kwargs = {"image_size": 128, "rpn_fg_iou_thresh": fg, "rpn_bg_iou_thresh": bg}
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, stock=True, kwargs=kwargs)
    model.eval()
    thr = AC.Thresholds.of(model)
    assert thr == AC.Thresholds(fg, bg, low_quality=True)
    data = coco_boxes([10, 17, 30, 50], image_hw=(128, 128), n_images=10)
    found = AC.measure(data, AC.AnchorGeometry(model), {1: "a", 2: "b", 3: "c"}, thr)
    best = torchvision_best_iou(model, found.boxes)
    assert (best >= fg).mean() != (best >= 0.7).mean() and (best >= bg).mean() != (best >= 0.3).mean()
    for key, mask in found.groups.items():
        if mask.any():
            assert found.table[key]["fg"] == pytest.approx((best[mask] >= fg).mean())
            assert found.table[key]["bg"] == pytest.approx((best[mask] >= bg).mean())
            assert found.table[key]["n"] == mask.sum()


def test_a_model_without_a_matcher_is_one_line_naming_it():
    model = models.maskrcnn_tiny(4)
    model.rpn.proposal_matcher = None
    with pytest.raises(models.ModelError, match="rpn.proposal_matcher") as e:
        AC.Thresholds.of(model)
    assert "\n" not in str(e.value)
