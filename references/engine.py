"""The training loop of one epoch (torchvision's ``train_one_epoch``) and what it keeps.

``train_one_epoch`` runs :func:`run_step` per batch (step.py: the step, then the optimizer step or the NaN
policy), the log line (meter.py) and the hooks' ``before_step`` / ``after_step`` (hooks.py), and raises
preemption.Preempted after the hooks of a step that received a stop signal. :class:`TrainState` is the
run's progress a checkpoint restores; :class:`Progress` is the one object the hooks read (the trainer owns
it): where the loop is and what the last step measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from meter import MetricLogger, progress_bar
from preemption import Preempted, worker_batches
from step import StepContext, StepResult, apply_nonfinite_policy, optimizer_step, train_step


@dataclass
class TrainState:
    """The run's progress: saved in every checkpoint and restored by ``--resume``."""

    epoch: int = 0  # the next epoch to train (while an epoch trains: that epoch)
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


@dataclass
class Progress:
    """What the hooks read (``self.trainer.progress``): where the loop is and what its last step measured."""

    state: TrainState  # the saved progress: state.iteration counts every step of the run
    epoch: int = 0  # the epoch being trained
    done: int = 0  # its iterations done (a mid-epoch resume starts past 0)
    n_iters: int = 0  # its iterations (the loader's, capped by --iters-per-epoch)
    result: Optional[StepResult] = None  # the last step: values (each loss, "loss", "grad_norm"), any_bad, stop
    meter: Optional[MetricLogger] = None  # the epoch's running numbers (a mid-epoch checkpoint saves them)
    lr: float = 0.0  # the first parameter group's lr after the last step (its warmup step included)
    stats: Dict[str, float] = field(default_factory=dict)  # after_epoch: the epoch's means
    outcome: str = "running"  # at after_train: "done", "stopped" (a signal), "nonfinite" or "error"
    meter_state: Optional[Dict[str, Any]] = None  # a mid-epoch resume: the saved meter, read as the epoch starts

    @property
    def iteration(self) -> int:
        return self.state.iteration


def run_step(ctx: StepContext, images, targets, progress: Progress) -> StepResult:
    """One iteration: the step, then the optimizer step (and warmup), or the NaN policy."""
    state = progress.state
    result = train_step(ctx, images, targets)
    if result.stepped:
        optimizer_step(ctx, result, state)
        progress.meter.update(result)
    else:
        # The loader's targets are CPU tensors: reading their ids costs no device sync (bad steps only).
        ids = [int(t["image_id"]) for t in targets if "image_id" in t]
        apply_nonfinite_policy(ctx, result, state, ids)
    state.iteration += 1
    progress.result, progress.lr = result, ctx.optimizer.param_groups[0]["lr"]
    return result


def train_one_epoch(ctx: StepContext, loader, progress: Progress, hooks: Sequence = ()) -> Dict[str, float]:
    """Train epoch ``progress.epoch``; returns its means (losses, grad_norm, head statistics).

    ``progress.done`` iterations are already done (a mid-epoch resume: ``loader`` then yields the epoch's
    batches after them; ``progress.meter_state`` holds the saved meter). Each iteration calls the
    ``hooks``' ``before_step`` and, after the log line, ``after_step``; a stop signal raises
    preemption.Preempted after them (the checkpoint hook has saved that iteration).
    """
    ctx.model.train()
    start = progress.done
    total = start + len(loader)
    n_iters = progress.n_iters = total if ctx.max_iters is None else min(total, ctx.max_iters)
    meter = progress.meter = MetricLogger(progress.epoch, n_iters, ctx.print_freq)
    if progress.meter_state is not None:
        meter.load_state_dict(progress.meter_state, start, ctx.device)
        progress.meter_state = None
    bar = progress_bar(n_iters, progress.epoch, start)
    try:
        with worker_batches(loader) as batches:
            for i, (images, targets) in enumerate(batches, start):
                if i >= n_iters:
                    break
                for h in hooks:
                    h.before_step()
                result = run_step(ctx, images, targets, progress)
                progress.done = i + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.values['loss']:.3f}", refresh=False)
                if result.stepped and meter.due(progress.done):
                    meter.emit(ctx.model, progress, ctx.writer)
                for h in hooks:
                    h.after_step()
                if result.stop:
                    raise Preempted(ctx.stop.agreed(), progress.epoch, progress.done, n_iters)
    finally:
        if bar is not None:
            bar.close()
    return meter.summary(progress.state)
