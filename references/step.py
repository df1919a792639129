"""One training step (Detectron2's ``run_step``): forward, backward, clipping and one host read; then the
optimizer step, or the NaN policy when something was not finite.

:class:`StepContext` is what every step needs, built once per run; :func:`train_step` returns a
:class:`StepResult`; the loop (engine.py) calls :func:`optimizer_step` or :func:`apply_nonfinite_policy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

import distributed
from preemption import StopRequest


class NonFiniteError(RuntimeError):
    """Training stopped because a loss or the gradient norm was not finite."""


@dataclass
class StepContext:
    """What every step needs; built once per run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    scaler: Optional[Any] = None  # torch.amp.GradScaler under --amp on CUDA
    max_norm: float = math.inf  # clipping off: the norm is still measured and logged
    norm_type: float = 2.0
    params: List[torch.nn.Parameter] = field(default_factory=list)
    stop: Optional[StopRequest] = None  # read at every step's host read; every rank agrees under DDP
    warmup: Optional[Any] = None  # LinearLR over the first state.warmup_total steps, stepped in the loop as torchvision
    nan_policy: str = "stop"  # --nan-policy
    max_consecutive_skips: int = 10  # --max-consecutive-skips
    print_freq: int = 20  # --print-freq: the log line every N iterations
    max_iters: Optional[int] = None  # --iters-per-epoch: caps an epoch's iterations
    writer: Any = None  # writers.EventWriter: the NaN policy's records and lines

    def __post_init__(self) -> None:
        if not self.params:
            self.params = [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class StepResult:
    values: Dict[str, float]  # each loss term, "loss" and "grad_norm" (rank means under DDP)
    loss_keys: List[str]
    any_bad: bool  # something non-finite on any rank
    amp_overflow: bool  # only the gradients overflowed: GradScaler skips the step itself
    images: int
    stop: bool = False  # a stop signal reached this or (under DDP) another rank: stop after this step

    @property
    def stepped(self) -> bool:
        """The optimizer stepped (or, on an AMP overflow, GradScaler skipped it as it does): not a refused step."""
        return not self.any_bad or self.amp_overflow


def _to(device, images, targets):
    images = [i.to(device, non_blocking=True) for i in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def train_step(
    ctx: StepContext, images: Sequence[torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]
) -> StepResult:
    """Forward (autocast under --amp) -> backward -> GradScaler.unscale_ -> global-norm clipping ->
    one host read of the losses and the gradient norm. The optimizer step is the caller's, so a
    non-finite step can be refused before it reaches the weights."""
    images, targets = _to(ctx.device, images, targets)
    with torch.autocast(ctx.device.type, enabled=ctx.scaler is not None and ctx.device.type == "cuda"):
        loss_dict = ctx.model(images, targets)
    loss = sum(loss_dict.values())
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.unscale_(ctx.optimizer)  # clip and measure true gradients, not scaled ones
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, ctx.max_norm, norm_type=ctx.norm_type)

    keys = list(loss_dict)
    vec = torch.stack([loss_dict[k].detach().float() for k in keys] + [loss.detach().float(), grad_norm.float()])
    shown, any_bad, stop = _read_back(vec, ctx.stop.signum if ctx.stop is not None else 0)
    values = dict(zip(keys + ["loss", "grad_norm"], shown))
    amp_overflow = (
        ctx.scaler is not None
        and not math.isfinite(values["grad_norm"])
        and all(math.isfinite(values[k]) for k in keys)
    )
    return StepResult(values, keys, any_bad, amp_overflow, len(images) * distributed.world(), stop)


def _read_back(vec: torch.Tensor, stop_signal: int = 0):
    """The step's one host read: values to log, whether any rank saw a non-finite one, and whether
    any rank was asked to stop (the flag rides in the same all_reduce: no extra collective)."""
    if not distributed.is_dist():
        shown = vec.tolist()
        return shown, not all(math.isfinite(v) for v in shown), stop_signal != 0
    # Rank means for logging; any rank's non-finite value stops every rank.
    bad = (~torch.isfinite(vec)).any().float().reshape(1)
    stop = torch.full((1,), float(stop_signal != 0), device=vec.device)
    packed = torch.cat([torch.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0), bad, stop])
    dist.all_reduce(packed)
    n = vec.numel()
    both = torch.cat([packed[:n] / distributed.world(), packed[n:], vec]).tolist()
    shown = [v if math.isfinite(own) else own for v, own in zip(both[:n], both[n + 2 :])]
    return shown, both[n] > 0, both[n + 1] > 0


def apply_nonfinite_policy(ctx: StepContext, result: StepResult, state, image_ids: Sequence[int] = ()) -> None:
    """A non-finite loss or gradient never reaches the weights: ``stop`` raises, ``skip`` counts it.
    ``state``: engine.TrainState (``state.epoch`` is the epoch being trained); ``image_ids``: the batch's
    images (this rank's), named so that bad data can be told from a bad lr."""
    keys, values, it, epoch = result.loss_keys, result.values, state.iteration, state.epoch
    culprits = [k for k in keys + ["grad_norm"] if not math.isfinite(values[k])] or ["a loss term on another rank"]
    batch = f", images {', '.join(str(i) for i in image_ids)}" if image_ids else ""
    msg = (
        f"non-finite {', '.join(culprits)} at epoch {epoch}, iteration {it}{batch} "
        f"(losses: {', '.join(f'{k}={values[k]:.4g}' for k in keys)}; grad_norm={values['grad_norm']:.4g})"
    )
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.writer.record({"type": "nonfinite", "epoch": epoch, "iter": it, "terms": culprits, **values})
    if ctx.nan_policy == "stop":
        raise NonFiniteError(
            msg + ". Stopped before the step (--nan-policy stop); checkpoints on disk are intact. "
            "Try --clip-grad-norm 35, a lower --lr, or --nan-policy skip; if it recurs on the same images, check "
            "their annotations."
        )
    state.skipped += 1
    state.consecutive_skips += 1
    if ctx.scaler is not None:
        ctx.scaler.update()  # lower the loss scale as for an overflow
    ctx.writer.say(f"skipped step: {msg}")
    if state.consecutive_skips >= ctx.max_consecutive_skips:
        raise NonFiniteError(
            f"{state.consecutive_skips} consecutive steps skipped (--max-consecutive-skips); last: {msg}"
        )


def optimizer_step(ctx: StepContext, result: StepResult, state) -> None:
    """The optimizer step (GradScaler's under --amp), then the warmup's, as torchvision's loop does."""
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)  # skips the step itself on an AMP overflow
        ctx.scaler.update()
        state.amp_overflows += int(result.amp_overflow)
    else:
        ctx.optimizer.step()
    state.consecutive_skips = 0
    if ctx.warmup is not None and state.iteration < state.warmup_total:
        ctx.warmup.step()  # before the iteration is counted and logged: the log line shows its lr
