"""tv_lossfix at the edges: non-finite values, any predictor, zero weights, the DDP normalizer."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import fastrcnn_loss

import tv_lossfix
from tv_lossfix import LossConfig, LossConfigError
from tv_lossfix import losses as L

from helpers import ROOT, make_targets, on_gloo_ranks, run_losses, tiny_model


def _stock_box_loss(pred, target, is_pos, kind):
    fn = F.smooth_l1_loss if kind == "smooth_l1" else F.l1_loss
    kw = {"beta": 1 / 9} if kind == "smooth_l1" else {}
    return fn(pred[is_pos], target[is_pos], reduction="sum", **kw) / pred.shape[0]


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "giou", "diou", "ciou"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_negatives_are_never_read(kind, bad):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 4, generator=g).requires_grad_()
    target = torch.randn(4, 4, generator=g)
    is_pos = torch.tensor([True, False, False, False])
    ref = torch.tensor([[0.0, 0.0, 20.0, 30.0]]).repeat(4, 1)
    clean = L.box_regression_loss(pred, target, is_pos, None, kind, 1 / 9, ref)
    with torch.no_grad():
        pred_bad = pred.detach().clone()
        pred_bad[2, 1] = bad
    pred_bad.requires_grad_()
    target_bad = target.clone()
    target_bad[3] = bad  # torchvision's -inf targets of images without ground truth
    loss = L.box_regression_loss(pred_bad, target_bad, is_pos, None, kind, 1 / 9, ref)
    assert torch.equal(loss, clean)
    loss.backward()
    assert torch.isfinite(pred_bad.grad).all() and (pred_bad.grad[1:] == 0).all()
    if kind in ("smooth_l1", "l1"):  # the value stock computes, which never saw the negatives
        torch.testing.assert_close(loss, _stock_box_loss(pred.detach(), target, is_pos, kind))


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "giou"])
def test_non_finite_positive_is_non_finite_as_in_stock(kind):
    pred, target = torch.randn(4, 4), torch.randn(4, 4)
    pred[0, 0] = math.inf
    is_pos = torch.tensor([True, False, True, False])
    ref = torch.tensor([[0.0, 0.0, 20.0, 30.0]]).repeat(4, 1)
    assert not torch.isfinite(L.box_regression_loss(pred, target, is_pos, None, kind, 1 / 9, ref))
    if kind != "giou":
        assert not torch.isfinite(_stock_box_loss(pred, target, is_pos, kind))


def test_roi_head_with_inf_in_a_negatives_deltas_matches_stock():
    g = torch.Generator().manual_seed(0)
    n, classes = 16, 3
    logits = torch.randn(n, classes, generator=g)
    box = torch.randn(n, classes * 4, generator=g)
    labels = [torch.tensor([1, 2, 0, 0, 1, 0, 0, 0]), torch.zeros(8, dtype=torch.int64)]
    targets = [torch.randn(8, 4, generator=g), torch.full((8, 4), -math.inf)]  # image 2 has no ground truth
    box[3, 0:4] = math.inf  # a negative's deltas overflowed (fp16)
    model = tiny_model("faster", num_classes=classes, loss_cfg={})
    props = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(8, 1)] * 2
    cls_ours, box_ours = model.roi_heads.box_losses(logits, box, labels, targets, props)
    cls_stock, box_stock = fastrcnn_loss(logits, box, labels, targets)
    assert torch.isfinite(box_ours) and torch.isfinite(box_stock)
    torch.testing.assert_close(box_ours, box_stock)
    torch.testing.assert_close(cls_ours, cls_stock)


def test_rpn_with_inf_in_a_negative_anchor_matches_stock():
    from torchvision.models.detection.rpn import RegionProposalNetwork

    model = tiny_model("faster", loss_cfg={})
    stock = copy.deepcopy(model)
    stock.rpn.__class__ = RegionProposalNetwork
    n = 600
    g = torch.Generator().manual_seed(0)
    objectness, deltas = torch.randn(n, 1, generator=g), torch.randn(n, 4, generator=g)
    labels = [
        torch.cat([torch.ones(10), torch.zeros(200), -torch.ones(90)]),
        torch.cat([torch.zeros(210), -torch.ones(90)]),
    ]  # image 2 has no ground truth: no positive
    reg = [torch.randn(300, 4, generator=g), torch.full((300, 4), -math.inf)]
    deltas[150] = math.inf  # a negative anchor of image 1
    torch.manual_seed(0)
    ours = model.rpn.compute_loss(objectness, deltas, labels, reg)
    torch.manual_seed(0)
    theirs = stock.rpn.compute_loss(objectness, deltas, labels, reg)
    assert all(torch.isfinite(t) for t in ours)
    torch.testing.assert_close(ours[1], theirs[1])
    torch.testing.assert_close(ours[0], theirs[0])


# -- class_weight and any predictor ------------------------------------------------------------------
def test_class_weight_checked_at_forward_against_the_logits():
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    model = tiny_model("faster", num_classes=3, loss_cfg={"roi_head": {"class_weight": [1.0, 2.0, 3.0]}})
    model.roi_heads.box_predictor = FastRCNNPredictor(1024, 5)  # replaced after patching
    images, targets = make_targets("faster", [(64, 64)])
    with pytest.raises(ValueError, match="class_weight has 3 entries but the box predictor returns 5 class logits"):
        run_losses(model, images, targets)


class CustomPredictor(torch.nn.Module):
    """Not torchvision's: no cls_score attribute, same two outputs."""

    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(1024, num_classes * 5)
        self.num_classes = num_classes

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out[:, : self.num_classes], out[:, self.num_classes :]


def test_patch_model_with_a_custom_box_predictor():
    model = tiny_model("faster", num_classes=3)
    model.roi_heads.box_predictor = CustomPredictor(3)
    tv_lossfix.patch_model(model)  # the default config needs nothing of the predictor
    tv_lossfix.patch_model(model, {"roi_head": {"class_weight": [1.0, 1.0, 4.0], "cls_pos_weight": 2.0}})
    images, targets = make_targets("faster", [(64, 64), (64, 64)])
    losses = run_losses(model, images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    tv_lossfix.patch_model(model, {"roi_head": {"class_weight": [1.0, 1.0]}})
    with pytest.raises(ValueError, match="class_weight has 2 entries but the box predictor returns 3"):
        run_losses(model, images, targets)


# -- zero weights ------------------------------------------------------------------------------------
def test_zero_positive_weight_is_refused_zero_loss_weight_turns_a_term_off():
    with pytest.raises(LossConfigError, match=r"roi_head.cls_pos_weight must be a finite number > 0, got 0.0"):
        LossConfig.from_dict({"roi_head": {"cls_pos_weight": 0}})
    with pytest.raises(LossConfigError, match=r"rpn_head.cls_pos_weight must be a finite number > 0"):
        LossConfig.from_dict({"rpn_head": {"cls_pos_weight": 0.0}})
    model = tiny_model("mask", loss_cfg={"roi_head": {"loss_mask_weight": 0.0}})
    images, targets = make_targets("mask", [(64, 64), (64, 64)])
    losses = run_losses(model, images, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_mask"].requires_grad
    assert losses["loss_classifier"].item() > 0


# -- sync_avg_factor = max(mean over ranks(count), 1) -----------------------------------------------------
def _avg_factors_on(rank):
    from tv_lossfix._utils import avg_factor

    is_pos = torch.zeros(8, dtype=torch.bool)
    if rank == 1:
        is_pos[:5] = True  # rank 0 has no positive, rank 1 has 5
    none = torch.zeros(8, dtype=torch.bool)
    return {
        "positive": avg_factor("positive", is_pos, True).item(),
        "sampled": avg_factor("sampled", is_pos, True).item(),
        "none": avg_factor("positive", none, True).item(),
    }


def test_sync_avg_factor_is_max_of_mean_count_and_one():
    out = on_gloo_ranks(_avg_factors_on)
    assert out[0, "positive"] == out[1, "positive"] == 2.5  # clamping each rank first would give 3.0
    assert out[0, "sampled"] == out[1, "sampled"] == 8.0
    assert out[0, "none"] == out[1, "none"] == 1.0


def test_pyproject_floor_is_what_ci_tests():
    root = ROOT
    text = open(os.path.join(root, "pyproject.toml")).read()
    ci = open(os.path.join(root, ".ci", "run")).read()
    for pin in ("torch>=2.4", "torchvision>=0.19"):
        assert f'"{pin}' in text
    assert "torch==2.4.1" in ci and "torchvision==0.19.1" in ci
