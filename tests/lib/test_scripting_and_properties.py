"""TorchScript compatibility, and properties over random inputs (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tv_lossfix
from tv_lossfix import losses as L

from helpers import make_targets, run_losses, tiny_model

CFG = {
    "rpn_head": {"cls_pos_weight": 2.0, "bbox_loss": "l1"},
    "roi_head": {"bbox_loss": "giou", "class_weight": [1, 2, 3]},
}


@pytest.mark.parametrize("kind", ["faster", "mask", "keypoint"])
def test_scripted_model_matches_eager(stock_models, kind):
    import copy

    model = tv_lossfix.patch_model(copy.deepcopy(stock_models[kind]), CFG)
    scripted = torch.jit.script(model)
    images, targets = make_targets(kind, [(96, 96), (96, 112)], empty=(1,))
    eager = run_losses(model, images, targets)
    got = run_losses(scripted, images, targets)[0]  # scripted detectors return (losses, detections)
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
    model.eval()
    scripted.eval()
    with torch.no_grad():
        a = model(images)
        b = scripted(images)[1]
    for da, db in zip(a, b):
        for k in da:
            torch.testing.assert_close(db[k], da[k], msg=k)


def test_scripted_with_sync_avg_factor_raises_only_when_training():
    model = tiny_model("faster", loss_cfg={"sync_avg_factor": True})
    scripted = torch.jit.script(model)
    images, targets = make_targets("faster", [(64, 64)])
    scripted.eval()
    scripted(images)  # inference is fine
    with pytest.raises(Exception, match="annotated to be ignored"):
        run_losses(scripted, images, targets)


finite = st.floats(-20, 20, allow_nan=False, width=32)


@st.composite
def box_batches(draw):
    n = draw(st.integers(0, 12))
    ref = torch.tensor(
        draw(st.lists(st.tuples(finite, finite, st.floats(1, 60), st.floats(1, 60)), min_size=n, max_size=n)),
        dtype=torch.float32,
    ).reshape(n, 4)
    ref = torch.cat([ref[:, :2], ref[:, :2] + ref[:, 2:]], dim=1)
    pred = torch.tensor(
        draw(st.lists(st.tuples(finite, finite, finite, finite), min_size=n, max_size=n)), dtype=torch.float32
    ).reshape(n, 4)
    target = torch.tensor(
        draw(st.lists(st.tuples(finite, finite, finite, finite), min_size=n, max_size=n)), dtype=torch.float32
    ).reshape(n, 4)
    is_pos = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    # Negatives of images without ground truth carry -inf targets in torchvision.
    target[~is_pos, 2:] = -math.inf
    return pred, target, is_pos, ref


@settings(max_examples=60, deadline=None)
@given(
    box_batches(),
    st.sampled_from(["smooth_l1", "l1", "giou", "diou", "ciou"]),
    st.sampled_from(["sampled", "positive"]),
)
def test_box_loss_finite_with_finite_gradients(batch, loss_type, mode):
    pred, target, is_pos, ref = batch
    pred.requires_grad_(True)
    avg = L.count(is_pos) if mode == "positive" else L.count(torch.ones_like(is_pos))
    loss = L.box_regression_loss(pred, target, is_pos, avg, loss_type, 1 / 9, ref, (10.0, 10.0, 5.0, 5.0))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[~is_pos].abs().sum() == 0  # negatives never pull on the box regressor
    if not is_pos.any():
        assert loss.item() == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 30),
    st.integers(2, 6),
    st.floats(0, 10),
    st.data(),
)
def test_classification_and_objectness_finite(n, num_classes, pos_weight, data):
    logits = (torch.randn(n, num_classes) * 30).requires_grad_(True)
    labels = torch.tensor(
        data.draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)), dtype=torch.long
    )
    cw = torch.tensor(data.draw(st.lists(st.floats(0, 5), min_size=num_classes, max_size=num_classes)))
    w = L.sample_weights(labels > 0, pos_weight, labels, cw)
    loss = L.classification_loss(logits, labels, L.count(torch.ones(n, dtype=torch.bool)), w)
    obj = L.objectness_loss(logits[:, 0], labels > 0, L.count(labels >= 0), L.sample_weights(labels > 0, pos_weight))
    (loss + obj).backward()
    assert torch.isfinite(loss) and torch.isfinite(obj) and torch.isfinite(logits.grad).all()


@st.composite
def detection_batches(draw):
    sizes = draw(st.lists(st.tuples(st.integers(48, 80), st.integers(48, 80)), min_size=1, max_size=3))
    images, targets = [], []
    for h, w in sizes:
        n = draw(st.integers(0, 4))
        boxes = []
        for _ in range(n):
            x1 = draw(st.floats(0, w - 3))
            y1 = draw(st.floats(0, h - 3))
            boxes.append([x1, y1, draw(st.floats(x1 + 1, w)), draw(st.floats(y1 + 1, h))])
        b = torch.tensor(boxes, dtype=torch.float32).reshape(n, 4)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(b.round().long().tolist()):
            masks[j, y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)] = 1
        labels = torch.tensor(draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)), dtype=torch.long)
        images.append(torch.rand(3, h, w))
        targets.append({"boxes": b, "labels": labels, "masks": masks})
    return images, targets


@settings(max_examples=12, deadline=None)
@given(
    detection_batches(),
    st.sampled_from(["smooth_l1", "giou", "ciou"]),
    st.sampled_from(["torchvision", "mmdetection", "positive"]),
)
def test_model_losses_and_gradients_finite(batch, bbox_loss, preset):
    images, targets = batch
    model = tiny_model("mask", loss_cfg={"preset": preset, "roi_head": {"bbox_loss": bbox_loss, "cls_pos_weight": 2.0}})
    out = run_losses(model, images, targets)
    assert set(out) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
