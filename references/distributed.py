"""torch.distributed setup, as torchvision's ``init_distributed_mode``: torchrun or SLURM.

Named so that ``import torch.distributed as dist`` keeps its usual meaning everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun", "slurm" or "none"


def detect(world_size_flag: int = 1) -> DistInfo:
    """Rank and world size from torchrun's variables, else SLURM's (``srun``), else one process.

    Under SLURM, torchvision takes the rank from ``SLURM_PROCID`` and the world size from
    ``--world-size``; ``SLURM_NTASKS`` is used when that flag was left at 1.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env:
        rank = int(env["SLURM_PROCID"])
        world = world_size_flag if world_size_flag > 1 else int(env.get("SLURM_NTASKS", 1))
        local = int(env.get("SLURM_LOCALID", rank % max(torch.cuda.device_count(), 1)))
        return DistInfo(rank, world, local, "slurm")
    return DistInfo(0, 1, 0, "none")


def init(info: DistInfo, device_type: str, backend: Optional[str], dist_url: str = "env://") -> None:
    """Join the process group ``info`` describes (nothing to do for one process)."""
    if info.world_size == 1:
        return
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if dist_url == "env://" and info.launcher == "slurm":
        # srun sets no MASTER_ADDR/PORT; torchvision's SLURM recipes pass --dist-url tcp://HOST:PORT.
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"SLURM launch with --dist-url env:// needs {' and '.join(missing)} in the environment; "
                f"set them, or pass --dist-url tcp://<first node>:<port>"
            )
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=info.world_size, rank=info.rank)
    dist.barrier()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather(obj: Any) -> List[Any]:
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def cleanup(ok: bool = True) -> None:
    """Leave the process group. After a run that ended normally every rank first waits for the others,
    so none tears its group down while a peer is still using it (a rank 1 that left first has aborted
    at exit under gloo, after training was done); after an error no rank waits, since its peers may be
    inside another collective."""
    if is_dist():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
