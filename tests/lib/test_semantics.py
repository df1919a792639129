"""What each config key does to a real model's losses (same weights, inputs and RNG seed)."""

import pytest
import torch

import tv_lossfix

from helpers import make_targets, run_losses, tiny_model

SIZES = [(64, 80), (72, 64), (64, 64)]


def losses_with(cfg, kind="mask", empty=(), seed=123):
    model = tiny_model(kind, loss_cfg=cfg)
    images, targets = make_targets(kind, SIZES, empty=empty)
    out = run_losses(model, images, targets, seed=seed)
    return {k: v.item() for k, v in out.items()}, tv_lossfix.training_stats(model)


@pytest.mark.parametrize(
    "section,key,loss_name",
    [
        ("rpn_head", "loss_cls_weight", "loss_objectness"),
        ("rpn_head", "loss_bbox_weight", "loss_rpn_box_reg"),
        ("roi_head", "loss_cls_weight", "loss_classifier"),
        ("roi_head", "loss_bbox_weight", "loss_box_reg"),
        ("roi_head", "loss_mask_weight", "loss_mask"),
    ],
)
def test_component_weight_scales_only_its_term(section, key, loss_name):
    base, _ = losses_with({})
    scaled, _ = losses_with({section: {key: 2.5}})
    for name in base:
        factor = 2.5 if name == loss_name else 1.0
        assert scaled[name] == pytest.approx(base[name] * factor, rel=1e-6), name


@pytest.mark.parametrize("section,loss_name", [("rpn_head", "loss_objectness"), ("roi_head", "loss_classifier")])
def test_cls_pos_weight_is_linear_with_count_normalizer(section, loss_name):
    # loss(w) = (sum_neg + w * sum_pos) / S: linear in w only if the normalizer is a count.
    # (A weight of 0 is refused, so the line is checked through w = 1, 2, 4.)
    l1, _ = losses_with({section: {"cls_pos_weight": 1.0}})
    l2, _ = losses_with({section: {"cls_pos_weight": 2.0}})
    l4, _ = losses_with({section: {"cls_pos_weight": 4.0}})
    step = l2[loss_name] - l1[loss_name]  # sum_pos / S
    assert step > 0  # positives contributed
    assert l4[loss_name] == pytest.approx(l1[loss_name] + 3.0 * step, rel=1e-5)


def test_class_weight_is_per_sample_and_linear():
    parts = [
        losses_with({"roi_head": {"class_weight": w}})[0]["loss_classifier"] for w in ([1, 0, 0], [0, 1, 0], [0, 0, 1])
    ]
    mixed, _ = losses_with({"roi_head": {"class_weight": [0.5, 2.0, 3.0]}})
    assert mixed["loss_classifier"] == pytest.approx(0.5 * parts[0] + 2.0 * parts[1] + 3.0 * parts[2], rel=1e-5)
    ones, _ = losses_with({"roi_head": {"class_weight": [1, 1, 1]}})
    base, _ = losses_with({})
    assert ones["loss_classifier"] == pytest.approx(base["loss_classifier"], rel=1e-6)


@pytest.mark.parametrize(
    "section,loss_name,stat", [("rpn_head", "loss_rpn_box_reg", "rpn"), ("roi_head", "loss_box_reg", "roi")]
)
def test_positive_normalization(section, loss_name, stat):
    base, s_base = losses_with({})
    pos, s_pos = losses_with({section: {"bbox_avg_factor": "positive"}})
    sampled = s_base[f"{stat}/bbox_avg_factor"].item()
    num_pos = s_pos[f"{stat}/bbox_avg_factor"].item()
    assert num_pos == pytest.approx(s_pos[f"{stat}/pos_per_image"].item() * len(SIZES))
    assert sampled > num_pos >= 1
    assert pos[loss_name] == pytest.approx(base[loss_name] * sampled / num_pos, rel=1e-5)


def test_mmdetection_preset_rpn_normalizer():
    _, stats = losses_with("mmdetection", empty=(1,))
    # One image has no gt: max(0, 1) counts 1 positive for it.
    n_img = len(SIZES)
    pos = stats["rpn/pos_per_image"].item() * n_img
    neg = stats["rpn/neg_per_image"].item() * n_img
    assert stats["rpn/cls_avg_factor"].item() == pytest.approx(pos + neg + 1)


@pytest.mark.parametrize("bbox_loss", ["smooth_l1", "l1", "giou", "diou", "ciou"])
def test_every_bbox_loss_trains(bbox_loss):
    model = tiny_model("mask", loss_cfg={"rpn_head": {"bbox_loss": bbox_loss}, "roi_head": {"bbox_loss": bbox_loss}})
    images, targets = make_targets("mask", SIZES, empty=(2,))
    out = run_losses(model, images, targets)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss_box_reg"].item() > 0 and out["loss_rpn_box_reg"].item() > 0
    sum(out.values()).backward()
    grad = model.roi_heads.box_predictor.bbox_pred.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_smooth_l1_beta_zero_equals_l1():
    a, _ = losses_with({"roi_head": {"smooth_l1_beta": 0.0}})
    b, _ = losses_with({"roi_head": {"bbox_loss": "l1"}})
    assert a["loss_box_reg"] == pytest.approx(b["loss_box_reg"], rel=1e-6)


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_zero_positives_every_parameter_gets_a_gradient(kind):
    model = tiny_model(kind, loss_cfg={"roi_head": {"bbox_loss": "giou", "cls_pos_weight": 2.0}})
    images, targets = make_targets(kind, SIZES, empty=(0, 1, 2))
    out = run_losses(model, images, targets)
    assert out["loss_box_reg"].item() == 0.0 and out["loss_rpn_box_reg"].item() == 0.0
    if kind == "mask":
        assert out["loss_mask"].item() == 0.0
    sum(out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP would hang on any of these
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_training_stats_are_detached_and_consistent():
    _, stats = losses_with({}, empty=(1,))
    assert set(stats) == {
        "rpn/pos_per_image",
        "rpn/neg_per_image",
        "rpn/cls_avg_factor",
        "rpn/bbox_avg_factor",
        "roi/pos_per_image",
        "roi/neg_per_image",
        "roi/cls_avg_factor",
        "roi/bbox_avg_factor",
        "roi/fg_prob",
    }
    assert all(not v.requires_grad for v in stats.values())
    n = len(SIZES)
    assert stats["rpn/cls_avg_factor"].item() == pytest.approx(
        (stats["rpn/pos_per_image"].item() + stats["rpn/neg_per_image"].item()) * n
    )
    assert 0.0 <= stats["roi/fg_prob"].item() <= 1.0
