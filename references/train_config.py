"""The training configuration: one schema for YAML and command line.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags given on the command line.
Every flag of torchvision's ``references/detection/train.py`` keeps its name, meaning and
default; the YAML extends the guide's schema (``model.rpn_head.*``, ``model.roi_head.*``,
``training.gradient_clip.*``) with every other setting. Unknown keys are errors that name the
key. The resolved config is saved as ``config.yaml`` in the output dir and in each checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from tv_lossfix import LossConfig, LossConfigError

TORCHVISION_COCO_PATH = "/datasets01/COCO/022719/"
DATASETS = ("coco", "coco_kp", "coco_json", "shapes")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key or flag."""


@dataclass(frozen=True)
class Opt:
    path: str  # dotted YAML path
    flags: Tuple[str, ...]  # command-line flags ((): YAML only)
    default: Any
    kind: type  # int, float, str, bool, list, dict
    help: str = ""
    choices: Optional[Tuple[str, ...]] = None
    nullable: bool = False


def _o(path, flags, default, kind, help="", choices=None, nullable=False):
    return Opt(path, tuple(flags), default, kind, help, tuple(choices) if choices else None, nullable)


# Flags shared with torchvision's references/detection/train.py come first, same defaults.
OPTIONS: List[Opt] = [
    _o("data.data_path", ["--data-path"], None, str, f"dataset root (coco/coco_kp: {TORCHVISION_COCO_PATH}; shapes: data)", nullable=True),
    _o("data.dataset", ["--dataset"], "coco", str, "dataset type", DATASETS),
    _o("model.name", ["--model"], "maskrcnn_resnet50_fpn", str, "model name (a tv_lossfix builder or maskrcnn_tiny)"),
    _o("training.device", ["--device"], "cuda", str, "device (falls back to cpu when CUDA is unavailable)"),
    _o("training.batch_size", ["-b", "--batch-size"], 2, int, "images per GPU; total batch = this x GPUs"),
    _o("training.epochs", ["--epochs"], 26, int, "number of total epochs to run"),
    _o("data.workers", ["-j", "--workers"], 4, int, "number of data loading workers"),
    _o("training.opt", ["--opt"], "sgd", str, "optimizer", ("sgd", "adamw")),
    _o("training.lr", ["--lr"], 0.02, float, "initial lr: 0.02 for 8 GPUs x 2 images; scale linearly"),
    _o("training.momentum", ["--momentum"], 0.9, float, "momentum"),
    _o("training.weight_decay", ["--wd", "--weight-decay"], 1e-4, float, "weight decay"),
    _o("training.norm_weight_decay", ["--norm-weight-decay"], None, float, "weight decay of normalization layers (default: --wd)", nullable=True),
    _o("training.lr_scheduler", ["--lr-scheduler"], "multisteplr", str, "lr scheduler", ("multisteplr", "cosineannealinglr")),
    _o("training.lr_step_size", ["--lr-step-size"], 8, int, "decrease lr every step-size epochs (multisteplr: unused, as in torchvision)"),
    _o("training.lr_steps", ["--lr-steps"], [16, 22], list, "epochs at which to decrease lr (multisteplr)"),
    _o("training.lr_gamma", ["--lr-gamma"], 0.1, float, "lr decay factor (multisteplr)"),
    _o("training.print_freq", ["--print-freq"], 20, int, "print a log line every N iterations"),
    _o("training.output_dir", ["--output-dir"], ".", str, "where checkpoints, metrics and plots go"),
    _o("training.resume", ["--resume"], "", str, "checkpoint to resume from"),
    _o("training.start_epoch", ["--start-epoch"], 0, int, "start epoch"),
    _o("data.aspect_ratio_group_factor", ["--aspect-ratio-group-factor"], 3, int, "aspect-ratio grouping (-1: off)"),
    _o("model.rpn_score_thresh", ["--rpn-score-thresh"], None, float, "rpn score threshold for faster-rcnn", nullable=True),
    _o("model.trainable_backbone_layers", ["--trainable-backbone-layers"], None, int, "number of trainable layers of backbone", nullable=True),
    _o("data.augmentation", ["--data-augmentation"], "hflip", str, "data augmentation policy", ("hflip", "multiscale", "lsj", "none")),
    _o("training.sync_bn", ["--sync-bn"], False, bool, "use SyncBatchNorm (CUDA)"),
    _o("training.test_only", ["--test-only"], False, bool, "only evaluate the model"),
    _o("training.use_deterministic_algorithms", ["--use-deterministic-algorithms"], False, bool, "forces deterministic algorithms"),
    _o("distributed.world_size", ["--world-size"], 1, int, "number of distributed processes (set by torchrun)"),
    _o("distributed.dist_url", ["--dist-url"], "env://", str, "url used to set up distributed training"),
    _o("model.weights", ["--weights"], None, str, "weights: enum name, DEFAULT, or a local checkpoint path", nullable=True),
    _o("model.weights_backbone", ["--weights-backbone"], None, str, "backbone weights enum name", nullable=True),
    _o("training.amp", ["--amp"], False, bool, "mixed precision (CUDA autocast + GradScaler)"),
    _o("data.use_copypaste", ["--use-copypaste"], False, bool, "simple copy-paste augmentation (needs masks)"),
    _o("data.backend", ["--backend"], "PIL", str, "image decoding backend", ("PIL", "tensor")),
    # tv_lossfix's additions.
    _o("training.clip_grad_norm", ["--clip-grad-norm"], None, float, "clip the global grad norm at MAX (0: off); sets training.gradient_clip", nullable=True),
    _o("training.gradient_clip.enabled", [], False, bool, "clip the global gradient norm after backward"),
    _o("training.gradient_clip.max_norm", [], 35.0, float, "max global norm (MMDetection's 35)"),
    _o("training.gradient_clip.norm_type", [], 2.0, float, "p of the norm"),
    _o("training.warmup_iters", ["--warmup-iters"], 1000, int, "linear lr warmup iterations (from lr/1000), capped at the first epoch's length as torchvision does"),
    _o("training.warmup_factor", ["--warmup-factor"], 0.001, float, "lr multiplier at the first iteration"),
    _o("training.nan_policy", ["--nan-policy"], "stop", str, "non-finite loss/grad: stop, or skip the step", ("stop", "skip")),
    _o("training.max_consecutive_skips", ["--max-consecutive-skips"], 10, int, "stop after N skipped steps in a row"),
    _o("training.seed", ["--seed"], 0, int, "seed of model init, sampling and data order"),
    _o("training.iters_per_epoch", ["--iters-per-epoch"], None, int, "cap the iterations of an epoch (quick runs)", nullable=True),
    _o("training.eval_every", ["--eval-every"], 1, int, "evaluate every N epochs (and after the last)"),
    _o("training.gallery_images", ["--gallery-images"], 8, int, "validation images drawn in the final gallery (0: none)"),
    _o("training.plots", ["--plots", "--no-plots"], True, bool, "write PNG plots at the end"),
    _o("training.num_threads", ["--num-threads"], None, int, "torch CPU threads (default: torch's)", nullable=True),
    _o("data.train_ann", ["--train-ann"], None, str, "coco_json: training annotation JSON", nullable=True),
    _o("data.train_images", ["--train-images"], None, str, "coco_json: training image folder", nullable=True),
    _o("data.val_ann", ["--val-ann"], None, str, "coco_json: validation annotation JSON", nullable=True),
    _o("data.val_images", ["--val-images"], None, str, "coco_json: validation image folder", nullable=True),
    _o("data.bad_annotations", ["--bad-annotations"], None, str, "faulty annotations: stop with the list, or drop them "
       "(default: drop for coco/coco_kp, whose 2017 files hold a few degenerate boxes torchvision drops silently; stop otherwise)",
       ("stop", "drop"), nullable=True),
    _o("data.check_samples", ["--check-samples"], 16, int, "decoded samples checked before training"),
    _o("data.shapes", [], {}, dict, "shapes dataset knobs (see references/shapes.py ShapesSpec)"),
    _o("model.num_classes", ["--num-classes"], None, int, "classes incl. background (default: from the dataset)", nullable=True),
    _o("model.stock", ["--stock"], False, bool, "build torchvision's own model (no tv_lossfix), for A/B runs"),
    _o("model.kwargs", [], {}, dict, "extra keyword arguments of the builder (min_size, box_score_thresh, ...)"),
    _o("model.loss_preset", ["--loss-preset"], None, str, "loss preset the rpn_head/roi_head keys override", ("torchvision", "mmdetection", "positive"), nullable=True),
    _o("model.rpn_head", [], {}, dict, "RPN loss settings (tv_lossfix.RPNLossConfig)"),
    _o("model.roi_head", [], {}, dict, "RoI loss settings (tv_lossfix.RoILossConfig)"),
    _o("model.sync_avg_factor", ["--sync-avg-factor"], False, bool, "average loss normalizers over DDP ranks"),
    _o("distributed.backend", ["--dist-backend"], None, str, "torch.distributed backend (default: nccl on CUDA, gloo on CPU)", ("nccl", "gloo"), nullable=True),
]
BY_PATH = {o.path: o for o in OPTIONS}


def defaults() -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for o in OPTIONS:
        _set(out, o.path, copy.deepcopy(o.default))
    return out


def _set(d: Dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _get(d: Dict[str, Any], path: str) -> Any:
    for p in path.split("."):
        d = d[p]
    return d


def _sections() -> Dict[str, set]:
    sec: Dict[str, set] = {"": set()}
    for o in OPTIONS:
        parts = o.path.split(".")
        for i in range(len(parts)):
            sec.setdefault(".".join(parts[:i]), set()).add(parts[i])
    return sec


SECTIONS = _sections()


def _merge_yaml(base: Dict[str, Any], data: Any, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'the top level'} must be a mapping, got {type(data).__name__}")
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        allowed = SECTIONS.get(prefix, set())
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            tip = f"; did you mean {(prefix + '.' if prefix else '') + hint[0]!r}?" if hint else ""
            raise ConfigError(f"{source}: unknown key {path!r}{tip} (allowed under {prefix or 'top level'}: {', '.join(sorted(allowed))})")
        if path in BY_PATH:
            _set(base, path, value)
        else:
            _merge_yaml(base, value, path, source)


def _check_value(o: Opt, v: Any, source: str) -> Any:
    where = f"{source}: {o.path}" + (f" ({o.flags[-1]})" if o.flags else "")
    if v is None:
        if o.nullable:
            return None
        raise ConfigError(f"{where} may not be null")
    if o.kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ConfigError(f"{where} must be finite, got {v!r}")
        v = float(v)
    elif o.kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where} must be an integer, got {v!r}")
    elif o.kind is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where} must be true or false, got {v!r}")
    elif o.kind is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where} must be a string, got {v!r}")
    elif o.kind is list:
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ConfigError(f"{where} must be a list of integers, got {v!r}")
    elif o.kind is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{where} must be a mapping, got {v!r}")
    if o.choices and v not in o.choices:
        hint = difflib.get_close_matches(str(v), o.choices, n=1)
        tip = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{where} must be one of {', '.join(o.choices)}, got {v!r}{tip}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train / evaluate a torchvision two-stage detector with tv_lossfix's configurable losses",
        add_help=True,
    )
    p.add_argument("--config", default=None, help="YAML config (flags given here override it)")
    for o in OPTIONS:
        if not o.flags:
            continue
        dest = o.path.replace(".", "__")
        if o.path == "training.plots":
            p.add_argument("--plots", dest=dest, action="store_true", default=argparse.SUPPRESS, help=o.help)
            p.add_argument("--no-plots", dest=dest, action="store_false", default=argparse.SUPPRESS)
        elif o.kind is bool:
            p.add_argument(*o.flags, dest=dest, action="store_true", default=argparse.SUPPRESS, help=f"{o.help}")
        elif o.kind is list:
            p.add_argument(*o.flags, dest=dest, nargs="+", type=int, default=argparse.SUPPRESS, help=f"{o.help} (default: {o.default})")
        else:
            conv = {int: int, float: float, str: str}[o.kind]
            p.add_argument(*o.flags, dest=dest, type=conv, choices=o.choices, default=argparse.SUPPRESS,
                           help=f"{o.help} (default: {o.default})")
    return p


def resolve(argv: Optional[Sequence[str]] = None) -> Tuple[Dict[str, Any], LossConfig]:
    """Parse the command line, merge defaults < YAML < flags, validate. Returns (config, loss config)."""
    args = build_parser().parse_args(argv)
    cfg = defaults()
    if args.config:
        if not os.path.isfile(args.config):
            raise ConfigError(f"--config: file not found: {args.config}")
        try:
            with open(args.config, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{args.config}: not valid YAML: {e}") from None
        _merge_yaml(cfg, data, "", args.config)
    given = {k: v for k, v in vars(args).items() if k != "config"}
    for dest, value in given.items():
        _set(cfg, dest.replace("__", "."), value)
    return finalize(cfg, source=args.config or "config")


def finalize(cfg: Dict[str, Any], source: str = "config") -> Tuple[Dict[str, Any], LossConfig]:
    for o in OPTIONS:
        _set(cfg, o.path, _check_value(o, _get(cfg, o.path), source))
    t = cfg["training"]
    if t["clip_grad_norm"] is not None:  # the flag wins over the YAML section
        t["gradient_clip"]["enabled"] = t["clip_grad_norm"] > 0
        if t["clip_grad_norm"] > 0:
            t["gradient_clip"]["max_norm"] = t["clip_grad_norm"]
    if t["gradient_clip"]["max_norm"] <= 0:
        raise ConfigError(f"{source}: training.gradient_clip.max_norm must be > 0")
    for key in ("batch_size", "epochs", "print_freq", "eval_every"):
        if t[key] < 1:
            raise ConfigError(f"{source}: training.{key} must be >= 1, got {t[key]}")
    if t["lr"] <= 0:
        raise ConfigError(f"{source}: training.lr must be > 0, got {t['lr']}")
    d = cfg["data"]
    if d["bad_annotations"] is None:
        d["bad_annotations"] = "drop" if d["dataset"] in ("coco", "coco_kp") else "stop"
    if d["data_path"] is None:
        d["data_path"] = "data" if d["dataset"] == "shapes" else TORCHVISION_COCO_PATH
    if d["dataset"] == "coco_json":
        missing = [f"--{k.replace('_', '-')}" for k in ("train_ann", "train_images", "val_ann", "val_images") if not d[k]]
        if t["test_only"]:
            missing = [m for m in missing if m.startswith("--val")]
        if missing:
            raise ConfigError(f"--dataset coco_json needs {', '.join(missing)} (data.train_ann ...)")
    if d["shapes"]:
        from shapes import ShapesSpec

        known = {f.name for f in fields(ShapesSpec)}
        for k in d["shapes"]:
            if k not in known:
                hint = difflib.get_close_matches(k, sorted(known), n=1)
                raise ConfigError(f"{source}: unknown key 'data.shapes.{k}'" + (f"; did you mean 'data.shapes.{hint[0]}'?" if hint else ""))
    m = cfg["model"]
    loss_dict = {"rpn_head": m["rpn_head"], "roi_head": m["roi_head"], "sync_avg_factor": m["sync_avg_factor"]}
    if m["loss_preset"]:
        loss_dict["preset"] = m["loss_preset"]
    try:
        loss_cfg = LossConfig.from_dict(loss_dict)
    except LossConfigError as e:
        raise ConfigError(f"{source}: model.{e}") from None
    return cfg, loss_cfg


def dump(cfg: Dict[str, Any], loss_cfg: LossConfig) -> str:
    """The resolved config as YAML, with the effective loss settings spelled out."""
    out = copy.deepcopy(cfg)
    out["model"]["rpn_head"] = loss_cfg.rpn_head.to_dict()
    out["model"]["roi_head"] = loss_cfg.roi_head.to_dict()
    out["model"]["loss_preset"] = None  # folded into the explicit values above
    return yaml.safe_dump(out, sort_keys=False)
