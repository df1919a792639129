"""The epoch loop and its hook points (Detectron2's HookBase, epoch-based as torchvision's recipe).

:class:`Trainer` owns what training needs (model, optimizer, schedulers, scaler, progress, data,
writer) and runs the epochs; an epoch's loop is engine.train_one_epoch. Everything periodic is a hook
(hooks.py): adding an action is one more :class:`hooks.HookBase` in the list, in the order the hooks
should run. The hooks read ``trainer.progress`` (engine.Progress).

Per run: the hooks' saved states (--resume) -> ``before_train`` -> for each epoch ``before_epoch`` -> per
iteration ``before_step``, ``after_step`` -> ``after_epoch`` -> ``after_train``, always (a ``finally``):
after every epoch, or after a stop signal (exit code 128 + signal), a non-finite step (2) or an error.
"""

from __future__ import annotations

import functools
import os
import signal
from typing import Dict, List, Optional, Sequence

import distributed
from engine import Progress, TrainState, train_one_epoch
from hooks import Checkpointer, HookBase
from preemption import Preempted, StopRequest, ignore_stop_signals
from samplers import skip_batches
from step import NonFiniteError, StepContext
from train_config import TrainingConfig
from training_checkpoint import TrainingParts, restore_rng


def iters_per_epoch(loader, t: TrainingConfig) -> int:
    """An epoch's iterations: the loader's length, capped by --iters-per-epoch."""
    return len(loader) if t.iters_per_epoch is None else min(len(loader), t.iters_per_epoch)


class Trainer:
    """Runs the epochs of a built run (``run``: run_context.Run; ``data``: run_data.Data; ``parts``: the
    model without its DDP wrapper, optimizer, schedulers, scaler and state, as checkpoints hold them)."""

    def __init__(self, run, model, data, parts: TrainingParts, hooks: Sequence[HookBase]):
        self.run, self.writer, self.model, self.data, self.parts = run, run.writer, model, data, parts
        t = self.cfg.training
        clip = t.gradient_clip
        self.ctx = StepContext(
            model,
            parts.optimizer,
            run.device,
            parts.scaler,
            clip.max_norm if clip.enabled else float("inf"),
            clip.norm_type,
            warmup=parts.warmup,
            nan_policy=t.nan_policy,
            max_consecutive_skips=t.max_consecutive_skips,
            print_freq=t.print_freq,
            max_iters=t.iters_per_epoch,
            writer=run.writer,
        )
        self.progress = Progress(parts.state)
        self.hooks: List[HookBase] = []
        parts.hooks = self.hooks  # their states go into every checkpoint
        for h in hooks:
            self.register(h)

    def register(self, hook: HookBase) -> None:
        if any(h.name == hook.name for h in self.hooks):
            raise ValueError(f"a hook named {hook.name!r} is registered twice (its checkpoint state is keyed by name)")
        hook.trainer = self
        self.hooks.append(hook)

    @property
    def cfg(self):
        return self.run.cfg

    @property
    def net(self):
        return self.parts.net

    @property
    def optimizer(self):
        return self.parts.optimizer

    @property
    def lr_scheduler(self):
        return self.parts.lr_scheduler

    @property
    def state(self) -> TrainState:
        return self.parts.state

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> int:
        """The epochs from ``state.epoch`` on; the run's exit code (0, 2: non-finite, 128 + signal: stopped).
        ``after_train`` runs in any case (an error in it after another error is said, not raised)."""
        failed = True
        try:
            self._load_hook_states()
            for h in self.hooks:
                h.before_train()
            code = self._train()
            failed = False
            return code
        finally:
            if failed:
                self.progress.outcome = "error"
            self._after_train(failed)

    def _train(self) -> int:
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
        self.progress.outcome = "done"
        return 0

    def _after_train(self, failed: bool) -> None:
        for h in self.hooks:
            try:
                h.after_train()
            except Exception as e:
                if not failed:
                    raise
                self.writer.say(f"WARNING: hook {h.name}: after_train failed after the error below: {e}")

    def _load_hook_states(self) -> None:
        """The hooks' states a --resume checkpoint holds (one without them: the hooks start afresh)."""
        saved = (self.run.resume_ckpt or {}).get("hooks") or {}
        names = {h.name for h in self.hooks}
        for h in self.hooks:
            if h.name in saved:
                h.load_state_dict(saved[h.name])
        for name in sorted(set(saved) - names):
            self.writer.say(f"--resume: the checkpoint holds the state of hook {name}, which this run does not have")

    def _say_plan(self) -> None:
        t = self.cfg.training
        iters = iters_per_epoch(self.data.train_loader, t)
        # A sampler whose length follows each epoch's draw (repeat factors): this is epoch 0's.
        about = "~" if not self.data.base_sampler.exact_length and iters == len(self.data.train_loader) else ""
        clip = t.gradient_clip
        self.writer.say(
            f"training {t.epochs - self.state.epoch} epoch(s) x {about}{iters} iterations, batch "
            f"{t.batch_size} x {distributed.world()}; gradient clipping "
            f"{'max_norm ' + str(clip.max_norm) if clip.enabled else 'off'}"
        )

    def _epoch(self, epoch: int, stop: StopRequest) -> Optional[int]:
        """One epoch and its hooks; an exit code where the run ends here, else None."""
        p = self.progress
        p.epoch, p.done, p.result, p.stats = epoch, 0, None, {}
        for h in self.hooks:
            h.before_epoch()
        try:
            p.stats = self._train_epoch(epoch)
        except NonFiniteError as e:
            self.writer.say(f"ERROR: {e}")
            self.writer.record({"type": "stopped", "epoch": epoch, "iter": self.state.iteration, "reason": str(e)})
            p.outcome = "nonfinite"
            return 2
        except Preempted as stopped:
            return self._stopped(stopped)
        self.state.epoch = epoch + 1  # saved by the epoch checkpoint (a hook)
        try:
            for h in self.hooks:
                h.after_epoch()
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
        run, data = self.run, self.data
        data.base_sampler.set_epoch(epoch)
        loader, pos = data.train_loader, run.in_epoch
        if pos is not None and pos["epoch"] == epoch:
            run.in_epoch = None
            self.progress.done, self.progress.meter_state = int(pos["iteration"]), pos.get("meter")
            loader = iter(skip_batches(data.train_loader, self.progress.done))
            if run.resume_ckpt.get("rng"):
                # Creating the iterator drew its seed from the torch RNG, as the interrupted run's did at the
                # start of the epoch: the saved states now continue from exactly where they were saved.
                restore_rng(run.resume_ckpt["rng"], run.rank)
        return train_one_epoch(self.ctx, loader, self.progress, self.hooks)

    def _stopped(self, p: Preempted) -> int:
        """The one line a stopped run ends with, and its exit code (128 + the signal, as shells report)."""
        self.progress.outcome = "stopped"
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
