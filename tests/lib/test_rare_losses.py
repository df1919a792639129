"""Rare-class levers: focal classification (both heads), class weights from counts, class-agnostic heads."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection as tvdet
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

import tv_lossfix
from tv_lossfix import LossConfig, LossConfigError
from tv_lossfix import losses as L
from tv_lossfix.builders import replace_predictors
from tv_lossfix.checkpoint import CheckpointError

from helpers import assert_scripted_matches_eager, make_targets, run_losses, tiny_model

FOCAL = {
    "rpn_head": {"cls_loss": "focal", "cls_pos_weight": 2.0, "cls_avg_factor": "sampled_per_image"},
    "roi_head": {"cls_loss": "focal", "focal_gamma": 1.5, "class_weight": [0.5, 1.0, 2.0], "cls_pos_weight": 3.0},
}
# gamma 0 without alpha: the focal losses reduce to the cross-entropy / BCE of the defaults.
FOCAL_AS_CE = {
    "rpn_head": {"cls_loss": "focal", "focal_gamma": 0, "focal_alpha": -1},
    "roi_head": {"cls_loss": "focal", "focal_gamma": 0},
}
SIZES = [(64, 64), (64, 80), (80, 64)]


# -- focal formulas ---------------------------------------------------------------------------------
def test_softmax_focal_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [1.0, -2.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    alpha = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    expected = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        expected.append(-alpha[y].item() * (1 - p) ** 2.0 * math.log(p))
    got = L.softmax_focal_loss(logits, labels, alpha, gamma=2.0)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    # gamma 0, no alpha: the cross-entropy, bit for bit.
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    assert torch.equal(L.softmax_focal_loss(logits.float(), labels, gamma=0.0), ce)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradients_finite_on_saturated_logits(gamma):
    # A margin of 200 makes p_t exactly 1 in float32: (1 - p_t)^gamma with gamma < 1 has an infinite slope there.
    logits = torch.tensor([[200.0, 0.0], [0.0, 200.0], [0.3, -0.2]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    L.softmax_focal_loss(logits, labels, gamma=gamma).sum().backward()
    assert torch.isfinite(logits.grad).all()
    x = torch.tensor([200.0, -200.0, 0.5], requires_grad=True)
    L.sigmoid_focal_loss(x, torch.tensor([1.0, 0.0, 1.0]), 0.25, gamma).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.0, 0.7), (0.5, -1.0), (0.0, -1.0)])
def test_sigmoid_focal_equals_torchvision_per_element(gamma, alpha):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, generator=g) * 4
    t = (torch.rand(500, generator=g) < 0.3).float()
    got = L.sigmoid_focal_loss(x, t, alpha, gamma)
    torch.testing.assert_close(got, tv_sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma), rtol=1e-5, atol=1e-7)
    if gamma == 0 and alpha < 0:
        assert torch.equal(got, F.binary_cross_entropy_with_logits(x, t, reduction="none"))


def _rpn_inputs(batch=2, anchors=2000):
    g = torch.Generator().manual_seed(1)
    labels = [torch.where(torch.rand(anchors, generator=g) < 0.03, 1.0, 0.0) for _ in range(batch)]
    labels[0][:50] = -1.0  # ignored anchors
    targets = [torch.randn(anchors, 4, generator=g) * 0.2 for _ in range(batch)]
    return (
        torch.randn(batch * anchors, 1, generator=g) * 3,
        torch.randn(batch * anchors, 4, generator=g),
        labels,
        targets,
    )


@pytest.mark.parametrize("avg", ["sampled", "sampled_per_image"])
def test_rpn_focal_is_torchvision_sum_over_avg_factor(avg):
    model = tiny_model(
        "faster", loss_cfg={"rpn_head": {"cls_loss": "focal", "cls_pos_weight": 2.0, "cls_avg_factor": avg}}
    )
    obj, deltas, labels, targets = _rpn_inputs()
    torch.manual_seed(5)
    pos, neg = model.rpn.fg_bg_sampler(labels)
    pos, neg = torch.cat(pos).bool(), torch.cat(neg).bool()
    torch.manual_seed(5)  # the same draw inside compute_loss
    loss_cls, _ = model.rpn.compute_loss(obj, deltas, labels, targets)
    sampled = pos | neg
    per = tv_sigmoid_focal_loss(obj.flatten()[sampled], pos[sampled].float(), alpha=0.25, gamma=2.0)
    per = torch.where(pos[sampled], per * 2.0, per)  # cls_pos_weight multiplies the positives' terms
    if avg == "sampled":
        factor = float(sampled.sum())
    else:
        p, n = pos.view(2, -1).sum(1).clamp(min=1), neg.view(2, -1).sum(1).clamp(min=1)
        factor = float((p + n).sum())
    torch.testing.assert_close(loss_cls, per.sum() / factor, rtol=1e-6, atol=0)


def test_roi_focal_through_the_head_by_hand():
    model = tiny_model("faster", loss_cfg=FOCAL)
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 3, (32,), generator=g) for _ in range(2)]
    targets = [torch.randn(32, 4, generator=g) for _ in range(2)]
    proposals = [torch.cat([xy := torch.rand(32, 2, generator=g) * 50, xy + 10], 1) for _ in range(2)]
    logits = torch.randn(64, 3, generator=g, requires_grad=True)
    loss_cls, _ = model.roi_heads.box_losses(logits, torch.randn(64, 12, generator=g), labels, targets, proposals)
    y = torch.cat(labels)
    p_t = torch.softmax(logits.double(), -1).gather(1, y[:, None])[:, 0]
    alpha = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[y]
    w = torch.where(y > 0, 3.0, 1.0).double()
    expected = (-alpha * w * (1 - p_t) ** 1.5 * p_t.log()).sum() / 64  # avg_factor: the sampled count
    torch.testing.assert_close(loss_cls.double(), expected, rtol=1e-6, atol=0)
    loss_cls.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["faster", "mask"])
@pytest.mark.parametrize("extra", [{}, {"cls_pos_weight": 2.0}], ids=["plain", "pos-weight"])
def test_focal_gamma0_equals_ce_and_bce_through_the_model(kind, extra):
    roi_extra = {**extra, "class_weight": [1.0, 0.5, 2.0]} if extra else {}
    base = tiny_model(kind)
    plain = tv_lossfix.patch_model(copy.deepcopy(base), {"rpn_head": dict(extra), "roi_head": dict(roi_extra)})
    focal = tv_lossfix.patch_model(
        copy.deepcopy(base),
        {"rpn_head": {**FOCAL_AS_CE["rpn_head"], **extra}, "roi_head": {**FOCAL_AS_CE["roi_head"], **roi_extra}},
    )
    images, targets = make_targets(kind, SIZES, empty=(2,))
    a = run_losses(plain, images, targets)
    b = run_losses(focal, images, targets)
    for key in ("loss_classifier", "loss_objectness"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7, msg=key)
    sum(b.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in focal.parameters() if p.grad is not None)


def test_focal_changes_the_loss_and_inference_is_unchanged():
    base = tiny_model("mask")
    base.roi_heads.detections_per_img = 20
    focal = tv_lossfix.patch_model(copy.deepcopy(base), FOCAL)
    images, targets = make_targets("mask", SIZES)
    a, b = run_losses(tv_lossfix.patch_model(copy.deepcopy(base)), images, targets), run_losses(focal, images, targets)
    assert b["loss_classifier"] != a["loss_classifier"] and b["loss_objectness"] != a["loss_objectness"]
    base.eval()
    focal.eval()
    with torch.no_grad():
        for da, db in zip(base(images), focal(images)):
            for k in da:
                assert torch.equal(da[k], db[k]), k


# -- config ------------------------------------------------------------------------------------------
def test_focal_config_defaults_and_errors():
    cfg = LossConfig.from_dict({"rpn_head": {"cls_loss": "focal"}, "roi_head": {"cls_loss": "focal"}})
    model = tiny_model("faster", loss_cfg=cfg)
    assert (model.rpn.focal_gamma, model.rpn.focal_alpha, model.roi_heads.focal_gamma) == (2.0, 0.25, 2.0)
    assert LossConfig().rpn_head.cls_loss == "bce" and LossConfig().roi_head.cls_loss == "ce"
    bad = [
        ({"roi_head": {"focal_gamma": 1.0}}, "roi_head.focal_gamma is set .* but roi_head.cls_loss is 'ce'"),
        ({"rpn_head": {"focal_gamma": 1.0}}, "rpn_head.focal_gamma is set .* but rpn_head.cls_loss is 'bce'"),
        ({"rpn_head": {"focal_alpha": 0.5}}, "rpn_head.focal_alpha is set .* but rpn_head.cls_loss is 'bce'"),
        ({"rpn_head": {"cls_loss": "focal", "focal_alpha": 0}}, r"rpn_head.focal_alpha must be in \(0, 1\), or -1"),
        ({"rpn_head": {"cls_loss": "focal", "focal_alpha": 1}}, r"rpn_head.focal_alpha must be in \(0, 1\), or -1"),
        ({"roi_head": {"cls_loss": "focal", "focal_gamma": -1}}, "roi_head.focal_gamma must be a finite number >= 0"),
        ({"roi_head": {"cls_loss": "bce"}}, "roi_head.cls_loss must be one of 'ce', 'focal'"),
        ({"rpn_head": {"cls_loss": "ce"}}, "rpn_head.cls_loss must be one of 'bce', 'focal'"),
        ({"roi_head": {"focal_alpha": 0.25}}, "'roi_head.focal_alpha': it is a rpn_head key only .*class_weight"),
    ]
    for data, message in bad:
        with pytest.raises(LossConfigError, match=message):
            LossConfig.from_dict(data)


AUTO_MESSAGE = (
    "roi_head.class_weight 'auto' is resolved by references/train.py from the training annotations; in your own "
    "code compute the list with tv_lossfix.class_weights_from_counts(counts) and pass it"
)


def test_class_weight_auto_is_refused_with_the_way_to_compute_it():
    cfg = {"roi_head": {"class_weight": "auto"}}
    for build in (
        lambda: LossConfig.from_dict(cfg),
        lambda: tv_lossfix.patch_model(tiny_model("faster"), cfg),
        lambda: tv_lossfix.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, loss_cfg=cfg),
    ):
        with pytest.raises(LossConfigError) as e:
            build()
        assert str(e.value) == AUTO_MESSAGE


# -- class weights from counts -------------------------------------------------------------------------
def test_class_weights_effective_number_by_hand():
    counts, beta = [1000, 100, 10], 0.99
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    expected = [1.0] + [3 * r / sum(raw) for r in raw]
    got = tv_lossfix.class_weights_from_counts(counts, beta=beta)
    assert got == pytest.approx(expected, rel=1e-12)
    assert sum(got[1:]) / 3 == pytest.approx(1.0) and got[3] > got[2] > got[1]
    # beta = 0: equal weights; the default beta 0.999 on counts 1 and 1e6
    assert tv_lossfix.class_weights_from_counts([5, 50_000], beta=0.0) == [1.0, 1.0, 1.0]
    d = tv_lossfix.class_weights_from_counts([1, 1_000_000])
    r = [1.0, (1 - 0.999) / (1 - 0.999**1_000_000)]
    assert d == pytest.approx([1.0] + [2 * x / sum(r) for x in r], rel=1e-12)


def test_class_weights_inverse_sqrt_and_zero_counts_by_hand():
    got = tv_lossfix.class_weights_from_counts([100, 25, 4], method="inverse_sqrt")
    raw = [1 / 10, 1 / 5, 1 / 2]
    assert got == pytest.approx([1.0] + [3 * r / sum(raw) for r in raw], rel=1e-12)
    # A class without objects is weighted as the rarest present class (here count 4).
    zero = tv_lossfix.class_weights_from_counts([100, 0, 4], method="inverse_sqrt")
    raw = [1 / 10, 1 / 2, 1 / 2]
    assert zero == pytest.approx([1.0] + [3 * r / sum(raw) for r in raw], rel=1e-12)
    assert tv_lossfix.class_weights_from_counts([7]) == [1.0, 1.0]
    assert tv_lossfix.class_weights_from_counts(torch.tensor([3, 9])) == tv_lossfix.class_weights_from_counts([3, 9])
    # The result is a valid class_weight for a model with K + 1 classes.
    tiny_model("faster", loss_cfg={"roi_head": {"class_weight": tv_lossfix.class_weights_from_counts([30, 2])}})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"counts": [3, -1]}, r"counts\[1\] must be a non-negative integer .*got -1"),
        ({"counts": [3, 2.5]}, r"counts\[1\] must be a non-negative integer .*got 2.5"),
        ({"counts": [True, 2]}, r"counts\[0\] must be a non-negative integer"),
        ({"counts": []}, "counts is empty"),
        ({"counts": [0, 0]}, "counts are all 0"),
        ({"counts": "12"}, "counts must be a list"),
        ({"counts": [1, 2], "beta": 1.0}, r"beta must be a number in \[0, 1\), got 1.0"),
        ({"counts": [1, 2], "beta": -0.1}, r"beta must be a number in \[0, 1\)"),
        ({"counts": [1, 2], "method": "inverse_sqrt", "beta": 0.9}, r"beta is the effective_number parameter"),
        ({"counts": [1, 2], "method": "inverse"}, "method must be one of 'effective_number', 'inverse_sqrt'"),
    ],
)
def test_class_weights_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        tv_lossfix.class_weights_from_counts(**kwargs)
    assert "\n" not in str(e.value)


# -- class-agnostic heads ------------------------------------------------------------------------------
class Tied(nn.Module):
    """A class-specific layer whose class slots all hold the shared layer's output (weights tied by sharing)."""

    def __init__(self, shared: nn.Module, num_classes: int):
        super().__init__()
        self.shared, self.num_classes = shared, num_classes

    def forward(self, x):
        y = self.shared(x)
        return y.repeat(1, self.num_classes, *([1] * (y.dim() - 2)))


def _agnostic_and_tied(kind: str, share: bool = True):
    """(class-agnostic patched model, stock torchvision model whose class slots all equal its one slot).

    ``share``: the stock layers reuse a copy of the agnostic layer (bit-identical outputs); else the agnostic
    rows are copied into each class's rows of plain layers (a 12-row GEMM rounds unlike a 4-row one).
    """
    stock = tiny_model(kind, num_classes=3)
    stock.roi_heads.detections_per_img = 20  # pasting 100 masks per image is most of a CPU test's time
    agnostic = tv_lossfix.patch_model(copy.deepcopy(stock), FOCAL)
    lines = tv_lossfix.make_class_agnostic(agnostic, bbox=True, mask=kind == "mask")
    with torch.no_grad():
        agnostic.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.05)  # boxes move visibly
    pairs = [(agnostic.roi_heads.box_predictor, stock.roi_heads.box_predictor, "bbox_pred")]
    if kind == "mask":
        pairs.append((agnostic.roi_heads.mask_predictor, stock.roi_heads.mask_predictor, "mask_fcn_logits"))
    for ours, theirs, name in pairs:
        layer = getattr(ours, name)
        if share:
            setattr(theirs, name, Tied(copy.deepcopy(layer), 3))
            continue
        with torch.no_grad():
            target = getattr(theirs, name)
            target.weight.copy_(layer.weight.repeat(3, *([1] * (layer.weight.dim() - 1))))
            target.bias.copy_(layer.bias.repeat(3))
    return agnostic, stock, lines


def test_make_class_agnostic_lines_shapes_and_init():
    model, _, lines = _agnostic_and_tied("mask")
    assert lines == [
        "roi_heads.box_predictor.bbox_pred (12 -> 4 outputs: class-agnostic, one box for every class)",
        "roi_heads.mask_predictor.mask_fcn_logits (3 -> 1 channel: class-agnostic; mask_predictor.conv5_mask kept)",
    ]
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1
    assert tv_lossfix.make_class_agnostic(model) == []  # already class-agnostic: kept, nothing re-initialised
    fresh = tiny_model("mask", loss_cfg={})
    conv5 = fresh.roi_heads.mask_predictor.conv5_mask.weight.clone()
    torch.manual_seed(0)
    tv_lossfix.make_class_agnostic(fresh, bbox=False)
    assert fresh.roi_heads.box_predictor.bbox_pred.out_features == 12
    assert torch.equal(fresh.roi_heads.mask_predictor.conv5_mask.weight, conv5)
    w = fresh.roi_heads.mask_predictor.mask_fcn_logits.weight  # kaiming fan_out: std sqrt(2 / (1 * 1 * 1))
    assert w.shape == (1, 256, 1, 1) and 1.0 < w.std().item() < 2.0
    # Zero bias, as the class-count replacement of replace_predictors (one initialiser for both).
    assert torch.equal(fresh.roi_heads.mask_predictor.mask_fcn_logits.bias, torch.zeros(1))


def test_make_class_agnostic_refusals_leave_the_model_as_it_was():
    faster = tiny_model("faster", loss_cfg={})
    with pytest.raises(TypeError, match="the model has no mask branch: pass mask=False"):
        tv_lossfix.make_class_agnostic(faster)
    assert faster.roi_heads.box_predictor.bbox_pred.out_features == 12  # bbox untouched by the refused call
    assert len(tv_lossfix.make_class_agnostic(faster, mask=False)) == 1
    with pytest.raises(TypeError, match=r"call tv_lossfix.patch_model\(model\) first"):
        tv_lossfix.make_class_agnostic(tiny_model("faster"), mask=False)


@pytest.mark.parametrize("share", [True, False], ids=["shared-layer", "copied-rows"])
@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_class_agnostic_inference_equals_tied_class_specific_torchvision(kind, share):
    agnostic, stock, _ = _agnostic_and_tied(kind, share)
    images, _ = make_targets(kind, SIZES)
    agnostic.eval()
    stock.eval()
    with torch.no_grad():
        got, expected = agnostic(images), stock(images)
    assert sum(len(d["boxes"]) for d in expected) > 0
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for k in b:
            if share:
                assert torch.equal(a[k], b[k]), k
            else:  # GEMM rounding only: labels and scores (same classifier) exact, boxes to float precision
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-4 if k == "boxes" else 0, msg=k)


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_class_agnostic_training_losses_equal_tied_class_specific(kind):
    agnostic, stock, _ = _agnostic_and_tied(kind, share=True)
    tied = tv_lossfix.patch_model(stock, FOCAL)
    images, targets = make_targets(kind, SIZES, empty=(1,))
    a, b = run_losses(agnostic, images, targets), run_losses(tied, images, targets)
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), k
    # With rows copied instead of shared, the one row's gradient is the sum of the class rows' gradients.
    agnostic, stock, _ = _agnostic_and_tied(kind, share=False)
    tied = tv_lossfix.patch_model(stock, FOCAL)
    a, b = run_losses(agnostic, images, targets), run_losses(tied, images, targets)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    sum(a.values()).backward()
    sum(b.values()).backward()
    shared = agnostic.roi_heads.box_predictor.bbox_pred.weight.grad
    per_class = tied.roi_heads.box_predictor.bbox_pred.weight.grad.view(3, 4, -1).sum(0)
    assert shared.abs().sum() > 0
    torch.testing.assert_close(shared, per_class, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_scripted_focal_and_class_agnostic_match_eager(kind):
    model, _, _ = _agnostic_and_tied(kind)
    scripted = torch.jit.script(model)
    images, targets = make_targets(kind, SIZES, empty=(1,))
    assert_scripted_matches_eager(model, scripted, images, targets)


# -- builders ---------------------------------------------------------------------------------------------
def test_builder_class_agnostic_keywords():
    with pytest.raises(TypeError, match=r"fasterrcnn_resnet50_fpn\(\) got class_agnostic_mask=True but a FasterRCNN"):
        tv_lossfix.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, class_agnostic_mask=True)
    with pytest.raises(TypeError, match="class_agnostic_bbox must be True or False, got 1"):
        tv_lossfix.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, class_agnostic_bbox=1)
    model = tv_lossfix.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4, class_agnostic_bbox=True, class_agnostic_mask=True
    )
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


def test_fine_tune_class_agnostic_from_class_specific_checkpoint(tmp_path, caplog):
    torch.manual_seed(0)
    src = tvdet.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    path = tmp_path / "specific.pth"
    state = src.state_dict()
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="tv_lossfix.builders"):
        model = tv_lossfix.maskrcnn_resnet50_fpn(weights=str(path), class_agnostic_bbox=True, class_agnostic_mask=True)
    assert [r.getMessage() for r in caplog.records] == [
        "maskrcnn_resnet50_fpn: re-initialised roi_heads.box_predictor.bbox_pred (20 -> 4 outputs: class-agnostic, "
        "one box for every class)",
        "maskrcnn_resnet50_fpn: re-initialised roi_heads.mask_predictor.mask_fcn_logits (5 -> 1 channel: "
        "class-agnostic; mask_predictor.conv5_mask kept)",
    ]
    new = model.state_dict()
    reinit = {k for k in new if "roi_heads.box_predictor.bbox_pred" in k or ".mask_fcn_logits." in k}
    assert len(reinit) == 4 and all(new[k].shape != state[k].shape for k in reinit)
    assert all(torch.equal(v, state[k]) for k, v in new.items() if k not in reinit)  # cls_score, conv5_mask kept

    # The class-agnostic checkpoint loads back whole, but only when asked for class-agnostic heads.
    agnostic_path = tmp_path / "agnostic.pth"
    torch.save(new, agnostic_path)
    with pytest.raises(
        CheckpointError, match="agnostic.pth has a class-agnostic bbox_pred .*pass class_agnostic_bbox=True"
    ):
        tv_lossfix.maskrcnn_resnet50_fpn(weights=str(agnostic_path))
    with pytest.raises(CheckpointError, match="class-agnostic mask_fcn_logits .*pass class_agnostic_mask=True"):
        tv_lossfix.maskrcnn_resnet50_fpn(weights=str(agnostic_path), class_agnostic_bbox=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tv_lossfix.builders"):
        again = tv_lossfix.maskrcnn_resnet50_fpn(
            weights=str(agnostic_path), class_agnostic_bbox=True, class_agnostic_mask=True
        )
    assert caplog.records == []  # nothing re-initialised
    assert all(torch.equal(v, new[k]) for k, v in again.state_dict().items())


def test_replace_predictors_keeps_class_agnostic_layers_when_the_class_count_changes():
    model = tiny_model("mask", loss_cfg={})
    tv_lossfix.make_class_agnostic(model)
    box = model.roi_heads.box_predictor.bbox_pred.weight.clone()
    mask = model.roi_heads.mask_predictor.mask_fcn_logits.weight.clone()
    lines = replace_predictors(model, 6, class_agnostic_bbox=True, class_agnostic_mask=True)
    assert lines == ["roi_heads.box_predictor.cls_score (3 -> 6 classes; class-agnostic bbox_pred kept)"]
    assert torch.equal(model.roi_heads.box_predictor.bbox_pred.weight, box)
    assert torch.equal(model.roi_heads.mask_predictor.mask_fcn_logits.weight, mask)
    assert model.roi_heads.box_predictor.cls_score.out_features == 6
    images, targets = make_targets("mask", SIZES, num_classes=6)
    assert torch.isfinite(sum(run_losses(model, images, targets).values()))
