"""Each formula of tv_lossfix.losses against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from tv_lossfix import losses as L


def bce(x, y):
    return math.log1p(math.exp(-x)) if y == 1 else math.log1p(math.exp(x))


def test_count_is_at_least_one():
    assert L.count(torch.zeros(5, dtype=torch.bool)).item() == 1.0
    assert L.count(torch.tensor([True, False, True])).item() == 2.0


def test_per_image_count_is_mmdetections():
    pos = torch.tensor([[True, False, False], [False, False, False]])
    neg = torch.tensor([[False, True, True], [False, False, False]])
    # image 0: max(1,1) + max(2,1) = 3 ; image 1: max(0,1) + max(0,1) = 2
    assert L.per_image_count(pos, neg).item() == 5.0


def test_objectness_pos_weight_by_hand():
    logits = torch.tensor([0.5, -1.0, 2.0])
    is_pos = torch.tensor([True, False, True])
    w = L.sample_weights(is_pos, 2.0)
    got = L.objectness_loss(logits, is_pos, torch.tensor(3.0), w)
    expected = (2 * bce(0.5, 1) + bce(-1.0, 0) + 2 * bce(2.0, 1)) / 3
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Default: exactly torchvision's mean BCE.
    plain = L.objectness_loss(logits, is_pos, torch.tensor(3.0), L.sample_weights(is_pos, 1.0))
    assert plain.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, is_pos.float()).item(), rel=1e-7)


def test_sample_weights_none_when_all_one():
    assert L.sample_weights(torch.tensor([True, False]), 1.0) is None


def test_classification_class_weight_and_pos_weight_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [1.0, -2.0, 0.5], [0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    cw = torch.tensor([0.5, 2.0, 1.0])
    w = L.sample_weights(labels > 0, 3.0, labels, cw)
    assert w.tolist() == [0.5, 6.0, 3.0, 6.0]
    ce = F.cross_entropy(logits, labels, reduction="none")
    got = L.classification_loss(logits, labels, torch.tensor(4.0), w)
    assert got.item() == pytest.approx((ce * torch.tensor([0.5, 6.0, 3.0, 6.0])).sum().item() / 4, rel=1e-6)
    # The avg_factor is a count, not the weights' sum that F.cross_entropy(weight=) divides by.
    assert got.item() != pytest.approx(F.cross_entropy(logits, labels, weight=cw).item(), rel=1e-3)


def test_box_smooth_l1_and_l1_by_hand_positive_normalization():
    pred = torch.tensor([[0.05, 0.0, 0.5, 0.0], [9.0, 9.0, 9.0, 9.0], [0.0, 0.2, 0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-math.inf, 0.0, -math.inf, -math.inf], [0.0, 0.0, 0.0, 0.0]])
    is_pos = torch.tensor([True, False, True])
    beta = 1 / 9
    # smooth-L1 per coordinate: 0.5 d^2 / beta if |d| < beta else |d| - beta / 2
    sl1 = lambda d: 0.5 * d * d / beta if abs(d) < beta else abs(d) - beta / 2  # noqa: E731
    expected = sl1(0.05) + sl1(0.5) + sl1(0.2)
    got = L.box_regression_loss(pred, target, is_pos, torch.tensor(2.0), "smooth_l1", beta)
    assert got.item() == pytest.approx(expected / 2, rel=1e-6)  # "positive": divided by P = 2
    got = L.box_regression_loss(pred, target, is_pos, torch.tensor(3.0), "l1")
    assert got.item() == pytest.approx((0.05 + 0.5 + 0.2) / 3, rel=1e-6)  # "sampled": by S = 3


@pytest.mark.parametrize(
    "loss_type,expected",
    [
        # pred box shifted right by 1 px from the 10x10 target: IoU = 90/110, enclosing box 11x10.
        ("giou", 1 - 90 / 110),
        ("diou", 1 - 90 / 110 + 1 / (11**2 + 10**2)),
        ("ciou", 1 - 90 / 110 + 1 / (11**2 + 10**2)),  # same aspect ratio: CIoU term v = 0
    ],
)
def test_iou_losses_by_hand(loss_type, expected):
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]])
    pred = torch.tensor([[0.1, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf]])
    is_pos = torch.tensor([True, False])
    got = L.box_regression_loss(pred, target, is_pos, torch.tensor(1.0), loss_type, ref_boxes=ref)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[1].abs().sum() == 0


def test_iou_loss_without_reference_boxes_raises():
    with pytest.raises(ValueError, match="giou"):
        L.box_regression_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([True]), torch.tensor(1.0), "giou")


def test_decode_matches_torchvision_box_coder():
    from torchvision.models.detection._utils import BoxCoder

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(20, 2, generator=g) * 50
    ref = torch.cat([ref, ref + 5 + torch.rand(20, 2, generator=g) * 40], dim=1)
    deltas = torch.randn(20, 4, generator=g)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    expected = coder.decode_single(deltas, ref)
    torch.testing.assert_close(L.decode_deltas(deltas, ref, (10.0, 10.0, 5.0, 5.0)), expected)


def test_zero_positive_box_loss_is_zero_and_connected():
    pred = torch.randn(4, 4, requires_grad=True)
    loss = L.box_regression_loss(
        pred, torch.full((4, 4), -math.inf), torch.zeros(4, dtype=torch.bool), torch.tensor(4.0)
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() == 0


def test_mask_loss_is_per_pixel_mean():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.tensor([2, 1])
    targets = (torch.rand(2, 4, 4) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits[[0, 1], [2, 1]], targets, reduction="sum") / (2 * 16)
    assert L.mask_loss(logits, labels, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    empty = torch.randn(0, 3, 4, 4, requires_grad=True)
    z = L.mask_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, 4))
    assert z.item() == 0.0 and z.requires_grad


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_iou_loss_equals_torchvision_ops(kind):
    from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

    ref = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}[kind]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(200, 2, generator=g) * 40], 1)
    b = a + torch.randn(200, 4, generator=g) * 8  # overlapping, disjoint and nested pairs
    b[:, 2:] = torch.max(b[:, 2:], b[:, :2] + 0.5)
    a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    ours, theirs = L.iou_loss(a1, b, kind), ref(a2, b, reduction="none")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-4, atol=1e-6)
