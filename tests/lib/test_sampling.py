"""Assigner and sampler keys (pos_iou_thr, neg_iou_thr, num, pos_fraction, neg_pos_ub, OHEM)."""

import re

import pytest
import torch
import yaml
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

import tv_lossfix
from tv_lossfix import LossConfig, LossConfigError
from tv_lossfix.sampling import TORCHVISION_KWARGS, hard_examples, num_negatives, sample_with_neg_cap

from helpers import make_targets, patched_copy, run_losses, sampling_settings, tiny_model

SAMPLING = {
    "rpn_head": {"pos_iou_thr": 0.6, "neg_iou_thr": 0.2, "num": 128, "pos_fraction": 0.25, "neg_pos_ub": 3},
    "roi_head": {
        "pos_iou_thr": 0.6,
        "neg_iou_thr": 0.4,
        "num": 64,
        "pos_fraction": 0.5,
        "neg_pos_ub": 1.5,
        "sampler": "ohem",
    },
}
# torchvision's defaults, written out.
TORCHVISION_VALUES = {
    "rpn_head": {"pos_iou_thr": 0.7, "neg_iou_thr": 0.3, "num": 256, "pos_fraction": 0.5, "neg_pos_ub": -1},
    "roi_head": {
        "pos_iou_thr": 0.5,
        "neg_iou_thr": 0.5,
        "num": 512,
        "pos_fraction": 0.25,
        "neg_pos_ub": -1,
        "sampler": "random",
    },
}


def expected(cfg):
    """What sampling_settings() reads after ``cfg``: torchvision keeps low-quality matches in the RPN only."""
    out = {}
    for sec, low_quality in (("rpn_head", True), ("roi_head", False)):
        c = dict(cfg[sec])
        c.pop("sampler", None)
        out[sec] = {"neg_pos_ub": -1.0, **c, "low_quality": low_quality}
    return out


# -- config -----------------------------------------------------------------------------------------
def test_keys_from_dict_and_yaml(tmp_path):
    cfg = LossConfig.from_dict(SAMPLING)
    for sec in ("rpn_head", "roi_head"):
        for key, value in SAMPLING[sec].items():
            assert getattr(getattr(cfg, sec), key) == value, (sec, key)
    assert cfg.to_dict()["roi_head"]["sampler"] == "ohem"
    bare, full = tmp_path / "bare.yaml", tmp_path / "full.yaml"
    bare.write_text(yaml.safe_dump(SAMPLING))
    full.write_text(yaml.safe_dump({"model": {"num_classes": 3, **SAMPLING}, "training": {"epochs": 1}}))
    assert LossConfig.from_yaml(bare) == cfg == LossConfig.from_yaml(full)
    assert LossConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults_keep_the_models_values():
    d = LossConfig().to_dict()
    keys = ("pos_iou_thr", "neg_iou_thr", "num", "pos_fraction", "neg_pos_ub")
    for sec in ("rpn_head", "roi_head"):
        assert {k: d[sec][k] for k in keys} == {**dict.fromkeys(keys), "neg_pos_ub": -1}
    assert d["roi_head"]["sampler"] == "random" and d["rpn_head"]["feat_channels"] is None


@pytest.mark.parametrize("sec", ["rpn_head", "roi_head"])
def test_guide_aliases_map_to_one_canonical_key(sec):
    cfg = LossConfig.from_dict({sec: {"num_samples": 100, "pos_ratio": 0.3, "num_neg_ratio": 2}})
    head = getattr(cfg, sec)
    assert (head.num, head.pos_fraction, head.neg_pos_ub) == (100, 0.3, 2)
    out = cfg.to_dict()[sec]
    assert not {"num_samples", "pos_ratio", "num_neg_ratio"} & set(out)
    assert cfg == LossConfig.from_dict({sec: {"num": 100, "pos_fraction": 0.3, "neg_pos_ub": 2}})


@pytest.mark.parametrize(
    "alias,canonical", [("num_samples", "num"), ("pos_ratio", "pos_fraction"), ("num_neg_ratio", "neg_pos_ub")]
)
def test_alias_and_canonical_key_together_is_an_error(alias, canonical):
    with pytest.raises(LossConfigError) as e:
        LossConfig.from_dict({"roi_head": {alias: 1, canonical: 1}})
    assert f"roi_head.{alias} and roi_head.{canonical} are the same setting" in str(e.value)


@pytest.mark.parametrize(
    "sec,key,value,message",
    [
        ("rpn_head", "pos_iou_thr", 1.5, r"rpn_head.pos_iou_thr must be in \[0.0, 1.0\], got 1.5"),
        ("roi_head", "neg_iou_thr", -0.1, r"roi_head.neg_iou_thr must be in \[0.0, 1.0\], got -0.1"),
        ("roi_head", "pos_iou_thr", "high", r"roi_head.pos_iou_thr must be a number, got str 'high'"),
        ("rpn_head", "pos_fraction", 0, r"rpn_head.pos_fraction must be in \(0.0, 1.0\], got 0"),
        ("roi_head", "pos_fraction", 1.01, r"roi_head.pos_fraction must be in \(0.0, 1.0\], got 1.01"),
        ("rpn_head", "num", 0, r"rpn_head.num must be an integer >= 1, got 0"),
        ("roi_head", "num", 64.0, r"roi_head.num must be an integer >= 1, got 64.0"),
        ("roi_head", "num", True, r"roi_head.num must be an integer >= 1, got True"),
        ("rpn_head", "neg_pos_ub", -0.5, r"rpn_head.neg_pos_ub must be -1 \(no cap\) or a number > 0, got -0.5"),
        ("roi_head", "neg_pos_ub", float("inf"), r"roi_head.neg_pos_ub must be -1 \(no cap\) or a number > 0"),
        ("roi_head", "neg_pos_ub", 0, r"roi_head.neg_pos_ub 0 samples no negative: the classifier never sees"),
        (
            "roi_head",
            "sampler",
            "ohm",
            r"roi_head.sampler must be one of 'random', 'ohem', got 'ohm'; did you mean 'ohem'",
        ),
        ("rpn_head", "feat_channels", 0, r"rpn_head.feat_channels must be an integer >= 1, got 0"),
        (
            "roi_head",
            "pos_ratio",
            2,
            r"roi_head.pos_fraction must be in \(0.0, 1.0\], got 2 \(given as roi_head.pos_ratio\)",
        ),
    ],
)
def test_invalid_values_name_the_key(sec, key, value, message):
    with pytest.raises(LossConfigError, match=message):
        LossConfig.from_dict({sec: {key: value}})


def test_threshold_order_and_head_only_keys():
    with pytest.raises(LossConfigError, match=r"roi_head.neg_iou_thr \(0.6\) must be <= roi_head.pos_iou_thr \(0.5\)"):
        LossConfig.from_dict({"roi_head": {"pos_iou_thr": 0.5, "neg_iou_thr": 0.6}})
    # Named as the other head's key, not "did you mean 'rpn_head.num_samples'".
    with pytest.raises(LossConfigError, match=r"^unknown key 'rpn_head.sampler': it is a roi_head key only \(OHEM"):
        LossConfig.from_dict({"rpn_head": {"sampler": "ohem"}})
    with pytest.raises(LossConfigError, match="^unknown key 'roi_head.feat_channels': it is a rpn_head key only$"):
        LossConfig.from_dict({"roi_head": {"feat_channels": 256}})
    with pytest.raises(LossConfigError, match="^unknown key 'model.rpn_head.class_weight': it is a roi_head key only"):
        LossConfig.from_dict({"model": {"rpn_head": {"class_weight": [1.0, 2.0]}}})


# -- patch_model and builders -----------------------------------------------------------------------
def test_patch_model_sets_matcher_sampler_and_cap():
    model = tiny_model("faster", loss_cfg=SAMPLING)
    assert sampling_settings(model) == expected(SAMPLING)
    assert model.roi_heads.sampler == "ohem"
    again = tv_lossfix.patch_model(model, {"roi_head": {"num": 32}})  # None keeps what the model has now
    assert sampling_settings(again)["roi_head"]["num"] == 32
    assert sampling_settings(again)["roi_head"]["pos_iou_thr"] == 0.6 and again.roi_heads.sampler == "random"


def test_none_keeps_the_models_own_objects():
    stock = tiny_model("faster")
    rpn_m, rpn_s, roi_m, roi_s = (
        stock.rpn.proposal_matcher,
        stock.rpn.fg_bg_sampler,
        stock.roi_heads.proposal_matcher,
        stock.roi_heads.fg_bg_sampler,
    )
    ours = tv_lossfix.patch_model(stock, {"rpn_head": {"neg_pos_ub": 2}})
    assert ours.rpn.proposal_matcher is rpn_m and ours.rpn.fg_bg_sampler is rpn_s
    assert ours.roi_heads.proposal_matcher is roi_m and ours.roi_heads.fg_bg_sampler is roi_s
    # tiny_model is built with 64 samples per image for both heads: a fine-tuner's value is kept.
    assert sampling_settings(ours)["rpn_head"]["num"] == 64 and sampling_settings(ours)["roi_head"]["num"] == 64


def test_only_one_threshold_is_checked_against_the_models():
    model = tiny_model("faster")  # RoI thresholds 0.5 / 0.5
    with pytest.raises(
        LossConfigError, match=r"roi_head.neg_iou_thr: neg_iou_thr \(0.6\) must be <= pos_iou_thr \(0.5\)"
    ):
        tv_lossfix.patch_model(model, {"roi_head": {"neg_iou_thr": 0.6}})
    assert type(model.roi_heads) is not tv_lossfix.LossFixRoIHeads  # refused before anything changed
    with pytest.raises(
        LossConfigError, match=r"rpn_head.pos_iou_thr: neg_iou_thr \(0.3\) must be <= pos_iou_thr \(0.2\)"
    ):
        tv_lossfix.patch_model(model, {"rpn_head": {"pos_iou_thr": 0.2}})
    tv_lossfix.patch_model(model, {"roi_head": {"pos_iou_thr": 0.7}})
    assert (model.roi_heads.proposal_matcher.high_threshold, model.roi_heads.proposal_matcher.low_threshold) == (
        0.7,
        0.5,
    )


@pytest.mark.parametrize(
    "sec,keys,given",
    [
        ("roi_head", {"pos_fraction": 0.01}, "roi_head.pos_fraction"),  # int(64 x 0.01) = 0
        ("roi_head", {"num": 3}, "roi_head.num"),  # int(3 x 0.25) = 0
        ("rpn_head", {"num": 1, "pos_fraction": 0.5}, "rpn_head.num / rpn_head.pos_fraction"),
    ],
)
def test_a_sampler_without_positives_is_refused(sec, keys, given):
    model = tiny_model("faster")  # 64 samples per image, RoI fraction 0.25, RPN 0.5
    with pytest.raises(LossConfigError, match=rf"^{re.escape(given)}: num \d+ x pos_fraction [\d.]+ leaves int"):
        tv_lossfix.patch_model(model, {sec: keys})
    assert type(model.roi_heads) is not tv_lossfix.LossFixRoIHeads  # refused before anything changed
    tv_lossfix.patch_model(model, {"roi_head": {"num": 4}})  # int(4 x 0.25) = 1: accepted


def test_feat_channels_accepted_only_when_it_is_the_backbones():
    model = tiny_model("faster")  # backbone.out_channels = 16
    tv_lossfix.patch_model(model, {"rpn_head": {"feat_channels": 16}})
    with pytest.raises(LossConfigError) as e:
        tv_lossfix.patch_model(model, {"rpn_head": {"feat_channels": 256}})
    assert str(e.value) == (
        "rpn_head.feat_channels=256 does not match the model: torchvision's RPNHead uses the backbone's "
        "out_channels (16); drop the key or give that value"
    )


BUILDER_VALUES = {
    "rpn_fg_iou_thresh": 0.65,
    "rpn_bg_iou_thresh": 0.25,
    "rpn_batch_size_per_image": 128,
    "rpn_positive_fraction": 0.4,
    "box_fg_iou_thresh": 0.55,
    "box_bg_iou_thresh": 0.45,
    "box_batch_size_per_image": 96,
    "box_positive_fraction": 0.3,
}
BUILDER_CFG = {"rpn_head": {}, "roi_head": {}}
for _kwarg, (_sec, _key) in TORCHVISION_KWARGS.items():
    BUILDER_CFG[_sec][_key] = BUILDER_VALUES[_kwarg]


def _build(**kw):
    return tv_lossfix.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3, **kw)


@pytest.mark.parametrize("path", ["kwargs", "loss_cfg", "both"])
def test_builder_paths_reach_the_heads(path):
    kw = {
        "kwargs": BUILDER_VALUES,
        "loss_cfg": {"loss_cfg": BUILDER_CFG},
        "both": {**BUILDER_VALUES, "loss_cfg": BUILDER_CFG},
    }
    got = sampling_settings(_build(**kw[path]))
    assert got == expected(BUILDER_CFG)


@pytest.mark.parametrize("kwarg", sorted(TORCHVISION_KWARGS))
def test_builder_kwarg_and_loss_cfg_key_disagreeing_is_an_error(kwarg):
    sec, key = TORCHVISION_KWARGS[kwarg]
    with pytest.raises(LossConfigError) as e:
        _build(loss_cfg={sec: {key: BUILDER_VALUES[kwarg]}}, **{kwarg: 0.1 if "thresh" in kwarg else 1})
    assert kwarg in str(e.value) and f"loss_cfg {sec}.{key}={BUILDER_VALUES[kwarg]!r}" in str(e.value)


# -- the negative cap ------------------------------------------------------------------------------
def test_num_negatives_hand_counts():
    assert num_negatives(100, 256, 3, 2.0) == 6
    assert num_negatives(100, 256, 0, 2.0) == 2  # max(1, positives): an image without objects keeps some
    assert num_negatives(100, 256, 3, 0.5) == 1  # int(0.5 * 3)
    assert num_negatives(100, 256, 3, 0.0) == 0
    assert num_negatives(100, 256, 3, -1.0) == 100  # no cap: all the available ones fit the budget
    assert num_negatives(500, 256, 3, -1.0) == 253
    assert num_negatives(500, 256, 3, 1000.0) == 253  # the budget still binds


def _matched(num_pos, num_neg, num_ignored=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(num_ignored)])
    return m[torch.randperm(m.numel(), generator=g)]


@pytest.mark.parametrize("num_pos,expected_neg", [(3, 6), (0, 2), (200, 128)])
def test_capped_sampler_counts(num_pos, expected_neg):
    m = _matched(num_pos, 100 if num_pos < 200 else 300)
    pos, neg = sample_with_neg_cap([m], 256, 0.5, 2.0)
    assert pos[0].dtype == torch.uint8 and pos[0].shape == m.shape
    assert int(pos[0].sum()) == min(num_pos, 128) and int(neg[0].sum()) == expected_neg
    assert bool((m[pos[0] > 0] >= 1).all()) and bool((m[neg[0] > 0] == 0).all())


def test_capped_sampler_draws_like_stock_when_the_cap_does_not_bind():
    labels = [_matched(30, 400, seed=1), _matched(2, 600, seed=2)]
    torch.manual_seed(5)
    stock = BalancedPositiveNegativeSampler(256, 0.5)(labels)
    torch.manual_seed(5)
    ours = sample_with_neg_cap(labels, 256, 0.5, 1000.0)
    for a, b in zip(stock[0] + stock[1], ours[0] + ours[1]):
        assert torch.equal(a, b)


def test_heads_apply_the_cap():
    model = tiny_model("faster", loss_cfg={"rpn_head": {"neg_pos_ub": 2}, "roi_head": {"neg_pos_ub": 1}})
    labels = [_matched(3, 100), _matched(0, 100, seed=1)]
    obj, deltas = torch.randn(2 * labels[0].numel(), 1), torch.zeros(2 * labels[0].numel(), 4)
    model.rpn.compute_loss(obj, deltas, labels, [torch.zeros(labels[0].numel(), 4)] * 2)
    is_pos = model.rpn.loss_state["is_pos"]
    assert (int(is_pos.sum()), is_pos.numel()) == (3, 3 + 6 + 2)
    kept = model.roi_heads.subsample([lab.long() for lab in labels])
    assert [k.numel() for k in kept] == [3 + 3, 0 + 1]
    assert torch.equal(kept[0], kept[0].sort().values)


# -- OHEM -----------------------------------------------------------------------------------------------
class _BoxesAsFeatures(nn.Module):
    def forward(self, features, proposals, image_shapes):
        return torch.cat(proposals)


class _ScoreByX1(nn.Module):
    """Class logits [-x1 / 10, 0, 0]: the loss of a negative grows with x1, a positive's shrinks."""

    def forward(self, boxes):
        s = boxes[:, :1] / 10
        return torch.cat([-s, torch.zeros_like(s), torch.zeros_like(s)], 1), torch.zeros(boxes.shape[0], 12)


def _ohem_heads(**roi):
    model = tiny_model("faster", loss_cfg={"roi_head": {"sampler": "ohem", "num": 8, "pos_fraction": 0.25, **roi}})
    heads = model.roi_heads
    heads.box_roi_pool, heads.box_head, heads.box_predictor = _BoxesAsFeatures(), nn.Identity(), _ScoreByX1()
    return heads


def _ohem_case():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    positives = torch.tensor([[dx, 0.0, 100.0 + dx, 100.0] for dx in (7.0, 1.0, 4.0, 9.0, 2.0)])  # IoU >= 0.83
    negatives = torch.tensor([[x, 200.0, x + 50.0, 250.0] for x in (230.0, 300.0, 210.0, 290.0, 250.0, 270.0, 220.0)])
    props = torch.cat([positives, negatives])
    return props, {"boxes": gt, "labels": torch.tensor([2])}


def _hardest(props, gt, num_pos, num_neg):
    """By hand: the positives with the smallest x1 (the gt box, x1 = 0, is one), the negatives with the largest."""
    cands = torch.cat([props, gt])  # 5 positives, 7 negatives, then the gt box (added as torchvision does)
    x1 = cands[:, 0].tolist()
    pos = sorted([0, 1, 2, 3, 4, 12], key=lambda i: x1[i])[:num_pos]
    neg = sorted(range(5, 12), key=lambda i: -x1[i])[:num_neg]
    return {tuple(cands[i].tolist()) for i in pos}, {tuple(cands[i].tolist()) for i in neg}


@pytest.mark.parametrize("neg_pos_ub,num_neg", [(-1, 6), (1, 2)])
def test_ohem_keeps_the_highest_loss_candidates(neg_pos_ub, num_neg):
    heads = _ohem_heads(neg_pos_ub=neg_pos_ub)
    props, target = _ohem_case()
    boxes, matched, labels, _ = heads.ohem_training_samples({}, [props], [(300, 400)], [target])
    want_pos, want_neg = _hardest(props, target["boxes"], 2, num_neg)  # int(8 * 0.25) positives
    kept = [tuple(b.tolist()) for b in boxes[0]]
    assert {b for b, lab in zip(kept, labels[0]) if lab > 0} == want_pos
    assert {b for b, lab in zip(kept, labels[0]) if lab == 0} == want_neg
    assert len(kept) == 2 + num_neg and labels[0][labels[0] > 0].tolist() == [2, 2]


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_ohem_keeping_every_candidate_trains_as_the_random_sampler(kind):
    # With a budget over every candidate both samplers keep all of them, in ascending order: the same
    # RoIs, labels, regression targets and mask matches, so the same losses bit for bit (the RPN's random
    # draws come first and OHEM draws nothing). The image without objects checks the dummy-box path.
    every = {"num": 100000, "pos_fraction": 1.0}
    random = tiny_model(kind, loss_cfg={"roi_head": every})
    ohem = tiny_model(kind, loss_cfg={"roi_head": {**every, "sampler": "ohem"}})
    images, targets = make_targets(kind, [(64, 64), (64, 80)], empty=(1,))
    want, got = run_losses(random, images, targets), run_losses(ohem, images, targets)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert int(ohem.roi_heads.loss_state["is_pos"].sum()) > 0


def test_ohem_selection_by_loss():
    loss = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.2, 9.0, 0.4, 7.0])
    labels = torch.tensor([1, 1, 0, 0, -1, -1, 0, 3])
    # 2 positives at most (num 8 x 0.25): 1 (5.0) and 7 (7.0); negatives fill up to 8: all three.
    assert hard_examples(loss, labels, 8, 0.25, -1.0).tolist() == [1, 2, 3, 6, 7]
    # 1 positive (int(3 x 0.34)): 7; the 2 hardest negatives: 3 (2.0) and 6 (0.4), not 2 (0.3).
    assert hard_examples(loss, labels, 3, 0.34, -1.0).tolist() == [3, 6, 7]
    assert hard_examples(loss, labels, 8, 0.25, 0.5).tolist() == [1, 3, 7]  # int(0.5 * 2) = 1 negative


@pytest.mark.parametrize(
    "roi,expected",
    [
        ({}, lambda ce, fl, w: ce),
        ({"class_weight": [0.5, 1.0, 3.0]}, lambda ce, fl, w: ce * w),
        ({"cls_loss": "focal", "class_weight": [0.5, 1.0, 3.0]}, lambda ce, fl, w: fl * w),
        ({"cls_pos_weight": 4.0}, lambda ce, fl, w: ce),  # a loss weight, not a difficulty
    ],
    ids=["ce", "ce+class_weight", "focal+class_weight", "pos_weight_ignored"],
)
def test_ohem_ranks_by_the_heads_own_classification_loss(roi, expected):
    heads = _ohem_heads(**roi)
    props, _ = _ohem_case()
    labels = torch.tensor([2, 1, 0, 2, -1, 0, 1, 0, 2, 0, 1, 0])
    got = heads.candidate_losses({}, [props], [(300, 400)], [labels])
    logits, _ = _ScoreByX1()(props)
    target = labels.clamp(min=0)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    p_t = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
    fl = (1 - p_t) ** 2 * ce
    w = torch.tensor([0.5, 1.0, 3.0])[target]
    torch.testing.assert_close(got, expected(ce, fl, w))


# -- parity, TorchScript ------------------------------------------------------------------------------
SIZES = [(96, 128), (112, 96), (96, 96)]


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_torchvision_values_written_out_equal_stock(stock_models, kind):
    stock = stock_models[kind]
    images, targets = make_targets(kind, SIZES, empty=(1,))
    default = run_losses(patched_copy(stock), images, targets)
    explicit = patched_copy(stock, TORCHVISION_VALUES)
    uncapped = patched_copy(stock, {"rpn_head": {"neg_pos_ub": 10000}, "roi_head": {"neg_pos_ub": 10000}})
    expected_losses = run_losses(stock, images, targets)
    for got in (run_losses(explicit, images, targets), run_losses(uncapped, images, targets)):
        for k in default:
            assert torch.equal(got[k], default[k]), k  # same sampler draws, bit for bit
            torch.testing.assert_close(got[k], expected_losses[k], rtol=1e-6, atol=1e-6, msg=k)


def test_scripted_model_with_cap_and_ohem_matches_eager():
    model = tiny_model(
        "mask", loss_cfg={"rpn_head": {"neg_pos_ub": 2}, "roi_head": {"neg_pos_ub": 1, "sampler": "ohem"}}
    )
    scripted = torch.jit.script(model)
    images, targets = make_targets("mask", [(64, 64), (64, 80)], empty=(1,))
    eager = run_losses(model, images, targets)
    got = run_losses(scripted, images, targets)[0]
    assert set(got) == set(eager)
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
