"""The loss path reads nothing back to the host: counted with torch.profiler (what syncs on a GPU)."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torchvision.models.detection.roi_heads import fastrcnn_loss

import tv_lossfix

from helpers import tiny_model

ALL_ON = {
    "rpn_head": {
        "cls_pos_weight": 2.0,
        "cls_avg_factor": "sampled_per_image",
        "bbox_avg_factor": "positive",
        "bbox_loss": "ciou",
    },
    "roi_head": {
        "cls_pos_weight": 3.0,
        "class_weight": [0.5, 1.0, 2.0],
        "bbox_avg_factor": "positive",
        "bbox_loss": "giou",
        "loss_cls_weight": 2.0,
    },
}
# The rare-class levers: focal classification in both heads (class_weight as the softmax focal alpha).
FOCAL_ON = {
    "rpn_head": {"cls_loss": "focal", "focal_gamma": 1.5, "cls_pos_weight": 2.0, "cls_avg_factor": "sampled_per_image"},
    "roi_head": {"cls_loss": "focal", "class_weight": [0.5, 1.0, 2.0], "cls_pos_weight": 3.0, "bbox_loss": "giou"},
}


def host_reads(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return names.count("aten::_local_scalar_dense"), names.count("aten::nonzero")


def rpn_inputs(batch=2, anchors=3000):
    g = torch.Generator().manual_seed(0)
    labels = [torch.where(torch.rand(anchors, generator=g) < 0.02, 1.0, 0.0) for _ in range(batch)]
    targets = [torch.randn(anchors, 4, generator=g) * 0.2 for _ in range(batch)]
    xy = torch.rand(anchors, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 10], 1)
    obj = torch.randn(batch * anchors, 1, generator=g)
    deltas = torch.randn(batch * anchors, 4, generator=g) * 0.2
    return obj, deltas, labels, targets, [boxes] * batch


@pytest.mark.parametrize("box_outputs", [12, 4], ids=["class-specific", "class-agnostic"])
@pytest.mark.parametrize("cfg", [{}, ALL_ON, FOCAL_ON], ids=["defaults", "all-options", "focal"])
def test_box_head_loss_has_no_host_read(cfg, box_outputs):
    model = tiny_model("faster", loss_cfg=cfg)
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 3, (64,), generator=g) for _ in range(2)]
    targets = [torch.randn(64, 4, generator=g) for _ in range(2)]
    proposals = [torch.cat([xy := torch.rand(64, 2, generator=g) * 50, xy + 10], 1) for _ in range(2)]
    logits, box = torch.randn(128, 3, requires_grad=True), torch.randn(128, box_outputs, requires_grad=True)
    ours = host_reads(lambda: sum(model.roi_heads.box_losses(logits, box, labels, targets, proposals)).backward())
    assert ours == (0, 0)
    if box_outputs == 12:
        stock = host_reads(lambda: sum(fastrcnn_loss(logits, box, labels, targets)).backward())
        assert stock == (0, 1)  # torchvision's torch.where(labels > 0)


def test_focal_and_class_agnostic_training_step_reads_as_much_as_the_default():
    from helpers import make_targets

    default = tiny_model("mask", loss_cfg={})
    ours = tv_lossfix.patch_model(copy.deepcopy(default), FOCAL_ON)
    tv_lossfix.make_class_agnostic(ours)
    images, targets = make_targets("mask", [(64, 64), (64, 80)], empty=(1,))

    def step(model):
        model.train()
        torch.manual_seed(0)
        sum(model(images, targets).values()).backward()

    assert host_reads(lambda: step(ours)) == host_reads(lambda: step(default))


@pytest.mark.parametrize("cfg", [{}, ALL_ON, FOCAL_ON], ids=["defaults", "all-options", "focal"])
def test_rpn_loss_reads_less_than_stock(cfg):
    stock = tiny_model("faster")
    ours = tv_lossfix.patch_model(copy.deepcopy(stock), cfg)
    obj, deltas, labels, targets, anchors = rpn_inputs()
    s_item, s_nz = host_reads(lambda: stock.rpn.compute_loss(obj, deltas, labels, targets))
    o_item, o_nz = host_reads(lambda: ours.rpn.compute_loss(obj, deltas, labels, targets, anchors))
    # Both share torchvision's sampler; the loss itself does one nonzero instead of two.
    assert o_item <= s_item
    assert o_nz == s_nz - 1


SAMPLING_ON = {
    "cap": {"rpn_head": {"neg_pos_ub": 2}, "roi_head": {"neg_pos_ub": 1}},
    "ohem": {"roi_head": {"sampler": "ohem"}},
    "ohem+cap": {"rpn_head": {"neg_pos_ub": 2}, "roi_head": {"neg_pos_ub": 1, "sampler": "ohem"}},
}


@pytest.mark.parametrize("name", list(SAMPLING_ON))
def test_sampling_options_read_no_more_than_the_stock_sampler(name):
    # A whole training step: the negative cap makes the stock sampler's reads (two nonzero per
    # image), OHEM one nonzero per image fewer (its kept indices are sorted, not found by nonzero).
    # This model pools one feature level; with an FPN, OHEM's extra box-head pass also makes
    # MultiScaleRoIAlign's own per-level lookups (one nonzero per level), as any RoI pooling does.
    from helpers import make_targets

    default = tiny_model("mask", loss_cfg={})
    ours = tv_lossfix.patch_model(copy.deepcopy(default), SAMPLING_ON[name])
    images, targets = make_targets("mask", [(64, 64), (64, 80)], empty=(1,))

    def step(model):
        model.train()
        torch.manual_seed(0)
        sum(model(images, targets).values()).backward()

    d_item, d_nz = host_reads(lambda: step(default))
    o_item, o_nz = host_reads(lambda: step(ours))
    assert o_item == d_item
    assert o_nz == d_nz - (len(images) if "ohem" in name else 0)


def test_capped_and_ohem_selection_read_no_more_than_the_stock_sampler():
    from torchvision.models.detection.roi_heads import RoIHeads

    from tv_lossfix.sampling import hard_examples

    heads = tiny_model("faster", loss_cfg={"roi_head": {"neg_pos_ub": 1}}).roi_heads
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(-1, 3, (300,), generator=g) for _ in range(3)]
    losses = [torch.rand(300, generator=g) for _ in range(3)]
    stock = host_reads(lambda: RoIHeads.subsample(heads, labels))  # torchvision's, on the stock sampler
    capped = host_reads(lambda: heads.subsample(labels))
    ohem = host_reads(lambda: [hard_examples(loss, lab, 64, 0.25, 1.0) for loss, lab in zip(losses, labels)])
    assert stock == capped == (0, 3 * len(labels))
    assert ohem == (0, 2 * len(labels))


# The long-tail classifiers (tv_lossfix.cls_losses): the federated draw, Seesaw's counts and EQLv2's
# statistics are updated on the device too. (EQLv2's all-reduce is the identity outside DDP.)
LONG_TAIL = {
    "sigmoid": {"cls_loss": "sigmoid"},
    "federated": {"cls_loss": "federated", "fed_image_counts": [40, 3], "fed_num_classes": 2},
    "seesaw": {"cls_loss": "seesaw", "cosine_classifier": True},
    "eqlv2": {"cls_loss": "eqlv2"},
}


@pytest.mark.parametrize("roi", list(LONG_TAIL.values()), ids=list(LONG_TAIL))
def test_long_tail_box_head_loss_has_no_host_read(roi):
    model = tiny_model("faster", loss_cfg={"roi_head": {**roi, "cls_pos_weight": 2.0}})
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 3, (64,), generator=g) for _ in range(2)]
    targets = [torch.randn(64, 4, generator=g) for _ in range(2)]
    proposals = [torch.cat([xy := torch.rand(64, 2, generator=g) * 50, xy + 10], 1) for _ in range(2)]
    width = 3 + model.roi_heads.extra_outputs
    logits, box = torch.randn(128, width, requires_grad=True), torch.randn(128, 12, requires_grad=True)
    ours = host_reads(lambda: sum(model.roi_heads.box_losses(logits, box, labels, targets, proposals)).backward())
    assert ours == (0, 0)
