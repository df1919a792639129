"""Small helpers shared by the two heads."""

import torch
from torch import Tensor


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
