"""The training loop's hooks (trainer.Trainer calls them; each gets the trainer as ``self.trainer``).

:func:`default_hooks` is the recipe's list, in the order they run at each point:

=================  ======================================================================================
``LRSchedule``     after_optimizer_step: the warmup step (first iterations); after_epoch: the epoch's lr
                   scheduler step (before the evaluation, as torchvision's script)
``StartupReport``  before_train: the lr check and the data / anchor report
``Evaluation``     after_epoch: the epoch's ``eval`` record; when due, COCO evaluation, per-class
                   table, collapse warnings
``Checkpointer``   after_step: --checkpoint-every-iters and the checkpoint on a stop signal;
                   after_epoch: checkpoint.pth + model_<epoch>.pth
``FinalReport``    after_train: plots, gallery, the "done in" line
=================  ======================================================================================
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Dict, List

import distributed
from diagnostics import collapse_warnings, linear_scaling_lr, lr_warning, per_class_table
from evaluation import evaluate
from run_data import rare_cure
from tiles import sliced
from training_checkpoint import save_training_checkpoint


class HookBase:
    """A no-op at every point; subclasses override the points they act at."""

    trainer: Any = None  # set by Trainer.register

    def before_train(self) -> None:
        """Once, after --resume was applied and before the first step."""

    def before_epoch(self, epoch: int) -> None:
        pass

    def after_optimizer_step(self) -> None:
        """Inside a finite step, right after the optimizer step: before ``state.iteration`` counts it and
        before its log line (which shows the lr this sets). A skipped (non-finite) step does not call it."""

    def after_step(self, done: int, n_iters: int, result) -> None:
        """At each iteration boundary, after the log line: ``done`` of ``n_iters`` iterations of the epoch;
        ``result`` is engine.StepResult (``result.stop``: a stop signal, the trainer stops after the hooks)."""

    def after_epoch(self, epoch: int, stats: Dict[str, float]) -> None:
        """After the epoch's steps (``state.epoch`` is already ``epoch + 1``); ``stats``: its means."""

    def after_train(self) -> None:
        """After the last epoch; not after a stop signal or a non-finite step."""


def default_hooks() -> List[HookBase]:
    return [LRSchedule(), StartupReport(), Evaluation(), Checkpointer(), FinalReport()]


class LRSchedule(HookBase):
    """Linear warmup over the first ``state.warmup_total`` steps, then the epoch scheduler."""

    def after_optimizer_step(self) -> None:
        tr = self.trainer
        if tr.warmup is not None and tr.state.iteration < tr.state.warmup_total:
            tr.warmup.step()

    def after_epoch(self, epoch: int, stats: Dict[str, float]) -> None:
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
        from analyze_data import data_report

        net = getattr(model, "module", model)
        report = data_report(data.train_set.coco, net, data.names, data.label_to_cat, cfg=run.cfg)
        run.writer.say(report.text())
        run.writer.record({"type": "data_report", **report.to_dict()})


class Evaluation(HookBase):
    """The epoch's ``eval`` record; every --eval-every epochs and after the last, the COCO evaluation
    with the per-class table and the collapse warnings in it."""

    _finding: Any = False  # the input-scale rule on the training boxes, computed at the first warning check

    def _scale(self):
        from analyze_data import scale_finding

        tr = self.trainer
        if self._finding is False:
            train_set, d = tr.data.train_set, tr.cfg.data
            tile = (d.tile_size, d.tile_overlap) if d.tile_size else None
            net = getattr(tr.model, "module", tr.model)
            self._finding = (
                scale_finding(net, train_set.coco.dataset, tile, d.augmentation) if train_set is not None else None
            )
        return self._finding

    def after_epoch(self, epoch: int, stats: Dict[str, float]) -> None:
        tr, t = self.trainer, self.trainer.cfg.training
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

    def after_step(self, done: int, n_iters: int, result) -> None:
        tr = self.trainer
        every = tr.cfg.training.checkpoint_every_iters
        if result.stop or (every and tr.state.iteration % every == 0):
            self.save(tr.epoch - 1, {"epoch": tr.epoch, "iteration": done, "meter": tr.meter.state_dict()})

    saved_epoch = None  # the last epoch whose end-of-epoch checkpoint was written

    def after_epoch(self, epoch: int, stats: Dict[str, float]) -> None:
        self.save(epoch)

    def save(self, epoch: int, in_epoch=None) -> None:
        """The checkpoint after ``epoch`` (plus ``in_epoch``: how far the next one got)."""
        tr, run = self.trainer, self.trainer.run
        if in_epoch is None:
            self.saved_epoch = epoch
        save_training_checkpoint(
            run.out_dir,
            epoch,
            tr.net,
            tr.optimizer,
            tr.lr_scheduler,
            tr.warmup,
            tr.scaler,
            tr.state,
            run.cfg,
            run.loss_cfg,
            run.device,
            tr.data.names,
            in_epoch,
        )
        distributed.barrier()


class FinalReport(HookBase):
    """training_curves.png, eval_curves.png, gallery.png (--plots), and the run's last line."""

    def after_train(self) -> None:
        if not distributed.is_main():
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
