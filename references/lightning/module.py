r"""A ``LightningModule`` around a tv_lossfix detector: the recipe's model, losses, statistics,
optimiser and per-class COCO evaluation, with gradient clipping left to Lightning's ``Trainer``.

    module = DetectionModule("maskrcnn_resnet50_fpn", num_classes=3, loss_cfg="loss.yaml", weights="DEFAULT",
                             eval_data=EvalData(coco_val, label_to_cat, class_names))
    trainer = lightning.Trainer(gradient_clip_val=35, gradient_clip_algorithm="norm", precision="16-mixed")
    trainer.fit(module, train_loader, val_loader)

Lightning's order per step: ``training_step`` (forward, summed loss) -> backward -> under 16-mixed
``GradScaler.unscale_`` -> ``on_before_optimizer_step`` (the gradient norm logged there is the true,
pre-clip one) -> the Trainer's clipping -> ``optimizer.step``. Clipping written inside
``training_step`` runs before backward, where there is no gradient to clip.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Optional

REFS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REFS)  # first: the recipe's modules, not this folder's namesakes (train.py)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import tv_lossfix  # noqa: E402

from diagnostics import per_class_table  # noqa: E402
from evaluation import _gather, _predict, summarize_detections  # noqa: E402
from models import build_model, set_anchors  # noqa: E402
from run_model import build_optimization  # noqa: E402
from train_config import defaults  # noqa: E402
from writers import SayWriter  # noqa: E402

# The recipe's training keys this module uses (references/run_model.py's build_optimization reads them).
OPTIM_KEYS = (
    "opt",
    "lr",
    "momentum",
    "weight_decay",
    "norm_weight_decay",
    "lr_scheduler",
    "lr_steps",
    "lr_gamma",
    "warmup_iters",
    "warmup_factor",
    "epochs",
)


@dataclass
class EvalData:
    """What the COCO evaluation needs besides the model's outputs."""

    coco_gt: Any  # pycocotools COCO of the validation split (references/checks.load_coco_checked)
    label_to_cat: Dict[int, int]  # model label -> category id
    class_names: Optional[List[str]] = None  # labels 1..K in order


def global_grad_norm(params: Iterable[torch.nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    """The norm clip_grad_norm_ clips, over every gradient: a device tensor, nothing read back."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one foreach kernel
    if total is not None:
        return total(grads, norm_type)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type)


def _numbers(summary: Dict[str, Any]) -> Dict[str, float]:
    """The evaluation's scalars to log: top level and per class; NaN (a class without ground truth) left out."""
    out = {f"val/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, row in summary.get("per_class", {}).items():
        out.update({f"val/{name}/{k}": float(v) for k, v in row.items()})
    return {k: v for k, v in out.items() if math.isfinite(v)}


class DetectionModule(pl.LightningModule):
    """A tv_lossfix detector (any name in ``tv_lossfix.BUILDERS``, or the recipe's ``maskrcnn_tiny``).

    Args:
        model_name, num_classes (background included), weights, weights_backbone,
        trainable_backbone_layers, model_kwargs: as ``references/models.build_model``.
        loss_cfg: anything ``tv_lossfix.LossConfig.coerce`` takes (a YAML path, dict, preset name).
        training: the recipe's optimiser keys (``OPTIM_KEYS``, the ``training:`` section's spelling);
            the rest keep ``references/train_config`` defaults (SGD, lr 0.02, linear warmup, MultiStepLR).
        anchor_sizes, aspect_ratios: the RPN's anchors, as ``model.anchor_sizes`` / ``model.aspect_ratios``.
        eval_data: for validation (COCO AP and the per-class table); without it there is no validation.
        class_agnostic_bbox, class_agnostic_mask: as ``model.class_agnostic_bbox`` / ``_mask``.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        loss_cfg: Any = None,
        training: Optional[Dict[str, Any]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        weights_backbone: Optional[str] = None,
        trainable_backbone_layers: Optional[int] = None,
        anchor_sizes: Optional[List[List[float]]] = None,
        aspect_ratios: Optional[List[List[float]]] = None,
        eval_data: Optional[EvalData] = None,
        class_agnostic_bbox: bool = False,
        class_agnostic_mask: bool = False,
    ):
        super().__init__()
        unknown = sorted(set(training or {}) - set(OPTIM_KEYS))
        if unknown:
            raise ValueError(f"DetectionModule(training=...): unknown key(s) {unknown}; known: {', '.join(OPTIM_KEYS)}")
        loss = tv_lossfix.LossConfig.coerce(loss_cfg)
        recipe = defaults().training
        self.training_cfg = {k: getattr(recipe, k) for k in OPTIM_KEYS} | dict(training or {})
        self.save_hyperparameters(
            {
                "model_name": model_name,
                "num_classes": num_classes,
                "loss_cfg": loss.to_dict(),
                "training": self.training_cfg,
                "model_kwargs": dict(model_kwargs or {}),
                "weights": weights,
                "weights_backbone": weights_backbone,
                "trainable_backbone_layers": trainable_backbone_layers,
                "anchor_sizes": anchor_sizes,
                "aspect_ratios": aspect_ratios,
                "class_agnostic_bbox": class_agnostic_bbox,
                "class_agnostic_mask": class_agnostic_mask,
            }
        )
        self.model, report = build_model(
            name=model_name,
            num_classes=num_classes,
            loss_cfg=loss,
            weights=weights,
            weights_backbone=weights_backbone,
            trainable_backbone_layers=trainable_backbone_layers,
            kwargs=model_kwargs,
            class_agnostic_bbox=class_agnostic_bbox,
            class_agnostic_mask=class_agnostic_mask,
        )
        self.replaced = list(report.replaced)
        self.anchor_changes = set_anchors(self.model, anchor_sizes, aspect_ratios)
        self.eval_data = eval_data
        self.last_evaluation: Dict[str, Any] = {}
        self._val: tuple = ({}, {})
        self._val_thresh = 0.0

    def forward(self, images, targets=None):
        return self.model(images, targets)

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss_dict = self.model(list(images), list(targets))  # torchvision's keys
        loss = sum(loss_dict.values())
        self._log_step(loss_dict, loss, len(images))
        return loss  # Lightning runs backward; the Trainer clips after it

    def _log_step(self, loss_dict: Dict[str, torch.Tensor], loss: torch.Tensor, batch_size: int) -> None:
        # Tensors only: Lightning keeps them on the device and converts them when a logger writes
        # (every log_every_n_steps), so no step waits for the GPU here. No prog_bar: the progress bar
        # would read its metrics back every step.
        values = {f"train/{k}": v.detach() for k, v in loss_dict.items()}
        values["train/loss"] = loss.detach()
        values.update({f"train/{k}": v for k, v in tv_lossfix.training_stats(self.model).items()})
        self.log_dict(values, on_step=True, on_epoch=True, batch_size=batch_size)

    def on_before_optimizer_step(self, optimizer) -> None:
        # After backward and after GradScaler.unscale_ (16-mixed), before the Trainer clips: the true
        # pre-clip norm, the one gradient_clip_val is compared with.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.log("train/grad_norm", global_grad_norm(params), on_step=True, on_epoch=False)

    def configure_optimizers(self):
        t = dict(self.training_cfg, start_epoch=0)  # Lightning counts the epochs itself
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            t["epochs"] = self.trainer.max_epochs  # cosine annealing's length
        # The recipe's schema checks each value's type, as for the YAML file.
        cfg = defaults().replace({f"training.{k}": v for k, v in t.items()}, source="DetectionModule(training=...)")
        optimizer, lr_scheduler, warmup, _ = build_optimization(
            SimpleNamespace(cfg=cfg), self.model, self._iters_per_epoch()
        )
        # As references/train.py: the warmup steps per iteration (in the first epoch; LinearLR leaves
        # the lr alone after total_iters), the main schedule per epoch.
        schedulers = [{"scheduler": lr_scheduler, "interval": "epoch"}]
        if warmup is not None:
            schedulers.insert(0, {"scheduler": warmup, "interval": "step"})
        return [optimizer], schedulers

    def _iters_per_epoch(self) -> int:
        total, epochs = self.trainer.estimated_stepping_batches, self.trainer.max_epochs
        if not math.isfinite(total):  # a loader without a length: warm up for warmup_iters
            return int(self.training_cfg["warmup_iters"]) + 1
        return int(total // epochs) if epochs is not None and epochs > 0 else int(total)

    # -- validation: the recipe's COCO evaluation, fed batch by batch ---------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.eval_data is None:
            raise ValueError("DetectionModule: validation needs eval_data=EvalData(coco_gt, label_to_cat, names)")
        self._val = ({"bbox": [], "segm": [], "keypoints": []}, {})
        self._val_thresh = float(self.model.roi_heads.score_thresh)

    def validation_step(self, batch, batch_idx) -> None:
        results, per_image = _predict(self.model, [batch], self.device, self.eval_data.label_to_cat, self._val_thresh)
        for k, v in results.items():
            self._val[0][k].extend(v)
        self._val[1].update(per_image)

    def on_validation_epoch_end(self) -> None:
        merged, seen = _gather(*self._val)  # every rank's detections on rank 0 (torch.distributed, as Lightning's DDP)
        summary: Dict[str, Any] = {}
        if self.trainer.is_global_zero:
            e = self.eval_data
            quiet = self.trainer.sanity_checking  # the evaluation runs, to fail early; its numbers are not news
            say = (lambda *_: None) if quiet else self.print
            summary = summarize_detections(
                self.model, merged, seen, e.coco_gt, e.label_to_cat, self._val_thresh, SayWriter(say), e.class_names
            )
            say(
                f"per class (score >= {self._val_thresh:g}):\n"
                + per_class_table(summary["per_class"], self._val_thresh)
            )
        self.last_evaluation = summary
        # Every rank logs the same numbers, so they can be monitored (ModelCheckpoint, EarlyStopping).
        self.log_dict(self.trainer.strategy.broadcast(_numbers(summary), src=0), batch_size=1)
        self._val = ({}, {})
