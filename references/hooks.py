"""The training loop's hooks: :class:`HookBase`, the one protocol trainer.Trainer calls, and the recipe's.

Adding a hook: a :class:`HookBase` subclass overriding the points it acts at; pass an instance to
``train.main(argv, hooks=[...])`` (or add it to :func:`default_hooks` to run it in every run).
:func:`default_hooks` is the recipe's list, in the order they run at each point:

=================  ======================================================================================
``LRSchedule``     after_epoch: the epoch's lr scheduler step (before the evaluation, as torchvision's script)
``StartupReport``  before_train: the lr check and the data / anchor report
``Evaluation``     after_epoch: the epoch's ``eval`` record; when due, COCO evaluation, per-class
                   table, collapse warnings
``Checkpointer``   after_step: --checkpoint-every-iters and the checkpoint on a stop signal;
                   after_epoch: checkpoint.pth + model_<epoch>.pth
``FinalReport``    after_train (of a run that trained every epoch): plots, gallery, the "done in" line
=================  ======================================================================================
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Dict, List, Sequence

import distributed
from diagnostics import collapse_warnings, linear_scaling_lr, lr_warning, per_class_table
from evaluation import evaluate
from run_data import rare_cure
from tiles import sliced
from training_checkpoint import save_training_checkpoint


class HookBase:
    """The one hook protocol ``Trainer`` calls (Detectron2's HookBase, with the epoch points of torchvision's
    epoch-based recipe). A no-op at every point; subclasses override the points they act at.

    Every point takes no argument: a hook reads ``self.trainer`` (trainer.Trainer: model, optimizer, run,
    data, writer) and ``self.trainer.progress`` (engine.Progress: the epoch, its iterations done, the last
    step's ``result`` with its losses, the ``meter``, the ``lr``, the epoch's ``stats``, the ``outcome``).
    Hooks run in the order of the trainer's list at each point.

    ``state_dict`` / ``load_state_dict``: a hook with state of its own returns it as plain Python types
    (the checkpoint loads under ``weights_only=True``); it is saved in every training checkpoint under
    ``hooks[<name>]`` and given back before ``before_train`` on --resume (a checkpoint without it: none).
    """

    trainer: Any = None  # set by Trainer.register

    @property
    def name(self) -> str:
        """The key of the hook's state in a checkpoint (unique among a trainer's hooks)."""
        return type(self).__name__

    def before_train(self) -> None:
        """Once, after --resume was applied (the hooks' states too) and before the first step."""

    def before_epoch(self) -> None:
        """Before the steps of epoch ``progress.epoch``."""

    def before_step(self) -> None:
        """Before each step, its batch loaded (``progress.done``: the epoch's iterations done before it)."""

    def after_step(self) -> None:
        """After each step and its log line: ``progress.result`` (``result.stop``: a stop signal; the trainer
        stops after the hooks), ``progress.done`` of ``progress.n_iters``, ``progress.iteration`` in all."""

    def after_epoch(self) -> None:
        """After the epoch's steps (``progress.state.epoch`` is already ``progress.epoch + 1``); its means
        in ``progress.stats``."""

    def after_train(self) -> None:
        """Always last, in a ``finally``: after the last epoch, a stop signal, a non-finite step or an error;
        ``progress.outcome`` says which ("done", "stopped", "nonfinite", "error")."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Given the hook's saved ``state_dict`` on --resume."""


def default_hooks(extra: Sequence[HookBase] = ()) -> List[HookBase]:
    """The recipe's hooks; ``extra`` run after the evaluation and before the checkpoint (so that their
    state in a checkpoint is that of the same step)."""
    return [LRSchedule(), StartupReport(), Evaluation(), *extra, Checkpointer(), FinalReport()]


class LRSchedule(HookBase):
    """The epoch's lr scheduler step, before the evaluation as torchvision's script (the warmup steps
    inside the loop, step.optimizer_step, as torchvision's does)."""

    def after_epoch(self) -> None:
        self.trainer.lr_scheduler.step()


class StartupReport(HookBase):
    def before_train(self) -> None:
        tr = self.trainer
        report_before_step_one(tr.run, tr.data, tr.model)


def report_before_step_one(run, data, model) -> None:
    """The lr check and the data / anchor report, before the first step (Lightning's loop calls it too)."""
    t = run.cfg.training
    images = t.batch_size * distributed.world()
    warning = lr_warning(t.lr, images, t.warmup_iters, t.opt)
    if warning:
        run.writer.say("WARNING: " + warning)
    run.writer.record(
        {
            "type": "lr_check",
            "lr": t.lr,
            "images_per_step": images,
            "linear_scaling_lr": linear_scaling_lr(images, t.opt),
            "warning": warning,
        }
    )
    if run.cfg.data.report and distributed.is_main():
        from data_report import data_report

        net = getattr(model, "module", model)
        report = data_report(data.train_set.coco, net, data.names, data.label_to_cat, cfg=run.cfg)
        run.writer.say(report.text())
        run.writer.record({"type": "data_report", **report.to_dict()})


class Evaluation(HookBase):
    """The epoch's ``eval`` record; every --eval-every epochs and after the last, the COCO evaluation
    with the per-class table and the collapse warnings in it."""

    _finding: Any = False  # the input-scale rule on the training boxes, computed at the first warning check

    def _scale(self):
        from data_report import scale_finding

        tr = self.trainer
        if self._finding is False:
            train_set, d = tr.data.train_set, tr.cfg.data
            tile = (d.tile_size, d.tile_overlap) if d.tile_size else None
            net = getattr(tr.model, "module", tr.model)
            self._finding = (
                scale_finding(net, train_set.coco.dataset, tile, d.augmentation) if train_set is not None else None
            )
        return self._finding

    def after_epoch(self) -> None:
        tr, t = self.trainer, self.trainer.cfg.training
        epoch, stats = tr.progress.epoch, tr.progress.stats
        record = {
            "type": "eval",
            "epoch": epoch,
            "train_loss": stats.get("loss"),
            "img_per_s": stats["img_per_s"],
            "skipped_steps": tr.state.skipped,
            "amp_overflows": tr.state.amp_overflows,
        }
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
            self._evaluate(epoch, record, stats)
        tr.writer.record(record)

    def _evaluate(self, epoch: int, record: Dict[str, Any], train_stats: Dict[str, float]) -> None:
        tr, data, say = self.trainer, self.trainer.data, self.trainer.writer.say
        d = tr.cfg.data
        res = evaluate(
            sliced(tr.model, d.tile_size, d.tile_overlap, d.tile_whole_image),
            data.val_loader,
            tr.run.device,
            data.coco_val,
            data.label_to_cat,
            tr.writer,
            data.names,
        )
        if not distributed.is_main():
            return
        record.update(res)
        say(f"per class (score >= {res['score_thresh']:g}):\n" + per_class_table(res["per_class"], res["score_thresh"]))
        state = tr.state
        judge_after = max(tr.cfg.training.judge_after_iters, state.warmup_total)
        scale = self._scale()
        cure = rare_cure(tr.run, data, scale_fires=bool(scale is not None and scale.fires))
        warnings = collapse_warnings(
            state.history,
            record,
            train_stats,
            tr.cfg,
            data.gt_per_image,
            state.iteration,
            judge_after,
            cure,
            scale,
        )
        for w in warnings:
            say(("WARNING: " if not w.startswith("  ") else "") + w)
        record["warnings"] = warnings
        say(
            f"epoch {epoch}: bbox AP {res.get('bbox_AP', 0):.4f}"
            + (f", segm AP {res['segm_AP']:.4f}" if "segm_AP" in res else "")
            + f", {res['dets_per_image']:.2f} detections/image (gt {data.gt_per_image:.2f}), "
            f"max score {res['max_score']:.3f}"
        )
        state.history.append(record)


class Checkpointer(HookBase):
    """checkpoint.pth (and model_<epoch>.pth) after every epoch; mid-epoch every --checkpoint-every-iters
    iterations and at the boundary where a stop signal arrived (with the epoch's position and meter)."""

    def after_step(self) -> None:
        p = self.trainer.progress
        every = self.trainer.cfg.training.checkpoint_every_iters
        if p.result.stop or (every and p.iteration % every == 0):
            self.save(p.epoch - 1, {"epoch": p.epoch, "iteration": p.done, "meter": p.meter.state_dict()})

    saved_epoch = None  # the last epoch whose end-of-epoch checkpoint was written

    def after_epoch(self) -> None:
        self.save(self.trainer.progress.epoch)

    def save(self, epoch: int, in_epoch=None) -> None:
        """The checkpoint after ``epoch`` (plus ``in_epoch``: how far the next one got)."""
        if in_epoch is None:
            self.saved_epoch = epoch
        save_training_checkpoint(self.trainer.parts, epoch, in_epoch)
        distributed.barrier()


class FinalReport(HookBase):
    """training_curves.png, eval_curves.png, gallery.png (--plots), and the run's last line: after a run
    that trained every epoch (a stopped or failed run ends with its own line)."""

    def after_train(self) -> None:
        if not distributed.is_main() or self.trainer.progress.outcome != "done":
            return
        tr, run = self.trainer, self.trainer.run
        if run.out_dir and run.cfg.training.plots:
            from visualize import draw_gallery, plot_curves

            try:
                written = plot_curves(run.writer.path, run.out_dir)
                g = draw_gallery(
                    tr.model,
                    tr.data.val_set,
                    run.device,
                    tr.data.names,
                    os.path.join(run.out_dir, "gallery.png"),
                    run.cfg.training.gallery_images,
                    tr.data.label_to_cat,
                )
                written += [g] if g else []
                run.writer.say("wrote " + ", ".join(written))
            except OSError as e:  # the checkpoints and metrics are written; a picture is not worth a traceback
                run.writer.say(f"WARNING: could not write the plots in {run.out_dir}: {e.strerror or e}")
        total = str(datetime.timedelta(seconds=int(time.time() - run.t_start)))
        last = tr.state.history[-1] if tr.state.history else {}
        run.writer.say(
            f"done in {total}: bbox AP {last.get('bbox_AP', float('nan')):.4f}"
            + (f", segm AP {last['segm_AP']:.4f}" if "segm_AP" in last else "")
            + f", {last.get('dets_per_image', float('nan')):.2f} detections/image"
        )
