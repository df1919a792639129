"""Convert an existing torchvision two-stage detector to tv_lossfix's heads, in place."""

import logging
from typing import Any, Dict

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from .classifiers import check_classifier, prepare_classifier
from .config import LossConfig
from .roi_heads import LossFixRoIHeads, predictor_num_classes
from .rpn import LossFixRPN
from .sampling import check_sampling

__all__ = ["patch_model", "training_stats", "get_loss_cfg"]

_LOG = logging.getLogger(__name__)


def _swap(module: nn.Module, stock: type, ours: type, where: str) -> None:
    # Only the exact stock class (or ours) is swapped: a user subclass has overrides we'd lose.
    if type(module) not in (stock, ours):
        raise TypeError(
            f"patch_model: {where} is a {type(module).__module__}.{type(module).__qualname__}, "
            f"expected torchvision's {stock.__name__}; a custom subclass cannot be patched"
        )
    module.__class__ = ours


def patch_model(model: nn.Module, loss_cfg: Any = None) -> nn.Module:
    """Give a torchvision Faster / Mask / Keypoint R-CNN tv_lossfix's configurable losses.

    The conversion is in place: parameters, buffers, ``state_dict`` keys and inference are
    untouched, so stock checkpoints load before or after. Calling it again replaces the config.
    The long-tail classifiers are the exception, as they must be: ``roi_head.cls_loss: seesaw`` adds
    ``roi_heads.box_predictor.cls_objectness`` (its object logit), ``roi_head.cosine_classifier``
    makes ``cls_score`` a ``NormedLinear`` (same parameters), Seesaw / EQLv2 keep their statistics
    as buffers of ``roi_heads.cls_criterion``; each layer change is logged (logger ``tv_lossfix.patch``).

    Args:
        model: a ``torchvision.models.detection`` ``FasterRCNN``, ``MaskRCNN`` or ``KeypointRCNN``
            (or one already patched), possibly wrapped by ``DistributedDataParallel`` (patch
            before wrapping is preferred).
        loss_cfg: a :class:`LossConfig`, dict, preset name or YAML path; None for the defaults.
            Its assigner / sampler keys (``pos_iou_thr``, ``num``...) replace the heads'
            ``proposal_matcher`` / ``fg_bg_sampler``; where they are None the model's current
            objects are kept.

    Returns:
        ``model`` itself.
    """
    cfg = LossConfig.coerce(loss_cfg)
    target = getattr(model, "module", model)  # DDP / DataParallel
    rpn = getattr(target, "rpn", None)
    roi = getattr(target, "roi_heads", None)
    if not isinstance(rpn, RegionProposalNetwork) or not isinstance(roi, RoIHeads):
        raise TypeError(
            f"patch_model expects a torchvision two-stage detector (FasterRCNN, MaskRCNN, KeypointRCNN) "
            f"with .rpn and .roi_heads; got {type(target).__name__}"
        )
    # Validate against the model before changing anything, so a bad config leaves it as it was.
    # A custom box predictor (any module returning torchvision's two outputs) is checked at forward.
    num_classes = predictor_num_classes(roi.box_predictor)
    if num_classes is not None:
        cfg.roi_head.check_num_classes(num_classes)
    check_sampling(rpn, cfg.rpn_head)
    check_sampling(roi, cfg.roi_head)
    check_classifier(roi, cfg.roi_head)
    _swap(rpn, RegionProposalNetwork, LossFixRPN, "model.rpn")
    _swap(roi, RoIHeads, LossFixRoIHeads, "model.roi_heads")
    for line in prepare_classifier(roi, cfg.roi_head):
        _LOG.info("patch_model: %s", line)
    rpn.set_loss_cfg(cfg.rpn_head, cfg.sync_avg_factor)
    roi.set_loss_cfg(cfg.roi_head, cfg.sync_avg_factor)
    target.loss_cfg = cfg
    return model


def get_loss_cfg(model: nn.Module) -> LossConfig:
    """The :class:`LossConfig` a patched model uses."""
    target = getattr(model, "module", model)
    if not isinstance(getattr(target, "rpn", None), LossFixRPN):
        raise TypeError(f"{type(target).__name__} is not patched by tv_lossfix")
    return target.loss_cfg


def training_stats(model: nn.Module) -> Dict[str, Tensor]:
    """The heads' statistics from the last training forward, as detached tensors.

    Keys: ``rpn/pos_per_image``, ``rpn/neg_per_image`` (sampled anchors), ``rpn/cls_avg_factor``,
    ``rpn/bbox_avg_factor``, ``roi/pos_per_image``, ``roi/neg_per_image`` (sampled RoIs),
    ``roi/cls_avg_factor``, ``roi/bbox_avg_factor``, ``roi/fg_prob`` (mean probability the
    classifier gives the true class of positive RoIs). Empty before the first training step.
    The heads keep raw tensors and the statistics are derived here, so a training step pays
    nothing for them; no value is read back to the host.
    """
    target = getattr(model, "module", model)
    out: Dict[str, Tensor] = {}
    with torch.no_grad():
        for prefix, head in (("rpn", getattr(target, "rpn", None)), ("roi", getattr(target, "roi_heads", None))):
            state = getattr(head, "loss_state", None)
            if not state:
                continue
            n = max(head.loss_state_images, 1)
            is_pos = state["is_pos"]
            num_pos = is_pos.sum(dtype=torch.float32)
            out[f"{prefix}/pos_per_image"] = num_pos / n
            out[f"{prefix}/neg_per_image"] = (is_pos.numel() - num_pos) / n
            sampled = torch.full((), max(is_pos.numel(), 1), dtype=torch.float32, device=is_pos.device)
            out[f"{prefix}/cls_avg_factor"] = state.get("cls_avg_factor", sampled)
            out[f"{prefix}/bbox_avg_factor"] = state.get("bbox_avg_factor", sampled)
            if "class_logits" in state:
                # The loss's own inference probabilities (softmax for the cross-entropy and focal losses).
                prob = head.cls_criterion.scores(state["class_logits"].float()).gather(1, state["labels"][:, None])[
                    :, 0
                ]
                out[f"{prefix}/fg_prob"] = (prob * is_pos).sum() / num_pos.clamp(min=1.0)
    return out
