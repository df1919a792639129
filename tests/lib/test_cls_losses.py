"""A new classification loss is one pure function and one registration (tv_lossfix.cls_losses).

The loss below is PolyLoss's Poly-1 (Leng et al., ICLR 2022): ``CE + epsilon * (1 - p_t)``. It is defined
here, registered once, and then everything reads the registry: LossConfig takes ``cls_loss: poly1`` and its
parameter, the RoI head trains with it, OHEM ranks by it, and TorchScript compiles it.
"""

import copy
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tv_lossfix import cls_losses as C
from tv_lossfix._checks import check_count_list, check_weight
from tv_lossfix.config import LossConfig, LossConfigError

from helpers import assert_scripted_matches_eager, make_targets, run_losses, tiny_model


# -- the new loss: one pure function ...
def poly1_per_sample(logits: Tensor, labels: Tensor, params: Dict[str, float]) -> Tensor:
    p_t = F.softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    return F.cross_entropy(logits, labels, reduction="none") + params["poly_epsilon"] * (1 - p_t)


def not_scriptable(logits: Tensor, labels: Tensor, params: Dict[str, float]) -> Tensor:
    # .tolist() without a type TorchScript can infer: eager only.
    return F.cross_entropy(logits, labels, reduction="none") * len(logits.sum(1).tolist())


def unannotated(logits, labels, params):
    return F.cross_entropy(logits, labels, reduction="none")


@pytest.fixture
def poly1():
    # ... and one registration (removed after the test: the registry is the package's).
    C.register(
        C.ClsLoss("poly1", "roi_head", per_sample=poly1_per_sample, params={"poly_epsilon": C.Param(1.0, check_weight)})
    )
    yield
    C.unregister("roi_head", "poly1")


def poly1_formula(logits, labels, epsilon, weight, avg):
    """The loss and its gradient written out: d/dz [CE + eps (1 - p_t)] = (p - y)(1 + eps p_t)."""
    p = F.softmax(logits.detach(), -1)
    y = F.one_hot(labels, logits.shape[1]).to(p.dtype)
    p_t = (p * y).sum(1)
    loss = (-(p_t.log()) + epsilon * (1 - p_t)) * weight
    grad = (p - y) * (1 + epsilon * p_t)[:, None] * weight[:, None]
    return loss.sum() / avg, grad / avg


def test_config_takes_the_new_name_and_its_parameter_and_checks_it(poly1):
    cfg = LossConfig.from_dict({"roi_head": {"cls_loss": "poly1", "poly_epsilon": 2}})
    assert cfg.roi_head.param("poly_epsilon") == 2.0 and cfg.changed_keys() == {
        "roi_head.cls_loss": "poly1",
        "roi_head.poly_epsilon": 2.0,
    }
    assert LossConfig.from_dict(cfg.to_dict()) == cfg  # what checkpoints and config.yaml store reads back
    with pytest.raises(LossConfigError, match=r"roi_head\.poly_epsilon"):
        LossConfig.from_dict({"roi_head": {"cls_loss": "poly1", "poly_epsilon": -1}})
    with pytest.raises(LossConfigError, match=r"roi_head\.poly_epsilon .*'ce'"):  # set for another loss: refused
        LossConfig.from_dict({"roi_head": {"poly_epsilon": 1.0}})
    with pytest.raises(LossConfigError, match=r"rpn_head\.poly_epsilon"):  # the RPN has no such loss
        LossConfig.from_dict({"rpn_head": {"poly_epsilon": 1.0}})


def test_unregistered_name_is_refused_naming_the_key():
    with pytest.raises(LossConfigError, match=r"roi_head\.cls_loss"):
        LossConfig.from_dict({"roi_head": {"cls_loss": "poly1"}})


def test_one_training_step_matches_the_formula_value_and_gradient(poly1):
    epsilon = 0.7
    model = tiny_model("faster", loss_cfg={"roi_head": {"cls_loss": "poly1", "poly_epsilon": epsilon}})
    assert isinstance(model.roi_heads.cls_criterion, C.LossFunction)
    seen = {}

    def check(module, args, out):
        logits, labels, avg, weight = args
        w = torch.ones_like(labels, dtype=logits.dtype) if weight is None else weight
        n = torch.tensor(float(labels.numel())) if avg is None else avg
        want, want_grad = poly1_formula(logits, labels, epsilon, w, n)
        (grad,) = torch.autograd.grad(out, logits, retain_graph=True)
        seen.update(value=(out.detach(), want), grad=(grad, want_grad), labels=labels)

    model.roi_heads.cls_criterion.register_forward_hook(check)
    images, targets = make_targets("faster", [(64, 64), (64, 80)])
    losses = run_losses(model, images, targets)
    torch.testing.assert_close(*seen["value"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(*seen["grad"], rtol=1e-5, atol=1e-7)
    assert (seen["labels"] > 0).any() and (seen["labels"] == 0).any()  # positives and background both seen
    torch.testing.assert_close(losses["loss_classifier"], seen["value"][0])
    losses["loss_classifier"].backward()  # the head's parameters get the loss's gradient
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_at_epsilon_zero_it_is_torchvisions_cross_entropy_through_the_model(poly1):
    images, targets = make_targets("faster", [(64, 64)])
    ce = run_losses(tiny_model("faster", loss_cfg={}), images, targets)
    poly = run_losses(
        tiny_model("faster", loss_cfg={"roi_head": {"cls_loss": "poly1", "poly_epsilon": 0}}), images, targets
    )
    torch.testing.assert_close(poly["loss_classifier"], ce["loss_classifier"], rtol=1e-6, atol=1e-7)


def test_ohem_ranks_the_candidates_by_the_new_loss(poly1):
    epsilon = 3.0
    model = tiny_model(
        "faster", loss_cfg={"roi_head": {"cls_loss": "poly1", "poly_epsilon": epsilon, "sampler": "ohem"}}
    )
    crit = model.roi_heads.cls_criterion
    ranked = []
    original = crit.ranking

    def spy(logits, labels):
        out = original(logits, labels)
        ranked.append((logits, labels, out))
        return out

    crit.ranking = spy
    images, targets = make_targets("faster", [(64, 64), (64, 80)])
    assert torch.isfinite(run_losses(model, images, targets)["loss_classifier"])
    assert len(ranked) == 1
    logits, labels, rank = ranked[0]
    n = labels.numel()
    assert n > model.roi_heads.fg_bg_sampler.batch_size_per_image  # more candidates than kept: a real choice
    want, _ = poly1_formula(logits, labels, epsilon, torch.ones(n), torch.tensor(1.0))
    torch.testing.assert_close(rank.sum(), want)
    assert not torch.equal(rank, F.cross_entropy(logits, labels, reduction="none"))  # not CE's ranking


def test_scripted_model_with_the_new_loss_matches_eager(poly1):
    model = tiny_model("faster", loss_cfg={"roi_head": {"cls_loss": "poly1", "poly_epsilon": 0.5}})
    scripted = torch.jit.script(copy.deepcopy(model))
    images, targets = make_targets("faster", [(64, 64)])
    assert_scripted_matches_eager(model, scripted, images, targets)


@pytest.mark.parametrize("fn, why", [(not_scriptable, "cannot compile not_scriptable"), (unannotated, "annotate")])
def test_a_loss_torchscript_cannot_compile_is_refused_at_script_time_naming_it(fn, why):
    C.register(C.ClsLoss("eager_only", "roi_head", per_sample=fn))
    try:
        model = tiny_model("faster", loss_cfg={"roi_head": {"cls_loss": "eager_only"}})
        assert torch.isfinite(run_losses(model, *make_targets("faster", [(64, 64)]))["loss_classifier"])
        with pytest.raises(RuntimeError, match=f"roi_head.cls_loss eager_only: .*{why}"):
            torch.jit.script(model)
    finally:
        C.unregister("roi_head", "eager_only")


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        C.register(C.ClsLoss("ce", "roi_head", per_sample=poly1_per_sample))
    with pytest.raises(ValueError, match="build= or per_sample="):
        C.register(C.ClsLoss("nothing", "roi_head"))
    with pytest.raises(ValueError, match="rpn_head"):
        C.register(C.ClsLoss("poly_rpn", "rpn_head", per_sample=poly1_per_sample))
    assert "nothing" not in C.cls_loss_names("roi_head")


def test_a_per_sample_loss_takes_number_parameters_only():
    C.register(
        C.ClsLoss(
            "listy", "roi_head", per_sample=poly1_per_sample, params={"listy_counts": C.Param(None, check_count_list)}
        )
    )
    try:
        with pytest.raises(LossConfigError, match=r"roi_head\.listy_counts"):
            tiny_model("faster", loss_cfg={"roi_head": {"cls_loss": "listy", "listy_counts": [1, 2]}})
    finally:
        C.unregister("roi_head", "listy")
