"""Small helpers shared by the two heads."""

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from . import losses as L
from .cls_losses import build_criterion, registered, resolved_param


@torch.jit.unused
def reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over the DDP ranks (identity when not distributed).

    MMDetection's ``reduce_mean``: every rank then divides its loss sum by the same normalizer.
    Not scriptable (collectives); a scripted model with ``sync_avg_factor`` raises when training.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def scale(loss: Tensor, weight: float) -> Tensor:
    # Skip the multiply at 1.0 so default settings keep stock numerics bit for bit.
    return loss if weight == 1.0 else loss * weight


def set_criterion(head: nn.Module, cfg, num_classes: int) -> None:
    """``head.cls_criterion``: the registered classification loss of ``cfg.cls_loss`` (tv_lossfix.cls_losses).

    A criterion of the same class with buffers of the same shapes hands its statistics (Seesaw's
    counts, EQLv2's gradient statistics) to the new one: setting the config again keeps them.
    """
    new = build_criterion(cfg._section, cfg.to_dict(), num_classes)
    old = getattr(head, "cls_criterion", None)
    if type(old) is type(new):
        old_state, new_state = old.state_dict(), new.state_dict()
        if old_state.keys() == new_state.keys() and all(old_state[k].shape == v.shape for k, v in new_state.items()):
            new.load_state_dict(old_state)
    param = next(head.parameters(), None)
    head.cls_criterion = new.to(param.device) if param is not None else new


def apply_loss_cfg(head: nn.Module, cfg, sync_avg_factor: bool) -> None:
    """Copy the settings both heads share onto plain attributes (floats, strings: what TorchScript reads)."""
    head.loss_cfg = cfg
    head.cls_pos_weight = float(cfg.cls_pos_weight)
    head.loss_cls_weight = float(cfg.loss_cls_weight)
    head.loss_bbox_weight = float(cfg.loss_bbox_weight)
    head.cls_avg_factor = str(cfg.cls_avg_factor)
    head.bbox_avg_factor = str(cfg.bbox_avg_factor)
    head.bbox_loss = str(cfg.bbox_loss)
    head.smooth_l1_beta = float(cfg.smooth_l1_beta)
    head.cls_loss = str(cfg.cls_loss)
    # None means the focal loss's registered default (Lin et al. 2017's 2); read only when cls_loss is focal.
    head.focal_gamma = float(resolved_param(cfg.to_dict(), registered(cfg._section, "focal"), "focal_gamma"))
    head.sync_avg_factor = bool(sync_avg_factor)
    head.loss_state = {}
    head.loss_state_images = 0


# What each head reads at every forward, by name, for readers and for TorchScript.
HEAD_LOSS_ATTRIBUTES = {
    "cls_pos_weight": float,
    "loss_cls_weight": float,
    "loss_bbox_weight": float,
    "cls_avg_factor": str,
    "bbox_avg_factor": str,
    "bbox_loss": str,
    "smooth_l1_beta": float,
    "cls_loss": str,
    "focal_gamma": float,
    "sync_avg_factor": bool,
    "loss_state": Dict[str, Tensor],
    "loss_state_images": int,
}


def loss_cfg_repr(head: nn.Module) -> str:
    return f"loss_cfg={head.loss_cfg}, sync_avg_factor={head.sync_avg_factor}"


def avg_factor(
    mode: str,
    is_pos: Tensor,
    sync: bool,
    pos: Optional[Tensor] = None,
    neg: Optional[Tensor] = None,
    num_images: int = 1,
) -> Optional[Tensor]:
    """The normalizer a head divides a loss by, for ``mode`` (see config.py), or None.

    None means "the number of sampled anchors/RoIs", left to the loss functions (one fused mean,
    torchvision's op). ``sampled_per_image`` needs the [B*A] sampled masks ``pos``/``neg``.
    With ``sync`` the count is ``max(mean over DDP ranks, 1)`` (MMDetection's reduce_mean use): the
    raw counts are averaged, so a rank without positives counts 0, not 1.
    """
    f: Optional[Tensor] = None
    if mode == "positive":
        f = is_pos.sum(dtype=torch.float32) if sync else L.count(is_pos)
    elif mode == "sampled_per_image":
        if pos is None or neg is None:
            raise ValueError("sampled_per_image needs the sampled masks")
        f = L.per_image_count(pos.view(num_images, -1) > 0, neg.view(num_images, -1) > 0)
    elif sync:
        f = torch.full((), is_pos.numel(), dtype=torch.float32, device=is_pos.device)
    if sync and f is not None:
        f = reduce_mean(f).clamp(min=1.0)
    return f


def loss_state(is_pos: Tensor, cls_avg: Optional[Tensor], bbox_avg: Optional[Tensor]) -> Dict[str, Tensor]:
    """What a head keeps for tv_lossfix.training_stats(): raw, detached, derived only when read."""
    state: Dict[str, Tensor] = {"is_pos": is_pos}
    if cls_avg is not None:
        state["cls_avg_factor"] = cls_avg.detach()
    if bbox_avg is not None:
        state["bbox_avg_factor"] = bbox_avg.detach()
    return state
