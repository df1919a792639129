"""The run's model and optimisation: the detector as configured (weights, anchors, a checkpoint's
settings, DDP), the optimizer with its parameter groups, the schedulers, and ``--resume``."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import torch
from torchvision.ops._utils import split_normalization_params

from tv_lossfix.builders import is_checkpoint_path
from tv_lossfix.checkpoint import model_state_dict
from tv_lossfix.model_settings import anchors_per_location, apply_model_settings, model_settings

import distributed
from data import SIZE_SETTING_POLICIES
from engine import TrainState
from models import ModelError, build_model, set_anchors
from run_context import Run
from run_data import Data
from samplers import SAMPLERS
from train_config import ConfigError, TrainConfig, flatten, mid_epoch_fixed_paths
from training_checkpoint import (
    CheckpointError,
    TrainingParts,
    apply_to_optimizer,
    load_scheduler_state,
    reconcile,
    restore_rng,
    saved_config,
    torchvision_optimizer_state,
)

# The LVIS test settings of Detectron2 and MMDetection (torchvision: 0.05 and 100, which hide the low
# scores a long-tail classifier gives its rare classes).
LVIS_EVAL = {"box_score_thresh": 1e-4, "box_detections_per_img": 300}
LONG_TAIL_LOSSES = ("sigmoid", "federated", "seesaw", "eqlv2")


def _lvis_eval_settings(run: Run, kwargs: Dict[str, Any]) -> None:
    """With a long-tail roi_head.cls_loss, evaluation (and the per-class diagnostics) use the LVIS test
    settings unless model.kwargs gives them; said in one line either way."""
    loss = run.loss_cfg.roi_head.cls_loss
    if run.cfg.model.stock or loss not in LONG_TAIL_LOSSES:
        return
    added = {k: v for k, v in LVIS_EVAL.items() if k not in kwargs}
    kwargs.update(added)
    shown = ", ".join(f"{k} {kwargs[k]:g}" for k in LVIS_EVAL)
    how = "LVIS test settings" if len(added) == len(LVIS_EVAL) else "LVIS test settings where model.kwargs gives none"
    run.writer.say(f"model.roi_head.cls_loss {loss}: evaluation at {shown} ({how}; set model.kwargs to change)")


def build_model_for(run: Run, data: Data):
    m, t = run.cfg.model, run.cfg.training
    torch.manual_seed(t.seed)  # same initial weights on every rank
    kwargs = dict(m.kwargs)
    # The policy sets the input size (torchvision passes this too); given always, so that a checkpoint
    # trained with another policy does not bring its own.
    kwargs["_skip_resize"] = run.cfg.data.augmentation in SIZE_SETTING_POLICIES and not t.test_only
    _lvis_eval_settings(run, kwargs)
    notes: List[str] = []
    model, report = build_model(
        name=m.name,
        num_classes=data.num_classes,
        loss_cfg=run.loss_cfg,
        weights=m.weights,
        weights_backbone=m.weights_backbone,
        trainable_backbone_layers=m.trainable_backbone_layers,
        rpn_score_thresh=m.rpn_score_thresh,
        stock=m.stock,
        kwargs=kwargs,
        notes=notes,
        class_agnostic_bbox=m.class_agnostic_bbox,
        class_agnostic_mask=m.class_agnostic_mask,
    )
    for line in notes:
        if not line.startswith("_skip_resize:"):
            run.writer.say(f"--weights {m.weights}: {line}")
    # What the builder read from the checkpoint and replaced: the checkpoint is not read again here.
    _compare_class_names(run, report.checkpoint_settings, data.names, f"--weights {m.weights}")
    if report.replaced and t.test_only and m.weights and run.resume_ckpt is None:
        raise ModelError(
            f"--test-only --weights {m.weights}: " + "; ".join(report.replaced) + " for the data's "
            f"{data.num_classes} classes: evaluation would score freshly initialised layers; evaluate on the "
            f"classes the checkpoint was trained for"
        )
    if report.replaced:
        why = f"--weights {m.weights} with num_classes {data.num_classes}" if m.weights else "model settings"
        run.writer.say(f"{why}: replaced " + "; ".join(report.replaced))
    _config_anchors(run, model)
    if run.resume_ckpt is not None:
        _restore_model_settings(run, model, run.resume_ckpt)
        _compare_class_names(run, run.resume_ckpt.get("model_settings") or {}, data.names, f"--resume {t.resume}")
    model.to(run.device)
    if t.sync_bn:
        if run.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm); on CPU drop it")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if distributed.is_dist():
        ids = [run.device.index] if run.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    random.seed(t.seed + 1000 * run.rank)
    torch.manual_seed(t.seed + 1000 * run.rank)
    return model, net


def _config_anchors(run: Run, model) -> None:
    """model.anchor_sizes / aspect_ratios over the model built. Over a checkpoint's RPN head they are named
    against its anchors; a different count per location re-initialises the head to fine-tune, and is
    refused where the head must stay as trained (--test-only)."""
    m = run.cfg.model
    given = {"anchor_sizes": m.anchor_sizes, "aspect_ratios": m.aspect_ratios}
    if m.weights and is_checkpoint_path(m.weights) and any(v is not None for v in given.values()):
        same_count = _anchor_count(model, given) == anchors_per_location(model)
        if same_count or run.cfg.training.test_only:
            try:
                lines = apply_model_settings(model, {}, given)
            except CheckpointError as e:
                raise CheckpointError(f"--weights {m.weights} with model.{e}") from None
            for line in lines:
                run.writer.say(f"--weights {m.weights}: {line}")
            return
    for line in set_anchors(model, m.anchor_sizes, m.aspect_ratios):
        run.writer.say(f"anchors from the config: {line}")


def _restore_model_settings(run: Run, model, ckpt: Dict[str, Any]) -> None:
    """--resume (and --test-only --resume): the settings the checkpoint's model had beyond its weights.
    This run's config wins where it gives a value (model.kwargs, --rpn-score-thresh, model.anchor_sizes)."""
    settings = ckpt.get("model_settings")
    if not isinstance(settings, dict):
        return
    m, where = run.cfg.model, f"--resume {run.cfg.training.resume}"
    settings = {k: v for k, v in settings.items() if k != "_skip_resize"}  # set by --data-augmentation
    given = {**m.kwargs, "rpn_score_thresh": m.rpn_score_thresh}
    given.update(anchor_sizes=m.anchor_sizes, aspect_ratios=m.aspect_ratios)
    lines = []
    if m.anchor_sizes is None and m.aspect_ratios is None and "anchor_sizes" in settings:
        # The RPN head gets the trained anchor count before the checkpoint's weights are loaded into it.
        before = model_settings(model)
        set_anchors(model, settings["anchor_sizes"], settings["aspect_ratios"])
        if [before["anchor_sizes"], before["aspect_ratios"]] != [settings["anchor_sizes"], settings["aspect_ratios"]]:
            lines.append(
                f"anchors from the checkpoint: sizes {settings['anchor_sizes']}, "
                f"aspect ratios {settings['aspect_ratios']}"
            )
    try:
        lines += apply_model_settings(model, settings, given)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: model.{e}") from None
    for line in lines:
        run.writer.say(f"{where}: {line}")


def _compare_class_names(run: Run, settings: Dict[str, Any], names: List[str], where: str) -> None:
    """A checkpoint trained on other classes than the data's (same count, or --weights would replace the
    predictors) is said: the labels of this run are the data's."""
    saved = settings.get("class_names")
    if saved is not None and list(saved) != list(names) and len(saved) == len(names):
        run.writer.say(f"{where}: the checkpoint was trained on classes {list(saved)}; the data's are {list(names)}")


def _anchor_count(model, given: Dict[str, Any]) -> int:
    gen = model.rpn.anchor_generator
    sizes = given["anchor_sizes"] or gen.sizes
    ratios = given["aspect_ratios"] or gen.aspect_ratios
    return len(sizes[0]) * len(ratios[0])


def param_groups(model: torch.nn.Module, weight_decay: float, norm_weight_decay: Optional[float]):
    """The optimizer's groups as torchvision's reference builds them: one, or with --norm-weight-decay the
    normalisation layers' parameters in a group of their own (after the others: the order the groups
    have in a checkpoint's optimizer state; an empty group is kept, unlike torchvision's script)."""
    if norm_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm, other = split_normalization_params(model)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


def build_optimization(run: Run, net, iters_per_epoch: int):
    t = run.cfg.training
    groups = param_groups(net, t.weight_decay, t.norm_weight_decay)
    if t.opt.startswith("sgd"):
        optimizer = torch.optim.SGD(
            groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov="nesterov" in t.opt
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    if t.lr_scheduler == "multisteplr":
        lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=t.lr_steps, gamma=t.lr_gamma)
    else:
        lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    warmup_total = min(t.warmup_iters, max(iters_per_epoch - 1, 0))  # torchvision: first epoch only
    warmup = None
    if warmup_total > 0:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=t.warmup_factor, total_iters=warmup_total)
    return optimizer, lr_scheduler, warmup, TrainState(epoch=t.start_epoch, warmup_total=warmup_total)


def resume(parts: TrainingParts, iters_per_epoch: int) -> None:
    """Restore a checkpoint (ours, or torchvision's reference script's) into the parts a training
    checkpoint is written from; every setting that differs from the one it records is applied (said
    how) or refused. The hooks' states are the trainer's to give back, before ``before_train``."""
    run, net, optimizer, state = parts.run, parts.net, parts.optimizer, parts.state
    lr_scheduler, warmup, scaler = parts.lr_scheduler, parts.warmup, parts.scaler
    ckpt, t = run.resume_ckpt, run.cfg.training
    saved, complete = saved_config(ckpt)
    applied, refused = reconcile(saved, run.cfg, complete)
    refused += _mid_epoch_refusals(ckpt, run.cfg)
    if t.start_epoch not in (0, ckpt["epoch"] + 1):
        refused.append(
            f"training.start_epoch: {t.start_epoch} refused: the checkpoint continues at epoch {ckpt['epoch'] + 1}"
        )
    if refused:
        raise CheckpointError(
            f"--resume {t.resume}: settings that differ from the checkpoint cannot take effect:\n  "
            + "\n  ".join(refused)
        )
    try:
        net.load_state_dict(model_state_dict(ckpt, t.resume, "--resume"))
    except RuntimeError as e:
        raise CheckpointError(f"--resume: {t.resume} was saved from another model: {str(e).splitlines()[0]}") from None
    opt_state = ckpt["optimizer"]
    if not complete:  # torchvision's script orders (and drops) the --norm-weight-decay groups otherwise
        opt_state = torchvision_optimizer_state(opt_state, optimizer.param_groups)
    try:
        optimizer.load_state_dict(opt_state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"--resume {t.resume}: its optimizer state does not fit this run's parameter groups: {e}"
        ) from None
    if ckpt.get("lr_scheduler"):
        load_scheduler_state(lr_scheduler, ckpt["lr_scheduler"])
    if warmup is not None and ckpt.get("warmup") is not None:
        warmup.load_state_dict(ckpt["warmup"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if isinstance(ckpt.get("state"), dict):
        state.load_state_dict(ckpt["state"])
    else:
        # torchvision's checkpoint counts epochs only, and its script warms up in epoch 0 alone: the
        # iterations done are this run's per epoch times the epochs done, which puts warmup behind us
        # (a warmup restarted at 0 would multiply the restored lr, not the base one).
        state.iteration = (ckpt["epoch"] + 1) * iters_per_epoch
        run.writer.say(
            f"--resume {t.resume}: a torchvision reference checkpoint (epochs, not iterations): "
            f"{ckpt['epoch'] + 1} epoch(s) done counted as {state.iteration} iterations "
            f"({iters_per_epoch} per epoch here); its warmup (epoch 0 only, as torchvision's) is not run again"
        )
    state.epoch = ckpt["epoch"] + 1
    if isinstance(ckpt.get("in_epoch"), dict):  # stopped mid-epoch: train_loop continues at its iteration
        run.in_epoch = ckpt["in_epoch"]
    if ckpt.get("rng"):
        restore_rng(ckpt["rng"], run.rank)
    if saved:
        apply_to_optimizer(optimizer, lr_scheduler, saved, run.cfg)
    for line in applied:
        run.writer.say(f"resume: {line}")
    where = f"epoch {ckpt['epoch']} done"
    if run.in_epoch is not None:
        where = f"epoch {run.in_epoch['epoch']} continues after its iteration {run.in_epoch['iteration']}"
    run.writer.say(f"resumed from {t.resume}: {where}, iteration {state.iteration} in all")


def _mid_epoch_refusals(ckpt: Dict[str, Any], cfg: TrainConfig) -> List[str]:
    """A mid-epoch checkpoint continues the epoch's batch order: the keys that make another order
    (Opt.mid_epoch_fixed, and every key a registered sampler reads) may not change."""
    pos, saved = ckpt.get("in_epoch"), flatten(ckpt.get("config"))
    if not isinstance(pos, dict):
        return []
    out = []
    paths = dict.fromkeys([*mid_epoch_fixed_paths(), *(k for s in SAMPLERS.values() for k in s.reads)])
    for path in paths:
        old, new = saved.get(path), cfg.get(path)
        if path in saved and old != new:
            out.append(
                f"{path}: {old!r} -> {new!r} refused: the checkpoint stopped at iteration {pos['iteration']} "
                f"of epoch {pos['epoch']}, whose remaining batches follow from it ("
                + (f"resume from model_{pos['epoch'] - 1}.pth" if pos["epoch"] else "start the run again")
                + " to change it at an epoch boundary)"
            )
    return out
