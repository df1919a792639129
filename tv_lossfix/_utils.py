"""Small helpers shared by the two heads."""

import dataclasses

import torch
from torch import Tensor, nn


@torch.jit.unused
def reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over the DDP ranks (identity when not distributed); at least 1.

    MMDetection's ``reduce_mean``: every rank then divides its loss sum by the same normalizer.
    Not scriptable (collectives); a scripted model with ``sync_avg_factor`` raises when training.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return (x / dist.get_world_size()).clamp(min=1.0)


def scale(loss: Tensor, weight: float) -> Tensor:
    # Skip the multiply at 1.0 so default settings keep stock numerics bit for bit.
    return loss if weight == 1.0 else loss * weight


def apply_loss_cfg(head: nn.Module, cfg, sync_avg_factor: bool) -> None:
    """Copy a head's config onto plain attributes (floats, strings: what TorchScript reads).

    ``class_weight`` is not copied: the RoI head keeps it as a buffer.
    """
    head.loss_cfg = cfg
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str):
            setattr(head, f.name, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(head, f.name, float(value))
    head.sync_avg_factor = bool(sync_avg_factor)
    head.loss_state = {}
    head.loss_state_images = 0


def loss_cfg_repr(head: nn.Module) -> str:
    return f"loss_cfg={head.loss_cfg}, sync_avg_factor={head.sync_avg_factor}"
