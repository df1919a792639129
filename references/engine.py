"""The training step and one training epoch (COCO evaluation is in evaluation.py).

``train_step`` does the work of one iteration (Detectron2's ``run_step``); ``apply_nonfinite_policy``
decides what a non-finite step means; ``MetricLogger`` keeps the running numbers and prints one line
every ``--print-freq`` iterations (torchvision's ``MetricLogger``). ``train_one_epoch`` strings them
together, writing through one writer (writers.EventWriter) and calling a :class:`StepHooks` at two
points of every iteration (the trainer's hooks, trainer.py). ``TrainState`` is everything about the
run's progress that a checkpoint must restore.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

import tv_lossfix

import distributed

if TYPE_CHECKING:
    from train_config import TrainingConfig


class NonFiniteError(RuntimeError):
    """Training stopped because a loss or the gradient norm was not finite."""


# -- preemption -------------------------------------------------------------------------------------
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")  # Ctrl-C, kill / scancel / torchrun, SLURM's --signal


class Preempted(Exception):
    """A stop signal ended training at an iteration boundary (after the checkpoint was written)."""

    def __init__(self, signum: int, epoch: int, iteration: int, n_iters: int):
        super().__init__(f"{signal.Signals(signum).name} at epoch {epoch}, iteration {iteration}/{n_iters}")
        self.signum, self.epoch, self.iteration, self.n_iters = signum, epoch, iteration, n_iters


class StopRequest:
    """While installed, SIGINT / SIGTERM / SIGUSR1 only set a flag, which the training loop reads at
    each iteration boundary: no KeyboardInterrupt in the middle of a step. The previous handlers come
    back on ``restore`` (or leaving the ``with`` block)."""

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal received; 0: none
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum  # async-signal context: set a flag, nothing else

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python lets only the main thread set handlers; the defaults stay
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def agreed(self) -> int:
        """The signal every rank stops for (the largest number any rank received; 0: none). Collective."""
        if not distributed.is_dist():
            return self.signum
        flag = torch.tensor([float(self.signum)], device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def ignore_stop_signals(worker_id: int, then: Optional[Callable[[int], None]] = None) -> None:
    """A DataLoader worker's init: the stop signals reach the whole process group (Ctrl-C, SLURM), but
    only the main process acts on them and shuts its workers down; SIGUSR1 would kill them outright."""
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


@contextlib.contextmanager
def worker_batches(loader):
    """Iterate ``loader``; its worker processes are shut down when the block is left, by an error too.

    Otherwise a traceback that keeps the iterator alive (an error caught and reported as one line)
    keeps its workers alive: they ignore the stop signals (:func:`ignore_stop_signals`), so the
    interpreter would wait for them at exit.
    """
    it = iter(loader)
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator only
        if shutdown is not None:
            shutdown()


class SkipBatches:
    """The batches of ``batch_sampler`` after its first ``skip``: a mid-epoch resume draws the epoch's
    batch order as the interrupted run did (the base sampler is seeded per (seed, epoch)) and skips
    the batches already trained on at the index level, without loading their images."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        it = iter(self.batch_sampler)
        for _ in range(self.skip):
            if next(it, None) is None:
                return
        yield from it

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def skip_batches(loader, skip: int):
    """``loader`` (built with a ``batch_sampler``) without its epoch's first ``skip`` batches."""
    from torch.utils.data import DataLoader

    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(
        loader.dataset,
        batch_sampler=SkipBatches(loader.batch_sampler, skip),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=False,
        **extra,
    )


@dataclass
class TrainState:
    """The run's progress: saved in every checkpoint and restored by ``--resume``."""

    epoch: int = 0  # the next epoch to train
    iteration: int = 0
    skipped: int = 0
    consecutive_skips: int = 0
    amp_overflows: int = 0
    warmup_total: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)  # one record per evaluation

    def state_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        # Plain types only, so the checkpoint loads under weights_only=True.
        out["history"] = [_plain(h) for h in self.history]
        return out

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        for f in ("epoch", "iteration", "skipped", "amp_overflows", "warmup_total"):
            if f in saved:
                setattr(self, f, int(saved[f]))
        self.consecutive_skips = 0
        self.history = list(saved.get("history", []))


def _plain(record: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = _plain(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[k] = list(v)
    return out


# -- one step -------------------------------------------------------------------------------------
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


def apply_nonfinite_policy(
    result: StepResult,
    ctx: StepContext,
    state: TrainState,
    epoch: int,
    policy: str,
    max_skips: int,
    writer,
    image_ids: Sequence[int] = (),
) -> None:
    """A non-finite loss or gradient never reaches the weights: ``stop`` raises, ``skip`` counts it.
    ``image_ids``: the batch's images (this rank's), named so that bad data can be told from a bad lr."""
    keys, values, it = result.loss_keys, result.values, state.iteration
    culprits = [k for k in keys + ["grad_norm"] if not math.isfinite(values[k])] or ["a loss term on another rank"]
    batch = f", images {', '.join(str(i) for i in image_ids)}" if image_ids else ""
    msg = (
        f"non-finite {', '.join(culprits)} at epoch {epoch}, iteration {it}{batch} "
        f"(losses: {', '.join(f'{k}={values[k]:.4g}' for k in keys)}; grad_norm={values['grad_norm']:.4g})"
    )
    ctx.optimizer.zero_grad(set_to_none=True)
    writer.record({"type": "nonfinite", "epoch": epoch, "iter": it, "terms": culprits, **values})
    if policy == "stop":
        raise NonFiniteError(
            msg + ". Stopped before the step (--nan-policy stop); checkpoints on disk are intact. "
            "Try --clip-grad-norm 35, a lower --lr, or --nan-policy skip; if it recurs on the same images, check "
            "their annotations."
        )
    state.skipped += 1
    state.consecutive_skips += 1
    if ctx.scaler is not None:
        ctx.scaler.update()  # lower the loss scale as for an overflow
    writer.say(f"skipped step: {msg}")
    if state.consecutive_skips >= max_skips:
        raise NonFiniteError(
            f"{state.consecutive_skips} consecutive steps skipped (--max-consecutive-skips); last: {msg}"
        )


def optimizer_step(ctx: StepContext, result: StepResult, state: TrainState) -> None:
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)  # skips the step itself on an AMP overflow
        ctx.scaler.update()
        state.amp_overflows += int(result.amp_overflow)
    else:
        ctx.optimizer.step()
    state.consecutive_skips = 0


# -- logging ----------------------------------------------------------------------------------------
def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricLogger:
    """Epoch means of the logged values, the window's speed, and the periodic log line."""

    def __init__(self, epoch: int, n_iters: int, print_freq: int):
        self.epoch, self.n_iters, self.print_freq = epoch, n_iters, print_freq
        self.sums: Dict[str, float] = defaultdict(float)
        self.count = 0
        self.grad_max = 0.0
        self.total_imgs = 0
        self.window_imgs = 0
        self.t0 = self.window_t0 = time.perf_counter()
        self.stat_sums: Dict[str, torch.Tensor] = {}
        self.stat_windows = 0
        self.start = 0  # iterations of the epoch done before this process (a mid-epoch resume)

    def state_dict(self) -> Dict[str, Any]:
        """The epoch's partial sums, for a mid-epoch checkpoint (the epoch means then come out the same)."""
        return {
            "sums": dict(self.sums),
            "count": self.count,
            "grad_max": self.grad_max,
            "total_imgs": self.total_imgs,
            "stat_sums": {k: v.detach().cpu() for k, v in self.stat_sums.items()},
            "stat_windows": self.stat_windows,
        }

    def load_state_dict(self, saved: Dict[str, Any], start: int, device: torch.device) -> None:
        self.sums.update(saved.get("sums", {}))
        self.count, self.grad_max = int(saved.get("count", 0)), float(saved.get("grad_max", 0.0))
        self.total_imgs, self.stat_windows = int(saved.get("total_imgs", 0)), int(saved.get("stat_windows", 0))
        self.stat_sums = {k: v.to(device) for k, v in saved.get("stat_sums", {}).items()}
        self.start = start

    def update(self, result: StepResult) -> None:
        for k, v in result.values.items():
            if math.isfinite(v):
                self.sums[k] += v
        if math.isfinite(result.values["grad_norm"]):
            self.grad_max = max(self.grad_max, result.values["grad_norm"])
        self.count += 1
        self.window_imgs += result.images
        self.total_imgs += result.images

    def due(self, i: int) -> bool:
        return (i + 1) % self.print_freq == 0 or i + 1 == self.n_iters

    def emit(self, i: int, model, optimizer, state: TrainState, result: StepResult, writer) -> None:
        # The heads' statistics, sampled at the print points (the epoch mean is over these).
        stats = tv_lossfix.training_stats(model)
        for k, v in stats.items():
            self.stat_sums[k] = self.stat_sums[k] + v if k in self.stat_sums else v.clone()
        self.stat_windows += 1 if stats else 0
        now = time.perf_counter()
        speed = self.window_imgs / max(now - self.window_t0, 1e-9)
        eta = (now - self.t0) / max(i + 1 - self.start, 1) * (self.n_iters - i - 1)
        lr = optimizer.param_groups[0]["lr"]
        names = list(stats)
        head_stats = dict(zip(names, torch.stack([stats[k] for k in names]).tolist())) if stats else {}
        values = result.values
        writer.record(
            {
                "type": "train",
                "epoch": self.epoch,
                "iter": state.iteration,
                "lr": lr,
                **values,
                "img_per_s": speed,
                **head_stats,
            }
        )
        terms = " ".join(f"{k.replace('loss_', '')} {values[k]:.4f}" for k in result.loss_keys)
        writer.say(
            f"epoch {self.epoch} [{i + 1:>{len(str(self.n_iters))}}/{self.n_iters}] eta {_fmt_eta(eta)} lr {lr:.5f} "
            f"loss {values['loss']:.4f} ({terms}) grad_norm {values['grad_norm']:.3f} {speed:.1f} img/s"
        )
        self.window_imgs, self.window_t0 = 0, now

    def summary(self, state: TrainState) -> Dict[str, float]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        out.update(
            grad_norm_max=self.grad_max,
            steps=self.count,
            skipped_steps=state.skipped,
            world_size=distributed.world(),
            epoch_time=time.perf_counter() - self.t0,
        )
        out["img_per_s"] = self.total_imgs / max(out["epoch_time"], 1e-9)
        if self.stat_sums and self.stat_windows:
            names = list(self.stat_sums)
            out.update(dict(zip(names, (torch.stack([self.stat_sums[k] for k in names]) / self.stat_windows).tolist())))
        return out


def _progress_bar(n_iters: int, epoch: int):
    if not distributed.is_main():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=n_iters, desc=f"epoch {epoch}", disable=None, dynamic_ncols=True, leave=False)


class StepHooks:
    """What :func:`train_one_epoch` calls at each iteration (trainer.Trainer dispatches to its hooks)."""

    def after_optimizer_step(self) -> None:
        """Right after a finite step's optimizer step, before the iteration is counted and logged."""

    def after_step(self, done: int, n_iters: int, meter: "MetricLogger", result: StepResult) -> None:
        """At the iteration boundary, after the log line; may raise :class:`Preempted` (a stop)."""


def _step(ctx, images, targets, epoch, state, training_cfg, meter, writer, hooks) -> StepResult:
    """One iteration: the step, then the optimizer step and the hooks' after it, or the NaN policy."""
    result = train_step(ctx, images, targets)
    if result.any_bad and not result.amp_overflow:
        policy, max_skips = training_cfg.nan_policy, training_cfg.max_consecutive_skips
        # The loader's targets are CPU tensors: reading their ids costs no device sync (bad steps only).
        ids = [int(t["image_id"]) for t in targets if "image_id" in t]
        apply_nonfinite_policy(result, ctx, state, epoch, policy, max_skips, writer, ids)
    else:
        optimizer_step(ctx, result, state)
        hooks.after_optimizer_step()  # warmup steps here (trainer's LRSchedule): the log line shows its lr
        meter.update(result)
    state.iteration += 1
    return result


def train_one_epoch(
    ctx: StepContext,
    loader,
    epoch: int,
    state: TrainState,
    training_cfg: TrainingConfig,
    writer,
    max_iters: Optional[int] = None,
    start: int = 0,
    meter_state: Optional[Dict[str, Any]] = None,
    hooks: Optional[StepHooks] = None,
) -> Dict[str, float]:
    """Train for one epoch; returns the epoch's means (losses, grad_norm, head statistics).

    A mid-epoch resume passes ``start`` (iterations done; ``loader`` then yields the epoch's batches
    after them) and the saved ``meter_state``. ``hooks`` (:class:`StepHooks`) run after each optimizer
    step and at every iteration boundary (periodic checkpoints; a stop raises :class:`Preempted` there).
    """
    hooks = hooks if hooks is not None else StepHooks()
    ctx.model.train()
    total = start + len(loader)
    n_iters = total if max_iters is None else min(total, max_iters)
    meter = MetricLogger(epoch, n_iters, training_cfg.print_freq)
    if meter_state is not None:
        meter.load_state_dict(meter_state, start, ctx.device)
    bar = _progress_bar(n_iters, epoch)
    if bar is not None and start:
        bar.update(start)
    with worker_batches(loader) as batches:
        for i, (images, targets) in enumerate(batches, start):
            if i >= n_iters:
                break
            result = _step(ctx, images, targets, epoch, state, training_cfg, meter, writer, hooks)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.values['loss']:.3f}", refresh=False)
            if not result.any_bad or result.amp_overflow:
                if meter.due(i):
                    meter.emit(i, ctx.model, ctx.optimizer, state, result, writer)
            try:
                hooks.after_step(i + 1, n_iters, meter, result)
            except Preempted:
                if bar is not None:
                    bar.close()
                raise
    if bar is not None:
        bar.close()
    return meter.summary(state)
