"""The epoch loop and its hook points (Detectron2's HookBase idea, epoch-based as torchvision's recipe).

:class:`Trainer` owns what training needs (model, optimizer, schedulers, scaler, progress, data,
writer) and runs the epochs; the step is engine's. Everything periodic is a hook (hooks.py): adding an
action is one more :class:`hooks.HookBase` in the list, in the order the hooks should run.

Per run: ``before_train`` -> for each epoch ``before_epoch`` -> per iteration ``after_optimizer_step``
(finite steps only) and ``after_step`` -> ``after_epoch`` -> ``after_train`` (when every epoch ran; a
stop signal or a non-finite step ends the run without it, with exit code 128 + signal or 2).
"""

from __future__ import annotations

import functools
import os
import signal
from typing import Dict, List, Optional, Sequence

import distributed
from data import RepeatFactorSampler
from engine import (
    MetricLogger,
    NonFiniteError,
    Preempted,
    StepContext,
    StepHooks,
    StepResult,
    StopRequest,
    TrainState,
    ignore_stop_signals,
    skip_batches,
    train_one_epoch,
)
from hooks import Checkpointer, HookBase
from train_config import TrainingConfig
from training_checkpoint import restore_rng


def iters_per_epoch(loader, t: TrainingConfig) -> int:
    """An epoch's iterations: the loader's length, capped by --iters-per-epoch."""
    return len(loader) if t.iters_per_epoch is None else min(len(loader), t.iters_per_epoch)


class Trainer(StepHooks):
    """Runs the epochs of a built run (``run``: run_context.Run; ``data``: run_data.Data)."""

    def __init__(
        self, run, model, net, data, optimizer, lr_scheduler, warmup, scaler, state: TrainState, hooks: Sequence
    ):
        self.run, self.writer = run, run.writer
        self.model, self.net, self.data = model, net, data  # net: the model without its DDP wrapper
        self.lr_scheduler, self.warmup, self.state = lr_scheduler, warmup, state
        clip = self.cfg.training.gradient_clip
        max_norm = clip.max_norm if clip.enabled else float("inf")
        self.ctx = StepContext(model, optimizer, run.device, scaler, max_norm, clip.norm_type)
        self.epoch: Optional[int] = None  # the epoch being trained
        self.meter: Optional[MetricLogger] = None  # its running numbers (a mid-epoch checkpoint saves them)
        self.hooks: List[HookBase] = []
        for h in hooks:
            self.register(h)

    def register(self, hook: HookBase) -> None:
        hook.trainer = self
        self.hooks.append(hook)

    @property
    def cfg(self):
        return self.run.cfg

    @property
    def optimizer(self):
        return self.ctx.optimizer

    @property
    def scaler(self):
        return self.ctx.scaler

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> int:
        """The epochs from ``state.epoch`` on; the run's exit code (0, 2: non-finite, 128 + signal: stopped)."""
        for h in self.hooks:
            h.before_train()
        self._say_plan()
        # SIGINT / SIGTERM / SIGUSR1 stop at the next iteration boundary with a checkpoint (handlers restored after).
        with StopRequest() as stop:
            self.ctx.stop = stop
            for loader in (self.data.train_loader, self.data.val_loader):
                loader.worker_init_fn = functools.partial(ignore_stop_signals, then=loader.worker_init_fn)
            for epoch in range(self.state.epoch, self.cfg.training.epochs):
                code = self._epoch(epoch, stop)
                if code is not None:
                    return code
        for h in self.hooks:
            h.after_train()
        return 0

    def _say_plan(self) -> None:
        t = self.cfg.training
        iters = iters_per_epoch(self.data.train_loader, t)
        # Under repeat-factor sampling each epoch's length follows its own draw (this is epoch 0's).
        repeat = isinstance(self.data.base_sampler, RepeatFactorSampler)
        about = "~" if repeat and iters == len(self.data.train_loader) else ""
        clip = t.gradient_clip
        self.writer.say(
            f"training {t.epochs - self.state.epoch} epoch(s) x {about}{iters} iterations, batch "
            f"{t.batch_size} x {distributed.world()}; gradient clipping "
            f"{'max_norm ' + str(clip.max_norm) if clip.enabled else 'off'}"
        )

    def _epoch(self, epoch: int, stop: StopRequest) -> Optional[int]:
        """One epoch and its hooks; an exit code where the run ends here, else None."""
        self.epoch = epoch
        for h in self.hooks:
            h.before_epoch(epoch)
        try:
            stats = self._train_epoch(epoch)
        except NonFiniteError as e:
            self.writer.say(f"ERROR: {e}")
            self.writer.record({"type": "stopped", "epoch": epoch, "iter": self.state.iteration, "reason": str(e)})
            return 2
        except Preempted as p:
            return self._stopped(p)
        self.state.epoch = epoch + 1  # saved by the epoch checkpoint (a hook)
        try:
            for h in self.hooks:
                h.after_epoch(epoch, stats)
        except BaseException:
            self._save_epoch_anyway(epoch)
            raise
        signum = stop.agreed()  # a signal during evaluation or the save: stop here, the epoch is saved
        if signum:
            n_iters = iters_per_epoch(self.data.train_loader, self.cfg.training)
            return self._stopped(Preempted(signum, epoch + 1, 0, n_iters))
        return None

    def _save_epoch_anyway(self, epoch: int) -> None:
        """A hook before the checkpoint failed (evaluation, most likely): the trained epoch is saved all the
        same, so that the run resumes after fixing the cause instead of training the epoch again."""
        for h in self.hooks:
            if isinstance(h, Checkpointer) and h.saved_epoch != epoch:
                h.save(epoch)
                where = os.path.join(self.run.out_dir, "checkpoint.pth") if self.run.out_dir else None
                if where:
                    self.writer.say(f"epoch {epoch} saved to {where} before the error below (--resume continues it)")

    def _train_epoch(self, epoch: int) -> Dict[str, float]:
        """engine.train_one_epoch; a mid-epoch resume continues where its checkpoint stopped."""
        t, run, data = self.cfg.training, self.run, self.data
        if hasattr(data.base_sampler, "set_epoch"):
            data.base_sampler.set_epoch(epoch)
        loader, start, meter_state = data.train_loader, 0, None
        pos = run.in_epoch
        if pos is not None and pos["epoch"] == epoch:
            run.in_epoch = None
            start, meter_state = int(pos["iteration"]), pos.get("meter")
            loader = iter(skip_batches(data.train_loader, start))
            if run.resume_ckpt.get("rng"):
                # Creating the iterator drew its seed from the torch RNG, as the interrupted run's did at the
                # start of the epoch: the saved states now continue from exactly where they were saved.
                restore_rng(run.resume_ckpt["rng"], run.rank)
        return train_one_epoch(
            self.ctx, loader, epoch, self.state, t, self.writer, t.iters_per_epoch, start, meter_state, self
        )

    # -- engine's StepHooks: dispatch to the hooks ----------------------------------------------------
    def after_optimizer_step(self) -> None:
        for h in self.hooks:
            h.after_optimizer_step()

    def after_step(self, done: int, n_iters: int, meter: MetricLogger, result: StepResult) -> None:
        self.meter = meter
        for h in self.hooks:
            h.after_step(done, n_iters, result)
        if result.stop:  # after the hooks: the checkpoint hook has saved this iteration
            raise Preempted(self.ctx.stop.agreed(), self.epoch, done, n_iters)

    def _stopped(self, p: Preempted) -> int:
        """The one line a stopped run ends with, and its exit code (128 + the signal, as shells report)."""
        name, total = signal.Signals(p.signum).name, self.state.iteration
        where = f"epoch {p.epoch}, iteration {p.iteration}/{p.n_iters} of the epoch ({total} in all)"
        if p.iteration == 0:
            where = f"the end of epoch {p.epoch - 1} ({total} iterations in all)"
        out_dir = self.run.out_dir
        path = os.path.abspath(os.path.join(out_dir, "checkpoint.pth")) if out_dir else None
        if path:
            self.writer.say(
                f"stopped by {name} at {where}: saved {path}; to resume, run the same command with --resume {path}"
            )
        else:
            self.writer.say(f"stopped by {name} at {where}: nothing saved (--output-dir '')")
        self.writer.record({"type": "stopped", "epoch": p.epoch, "iter": total, "reason": name, "checkpoint": path})
        return 128 + p.signum
