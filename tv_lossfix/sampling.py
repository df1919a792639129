"""Assigner and sampler settings of the two heads, and the two samplers torchvision lacks.

torchvision keeps the assigner (``proposal_matcher``, a ``Matcher``) and the sampler
(``fg_bg_sampler``, a ``BalancedPositiveNegativeSampler``) as plain objects on each head, typed
as exactly those classes for TorchScript. A changed setting therefore gets a new stock object;
MMDetection's negative cap (``neg_pos_ub``) and OHEM are the pure functions below, which the
heads call instead of ``fg_bg_sampler`` only when they are switched on. With the defaults the
stock sampler runs exactly as in torchvision (same random draws).
"""

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

from .config import LossConfigError

__all__ = [
    "num_negatives",
    "sample_with_neg_cap",
    "fg_bg_sample",
    "hard_examples",
    "TORCHVISION_KWARGS",
    "check_builder_kwargs",
]

# The attributes both heads read at every training forward (see the heads' __annotations__).
SAMPLING_ATTRIBUTES = {"neg_pos_ub": float}

# torchvision's builder keyword -> the LossConfig key that sets the same value.
TORCHVISION_KWARGS = {
    "rpn_fg_iou_thresh": ("rpn_head", "pos_iou_thr"),
    "rpn_bg_iou_thresh": ("rpn_head", "neg_iou_thr"),
    "rpn_batch_size_per_image": ("rpn_head", "num"),
    "rpn_positive_fraction": ("rpn_head", "pos_fraction"),
    "box_fg_iou_thresh": ("roi_head", "pos_iou_thr"),
    "box_bg_iou_thresh": ("roi_head", "neg_iou_thr"),
    "box_batch_size_per_image": ("roi_head", "num"),
    "box_positive_fraction": ("roi_head", "pos_fraction"),
}


# -- the samplers (scriptable, no host read but the stock sampler's nonzero calls) ---------------
def num_negatives(available: int, num: int, num_pos: int, neg_pos_ub: float) -> int:
    """Negatives to draw in one image (MMDetection's ``BaseSampler.sample``).

    ``num - num_pos`` fill the image's budget; with ``neg_pos_ub >= 0`` at most
    ``int(neg_pos_ub * max(1, num_pos))``, so an image without positives still gets some.
    """
    n = min(available, num - num_pos)
    if neg_pos_ub >= 0:
        n = min(n, int(neg_pos_ub * max(1, num_pos)))
    return n


def sample_with_neg_cap(
    matched_idxs: List[Tensor], num: int, pos_fraction: float, neg_pos_ub: float
) -> Tuple[List[Tensor], List[Tensor]]:
    """``BalancedPositiveNegativeSampler(num, pos_fraction)`` with MMDetection's negative cap.

    Same inputs (-1 ignored, 0 negative, >= 1 positive), outputs (uint8 masks per image) and
    random draws as the stock sampler: when the cap does not bind, the result is identical.
    """
    pos_masks: List[Tensor] = []
    neg_masks: List[Tensor] = []
    for m in matched_idxs:
        positive = torch.where(m >= 1)[0]
        negative = torch.where(m == 0)[0]
        num_pos = min(positive.numel(), int(num * pos_fraction))
        num_neg = num_negatives(negative.numel(), num, num_pos, neg_pos_ub)
        keep_pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
        keep_neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
        pos_mask = torch.zeros_like(m, dtype=torch.uint8)
        neg_mask = torch.zeros_like(m, dtype=torch.uint8)
        pos_mask[keep_pos] = 1
        neg_mask[keep_neg] = 1
        pos_masks.append(pos_mask)
        neg_masks.append(neg_mask)
    return pos_masks, neg_masks


def fg_bg_sample(
    sampler: BalancedPositiveNegativeSampler, matched_idxs: List[Tensor], neg_pos_ub: float
) -> Tuple[List[Tensor], List[Tensor]]:
    """The head's sampler as torchvision calls it, or with the negative cap when ``neg_pos_ub >= 0``."""
    if neg_pos_ub < 0:
        return sampler(matched_idxs)
    return sample_with_neg_cap(matched_idxs, sampler.batch_size_per_image, sampler.positive_fraction, neg_pos_ub)


def hard_examples(loss: Tensor, labels: Tensor, num: int, pos_fraction: float, neg_pos_ub: float) -> Tensor:
    """OHEM for one image: indices (ascending) of the highest-``loss`` candidates to keep.

    MMDetection's ``OHEMSampler``: at most ``int(num * pos_fraction)`` positives (labels >= 1),
    the hardest ones, then the hardest negatives (label 0) up to ``num`` (and ``neg_pos_ub``).
    Labels -1 (between the thresholds) are never kept.
    """
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(num * pos_fraction))
    num_neg = num_negatives(negative.numel(), num, num_pos, neg_pos_ub)
    keep_pos = positive[loss[positive].topk(num_pos).indices]
    keep_neg = negative[loss[negative].topk(num_neg).indices]
    # Ascending, the order torchvision's sampler leaves the RoIs in.
    return torch.cat([keep_pos, keep_neg]).sort().values


# -- settings (Python only: called when a config is set) -------------------------------------------
def _channels(rpn: nn.Module) -> Any:
    cls_logits = getattr(getattr(rpn, "head", None), "cls_logits", None)
    return cls_logits.in_channels if isinstance(cls_logits, nn.Conv2d) else None


def _resolved(head: nn.Module, cfg: Any) -> Dict[str, Any]:
    """The values the head will use: the config's, or the model's own where the config says None."""
    m, s = head.proposal_matcher, head.fg_bg_sampler
    return {
        "pos_iou_thr": m.high_threshold if cfg.pos_iou_thr is None else cfg.pos_iou_thr,
        "neg_iou_thr": m.low_threshold if cfg.neg_iou_thr is None else cfg.neg_iou_thr,
        "num": s.batch_size_per_image if cfg.num is None else cfg.num,
        "pos_fraction": s.positive_fraction if cfg.pos_fraction is None else cfg.pos_fraction,
    }


def check_sampling(head: nn.Module, cfg: Any) -> None:
    """Raise LossConfigError if ``cfg``'s sampling keys cannot take effect on ``head`` (nothing changed)."""
    sec = cfg._section
    uses_sampler = cfg.num is not None or cfg.pos_fraction is not None or cfg.neg_pos_ub != -1
    uses_sampler = uses_sampler or getattr(cfg, "sampler", "random") != "random"
    if (cfg.pos_iou_thr is not None or cfg.neg_iou_thr is not None) and type(head.proposal_matcher) is not Matcher:
        raise LossConfigError(
            f"{sec}.pos_iou_thr / neg_iou_thr set torchvision's Matcher, but the model's proposal_matcher is a "
            f"{type(head.proposal_matcher).__name__}"
        )
    if uses_sampler and type(head.fg_bg_sampler) is not BalancedPositiveNegativeSampler:
        raise LossConfigError(
            f"{sec}: the sampler keys set torchvision's BalancedPositiveNegativeSampler, but the model's "
            f"fg_bg_sampler is a {type(head.fg_bg_sampler).__name__}"
        )
    if cfg.pos_iou_thr is not None or cfg.neg_iou_thr is not None:
        v = _resolved(head, cfg)
        if v["neg_iou_thr"] > v["pos_iou_thr"]:
            given = "neg_iou_thr" if cfg.neg_iou_thr is not None else "pos_iou_thr"
            raise LossConfigError(
                f"{sec}.{given}: neg_iou_thr ({v['neg_iou_thr']}) must be <= pos_iou_thr ({v['pos_iou_thr']}); "
                f"the model's own value is kept for the key not given: set both"
            )
    if cfg.num is not None or cfg.pos_fraction is not None:
        v = _resolved(head, cfg)
        if int(v["num"] * v["pos_fraction"]) < 1:  # the stock sampler's positive budget per image
            given = " / ".join(f"{sec}.{k}" for k in ("num", "pos_fraction") if getattr(cfg, k) is not None)
            raise LossConfigError(
                f"{given}: num {v['num']} x pos_fraction {v['pos_fraction']:g} leaves int(...) = 0 positive samples "
                f"per image: no positive is ever trained (the head collapses to background); give "
                f"num x pos_fraction >= 1"
            )
    feat = getattr(cfg, "feat_channels", None)
    if feat is not None and feat != _channels(head):
        has = _channels(head)
        raise LossConfigError(
            f"rpn_head.feat_channels={feat} does not match the model: torchvision's RPNHead uses the backbone's "
            + (f"out_channels ({has}); drop the key or give that value" if has else "out_channels; drop the key")
        )


def set_matcher(head: nn.Module, high: float, low: float) -> None:
    """A new stock ``Matcher`` on ``head`` when the thresholds change (the heads' TorchScript type).

    The model's low-quality rule is kept: on for torchvision's RPN, off for its RoI heads.
    """
    m = head.proposal_matcher
    if (high, low) != (m.high_threshold, m.low_threshold):
        head.proposal_matcher = Matcher(float(high), float(low), allow_low_quality_matches=m.allow_low_quality_matches)


def set_sampler(head: nn.Module, num: int, pos_fraction: float) -> None:
    """A new stock ``BalancedPositiveNegativeSampler`` on ``head`` when its size or fraction changes."""
    s = head.fg_bg_sampler
    if (num, pos_fraction) != (s.batch_size_per_image, s.positive_fraction):
        head.fg_bg_sampler = BalancedPositiveNegativeSampler(int(num), float(pos_fraction))


def apply_sampling(head: nn.Module, cfg: Any) -> None:
    """Give ``head`` the assigner and sampler ``cfg`` asks for (call :func:`check_sampling` first)."""
    v = _resolved(head, cfg)
    set_matcher(head, v["pos_iou_thr"], v["neg_iou_thr"])
    set_sampler(head, v["num"], v["pos_fraction"])
    head.neg_pos_ub = float(cfg.neg_pos_ub)


def check_builder_kwargs(cfg: Any, kwargs: Dict[str, Any]) -> None:
    """Refuse a torchvision builder keyword and the loss_cfg key for the same setting with different values."""
    for kwarg, (section, key) in TORCHVISION_KWARGS.items():
        value = getattr(getattr(cfg, section), key)
        if kwarg in kwargs and value is not None and kwargs[kwarg] != value:
            raise LossConfigError(
                f"{kwarg}={kwargs[kwarg]!r} and loss_cfg {section}.{key}={value!r} set the same value: give one"
            )
