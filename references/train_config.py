"""The training configuration: one schema for YAML and command line.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags given on the command line.
Every flag of torchvision's ``references/detection/train.py`` keeps its spelling, casing rules,
meaning and default (our kebab-case spellings stay as aliases). The YAML extends the loss keys
(``model.rpn_head.*``, ``model.roi_head.*``, ``training.gradient_clip.*``) with every other
setting. Unknown keys are errors that name the key. ``--print-config`` prints the resolved config;
each run saves it as ``config.yaml``, and each checkpoint holds it.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from tv_lossfix import LossConfig, LossConfigError
from tv_lossfix._suggest import did_you_mean
from tv_lossfix._yaml import NotUTF8Error, load_yaml_file
from tv_lossfix.class_weights import CLASS_WEIGHT_METHODS
from tv_lossfix.config import TRAINING_MODEL_KEYS

TORCHVISION_COCO_PATH = "/datasets01/COCO/022719/"
DATASETS = ("coco", "coco_kp", "coco_json", "shapes")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key or flag."""


@dataclass(frozen=True)
class Opt:
    path: str  # dotted YAML path
    flags: Tuple[str, ...]  # command-line flags ((): YAML only); the first is torchvision's spelling
    default: Any
    kind: type  # int, float, str, bool, list, dict
    help: str = ""
    choices: Optional[Tuple[str, ...]] = None
    nullable: bool = False
    lower: bool = False  # torchvision lower-cases this value (--opt SGD, --backend PIL, ...)


def _o(path, flags, default, kind, help="", choices=None, nullable=False, lower=False):
    return Opt(path, tuple(flags), default, kind, help, tuple(choices) if choices else None, nullable, lower)


TORCHVISION_COCO_PATH = "/datasets01/COCO/022719/"
DATASETS = ("coco", "coco_kp", "coco_json", "shapes")
AUGMENTATIONS = ("hflip", "lsj", "multiscale", "ssd", "ssdlite", "none")
OPTIMIZERS = ("sgd", "sgd_nesterov", "adamw")
SCHEDULERS = ("multisteplr", "cosineannealinglr")
BACKENDS = ("pil", "tensor", "tv_tensor")

# Flags shared with torchvision's references/detection/train.py come first, same defaults.
OPTIONS: List[Opt] = [
    _o(
        "data.data_path",
        ["--data-path"],
        None,
        str,
        f"dataset root (default: {TORCHVISION_COCO_PATH}; 'data' for --dataset shapes)",
        nullable=True,
    ),
    _o(
        "data.dataset",
        ["--dataset"],
        "coco",
        str,
        "dataset: coco (detection, segmentation), coco_kp (keypoints), "
        "coco_json (any COCO-format files), shapes (the embedded demo)",
        DATASETS,
    ),
    _o("model.name", ["--model"], "maskrcnn_resnet50_fpn", str, "model name (a tv_lossfix builder or maskrcnn_tiny)"),
    _o(
        "training.device", ["--device"], "cuda", str, "device (cuda, cuda:N, cpu); cuda falls back to cpu without a GPU"
    ),
    _o("training.batch_size", ["-b", "--batch-size"], 2, int, "images per GPU; total batch = this x GPUs"),
    _o("training.epochs", ["--epochs"], 26, int, "number of total epochs to run"),
    _o("data.workers", ["-j", "--workers"], 4, int, "number of data loading workers"),
    _o("training.opt", ["--opt"], "sgd", str, "optimizer", OPTIMIZERS, lower=True),
    _o("training.lr", ["--lr"], 0.02, float, "initial lr: 0.02 is for 8 GPUs x 2 images; scale linearly"),
    _o("training.momentum", ["--momentum"], 0.9, float, "momentum"),
    _o("training.weight_decay", ["--wd", "--weight-decay"], 1e-4, float, "weight decay"),
    _o(
        "training.norm_weight_decay",
        ["--norm-weight-decay"],
        None,
        float,
        "weight decay of normalization layers (default: --wd)",
        nullable=True,
    ),
    _o("training.lr_scheduler", ["--lr-scheduler"], "multisteplr", str, "lr scheduler", SCHEDULERS, lower=True),
    _o(
        "training.lr_step_size",
        ["--lr-step-size"],
        8,
        int,
        "accepted for torchvision compatibility; torchvision's detection script does not use it either",
    ),
    _o("training.lr_steps", ["--lr-steps"], [16, 22], list, "epochs at which to decrease lr (multisteplr)"),
    _o("training.lr_gamma", ["--lr-gamma"], 0.1, float, "lr decay factor (multisteplr)"),
    _o("training.print_freq", ["--print-freq"], 20, int, "print a log line every N iterations"),
    _o("training.output_dir", ["--output-dir"], ".", str, "where checkpoints, metrics and plots go ('': save nothing)"),
    _o("training.resume", ["--resume"], "", str, "checkpoint to resume from"),
    _o("training.start_epoch", ["--start_epoch", "--start-epoch"], 0, int, "start epoch"),
    _o("data.aspect_ratio_group_factor", ["--aspect-ratio-group-factor"], 3, int, "aspect-ratio grouping (-1: off)"),
    _o(
        "model.rpn_score_thresh",
        ["--rpn-score-thresh"],
        None,
        float,
        "rpn score threshold for faster-rcnn",
        nullable=True,
    ),
    _o(
        "model.trainable_backbone_layers",
        ["--trainable-backbone-layers"],
        None,
        int,
        "number of trainable layers of backbone",
        nullable=True,
    ),
    _o(
        "data.augmentation",
        ["--data-augmentation"],
        "hflip",
        str,
        "data augmentation policy",
        AUGMENTATIONS,
        lower=True,
    ),
    _o("training.sync_bn", ["--sync-bn"], False, bool, "use SyncBatchNorm (CUDA)"),
    _o("training.test_only", ["--test-only"], False, bool, "only evaluate the model"),
    _o(
        "training.use_deterministic_algorithms",
        ["--use-deterministic-algorithms"],
        False,
        bool,
        "forces deterministic algorithms",
    ),
    _o(
        "distributed.world_size",
        ["--world-size"],
        1,
        int,
        "number of distributed processes (torchrun sets it; under SLURM it is read from here, else from SLURM_NTASKS)",
    ),
    _o("distributed.dist_url", ["--dist-url"], "env://", str, "url used to set up distributed training"),
    _o(
        "model.weights",
        ["--weights"],
        None,
        str,
        "weights: enum name, DEFAULT, or a local checkpoint path",
        nullable=True,
    ),
    _o("model.weights_backbone", ["--weights-backbone"], None, str, "backbone weights enum name", nullable=True),
    _o("training.amp", ["--amp"], False, bool, "mixed precision (CUDA autocast + GradScaler)"),
    _o(
        "data.use_copypaste",
        ["--use-copypaste"],
        False,
        bool,
        "simple copy-paste augmentation (with --data-augmentation lsj)",
    ),
    _o("data.backend", ["--backend"], "pil", str, "image decoding backend", BACKENDS, lower=True),
    _o("data.use_v2", ["--use-v2"], False, bool, "torchvision's switch to transforms.v2; here they are always used"),
    # tv_lossfix's additions.
    _o(
        "training.clip_grad_norm",
        ["--clip-grad-norm"],
        None,
        float,
        "clip the global grad norm at MAX (0: off); sets training.gradient_clip",
        nullable=True,
    ),
    _o("training.gradient_clip.enabled", [], False, bool, "clip the global gradient norm after backward"),
    _o("training.gradient_clip.max_norm", [], 35.0, float, "max global norm (MMDetection's 35)"),
    _o("training.gradient_clip.norm_type", [], 2.0, float, "p of the norm"),
    _o(
        "training.warmup_iters",
        ["--warmup-iters"],
        1000,
        int,
        "linear lr warmup iterations, capped at the first epoch's length as torchvision does",
    ),
    _o("training.warmup_factor", ["--warmup-factor"], 0.001, float, "lr multiplier at the first iteration"),
    _o(
        "training.auto_scale_lr",
        ["--auto-scale-lr"],
        False,
        bool,
        "lr is for 16 images per step (MMDetection's base batch): scale it by the real images per step",
    ),
    _o(
        "training.nan_policy",
        ["--nan-policy"],
        "stop",
        str,
        "non-finite loss/grad: stop, or skip the step",
        ("stop", "skip"),
    ),
    _o("training.max_consecutive_skips", ["--max-consecutive-skips"], 10, int, "stop after N skipped steps in a row"),
    _o("training.seed", ["--seed"], 0, int, "seed of model init, sampling and data order"),
    _o(
        "training.iters_per_epoch",
        ["--iters-per-epoch"],
        None,
        int,
        "cap the iterations of an epoch (quick runs)",
        nullable=True,
    ),
    _o(
        "training.checkpoint_every_iters",
        ["--checkpoint-every-iters"],
        None,
        int,
        "also write checkpoint.pth every N iterations (mid-epoch; --resume continues from it)",
        nullable=True,
    ),
    _o("training.eval_every", ["--eval-every"], 1, int, "evaluate every N epochs (and after the last)"),
    _o(
        "training.judge_after_iters",
        ["--judge-after-iters"],
        200,
        int,
        "no collapse warning before this many iterations (and the end of warmup)",
    ),
    _o(
        "training.gallery_images",
        ["--gallery-images"],
        8,
        int,
        "validation images drawn in the final gallery (0: none)",
    ),
    _o("training.plots", ["--plots", "--no-plots"], True, bool, "write PNG plots at the end"),
    _o("training.num_threads", ["--num-threads"], None, int, "torch CPU threads (default: torch's)", nullable=True),
    _o("data.train_ann", ["--train-ann"], None, str, "coco_json: training annotation JSON", nullable=True),
    _o("data.train_images", ["--train-images"], None, str, "coco_json: training image folder", nullable=True),
    _o("data.val_ann", ["--val-ann"], None, str, "coco_json: validation annotation JSON", nullable=True),
    _o("data.val_images", ["--val-images"], None, str, "coco_json: validation image folder", nullable=True),
    _o(
        "data.bad_annotations",
        ["--bad-annotations"],
        None,
        str,
        "faulty annotations: stop with the list, or drop them "
        "(default: drop for coco/coco_kp, whose 2017 files hold a few degenerate boxes torchvision drops silently; "
        "stop otherwise)",
        ("stop", "drop"),
        nullable=True,
    ),
    _o("data.check_samples", ["--check-samples"], 16, int, "decoded samples checked before training"),
    _o("data.lsj_size", [], 1024, int, "--data-augmentation lsj: the square output size (torchvision's 1024)"),
    _o(
        "data.report",
        ["--data-report", "--no-data-report"],
        True,
        bool,
        "print the data and anchor report before step 1",
    ),
    _o(
        "data.repeat_factor_threshold",
        ["--repeat-factor-threshold"],
        None,
        float,
        "repeat-factor sampling (LVIS / Detectron2): images of classes in fewer than this fraction of the "
        "images repeat per epoch; the data report suggests a value (default: off)",
        nullable=True,
    ),
    _o(
        "data.repeat_sqrt",
        ["--repeat-sqrt", "--no-repeat-sqrt"],
        True,
        bool,
        "repeat-factor sampling: factor sqrt(t / f(c)), as Detectron2",
    ),
    _o("data.shapes", [], {}, dict, "shapes dataset knobs (see references/shapes.py ShapesSpec)"),
    _o(
        "model.num_classes",
        ["--num-classes"],
        None,
        int,
        "classes incl. background (default: 91 for coco, 2 for coco_kp, else from the data)",
        nullable=True,
    ),
    _o("model.stock", ["--stock"], False, bool, "build torchvision's own model (no tv_lossfix), for A/B runs"),
    _o("model.kwargs", [], {}, dict, "extra keyword arguments of the builder (min_size, box_score_thresh, ...)"),
    _o(
        "model.anchor_sizes",
        [],
        None,
        object,
        "RPN anchor sizes, one list per feature map, e.g. [[16], [32], [64]]",
        nullable=True,
    ),
    _o(
        "model.aspect_ratios",
        [],
        None,
        object,
        "RPN anchor aspect ratios (h/w): one list for every feature map, or one per feature map",
        nullable=True,
    ),
    _o(
        "model.loss_preset",
        ["--loss-preset"],
        None,
        str,
        "loss preset the rpn_head/roi_head keys override",
        ("torchvision", "mmdetection", "positive"),
        nullable=True,
    ),
    _o(
        "model.preset",
        [],
        None,
        str,
        "same as model.loss_preset (the bare loss-config spelling)",
        ("torchvision", "mmdetection", "positive"),
        nullable=True,
    ),
    _o("model.rpn_head", [], {}, dict, "RPN loss settings (tv_lossfix.RPNLossConfig)"),
    _o(
        "model.roi_head",
        [],
        {},
        dict,
        "RoI loss settings (tv_lossfix.RoILossConfig); class_weight: auto is resolved from the training data",
    ),
    _o(
        "model.class_weight_method",
        [],
        None,
        str,
        "how model.roi_head.class_weight: auto weights the classes (default: effective_number)",
        CLASS_WEIGHT_METHODS,
        nullable=True,
    ),
    _o(
        "model.class_weight_beta",
        [],
        None,
        float,
        "the effective_number beta of model.roi_head.class_weight: auto (default: 0.999)",
        nullable=True,
    ),
    _o(
        "model.class_agnostic_bbox",
        [],
        False,
        bool,
        "one box regression for every class (roi_heads.box_predictor.bbox_pred with 4 outputs)",
    ),
    _o("model.class_agnostic_mask", [], False, bool, "one mask for every class (mask logits with 1 channel)"),
    _o("model.sync_avg_factor", ["--sync-avg-factor"], False, bool, "average loss normalizers over DDP ranks"),
    _o(
        "distributed.backend",
        ["--dist-backend"],
        None,
        str,
        "torch.distributed backend (default: nccl on CUDA, gloo on CPU)",
        ("nccl", "gloo"),
        nullable=True,
    ),
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
            raise ConfigError(
                f"{source}: unknown key {path!r}{did_you_mean(key, allowed, prefix + '.' if prefix else '')} "
                f"(allowed under {prefix or 'the top level'}: {', '.join(sorted(allowed))})"
            )
        if path in BY_PATH:
            _set(base, path, value)
        else:
            _merge_yaml(base, value, path, source)


def _where(o: Opt, source: str) -> str:
    return f"{source}: {o.path}" + (f" ({o.flags[0]})" if o.flags else "")


_TYPE_CHECKS: Dict[type, Tuple[Callable[[Any], bool], str]] = {
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    list: (
        lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
        "a list of integers",
    ),
    dict: (lambda v: isinstance(v, dict), "a mapping"),
    object: (lambda v: True, "a value"),
}


def _check_value(o: Opt, v: Any, source: str) -> Any:
    if v is None:
        if o.nullable:
            return None
        raise ConfigError(f"{_where(o, source)} may not be null")
    ok, what = _TYPE_CHECKS[o.kind]
    if not ok(v):
        raise ConfigError(f"{_where(o, source)} must be {what}, got {v!r}")
    if o.kind is float:
        if not math.isfinite(v):
            raise ConfigError(f"{_where(o, source)} must be finite, got {v!r}")
        v = float(v)
    if o.lower:
        v = v.lower()
    if o.choices and v not in o.choices:
        raise ConfigError(
            f"{_where(o, source)} must be one of {', '.join(o.choices)}, got {v!r}{did_you_mean(v, o.choices)}"
        )
    return v


def _lower(text: str) -> str:
    return text.lower()


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=110)


def _add_flag(p: argparse.ArgumentParser, o: Opt) -> None:
    dest = o.path.replace(".", "__")
    metavar = o.path.rsplit(".", 1)[-1].upper()
    shown = TORCHVISION_COCO_PATH if o.path == "data.data_path" else o.default
    default_text = "" if o.kind is bool or "default:" in o.help else f" (default: {shown})"
    if o.path == "training.plots":
        p.add_argument("--plots", dest=dest, action="store_true", default=argparse.SUPPRESS, help=o.help + " (default)")
        p.add_argument("--no-plots", dest=dest, action="store_false", default=argparse.SUPPRESS, help="write no plots")
    elif o.path == "data.report":
        p.add_argument(
            "--data-report", dest=dest, action="store_true", default=argparse.SUPPRESS, help=o.help + " (default)"
        )
        p.add_argument("--no-data-report", dest=dest, action="store_false", default=argparse.SUPPRESS, help="skip it")
    elif o.path == "data.repeat_sqrt":
        p.add_argument(
            "--repeat-sqrt", dest=dest, action="store_true", default=argparse.SUPPRESS, help=o.help + " (default)"
        )
        negative = "factor t / f(c) instead"
        p.add_argument("--no-repeat-sqrt", dest=dest, action="store_false", default=argparse.SUPPRESS, help=negative)
    elif o.kind is bool:
        p.add_argument(*o.flags, dest=dest, action="store_true", default=argparse.SUPPRESS, help=o.help)
    elif o.kind is list:
        p.add_argument(
            *o.flags, dest=dest, nargs="+", type=int, default=argparse.SUPPRESS, metavar="N", help=o.help + default_text
        )
    else:
        conv = _lower if o.lower else {int: int, float: float, str: str}[o.kind]
        p.add_argument(
            *o.flags,
            dest=dest,
            type=conv,
            choices=o.choices,
            default=argparse.SUPPRESS,
            metavar=None if o.choices else metavar,
            help=o.help + default_text,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="references/train.py",
        description="Train / evaluate a torchvision two-stage detector with tv_lossfix's configurable losses. "
        "Flags override the --config file, which overrides the defaults shown.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML config (flags given here override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for o in OPTIONS:
        if o.flags:
            _add_flag(p, o)
    return p


def read_yaml(path: str, what: str = "--config") -> Any:
    """A YAML file through tv_lossfix's reader (``1e-3`` is a number, a repeated key an error)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: file not found: {path}")
    try:
        return load_yaml_file(path) or {}
    except NotUTF8Error as e:
        raise ConfigError(f"{what} {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it: {e.strerror or e}") from None


def resolve(
    argv: Optional[Sequence[str]] = None, reads: Optional[Sequence[str]] = None
) -> Tuple[Dict[str, Any], LossConfig, bool]:
    """Parse the command line, merge defaults < YAML < flags, validate.

    ``reads``: the data files the caller reads (e.g. ("train_ann",) for analyze_data.py); by default
    those a run needs. Returns (config, loss config, whether --print-config was given).
    """
    args = build_parser().parse_args(argv)
    cfg = defaults()
    if args.config:
        _merge_yaml(cfg, read_yaml(args.config), "", args.config)
    given = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    for dest, value in given.items():
        _set(cfg, dest.replace("__", "."), value)
    cfg, loss_cfg = finalize(cfg, source=args.config or "config", reads=reads)
    return cfg, loss_cfg, args.print_config


def _check_training(t: Dict[str, Any], source: str) -> None:
    if t["clip_grad_norm"] is not None and t["clip_grad_norm"] < 0:
        raise ConfigError(
            f"--clip-grad-norm (training.clip_grad_norm) must be >= 0 (0 turns clipping off), "
            f"got {t['clip_grad_norm']:g}"
        )
    if t["clip_grad_norm"] is not None:  # the flag wins over the YAML section
        t["gradient_clip"]["enabled"] = t["clip_grad_norm"] > 0
        if t["clip_grad_norm"] > 0:
            t["gradient_clip"]["max_norm"] = t["clip_grad_norm"]
    if t["gradient_clip"]["max_norm"] <= 0:
        raise ConfigError(f"{source}: training.gradient_clip.max_norm must be > 0")
    for key in ("batch_size", "epochs", "print_freq", "eval_every"):
        if t[key] < 1:
            raise ConfigError(f"{source}: training.{key} must be >= 1, got {t[key]}")
    if t["checkpoint_every_iters"] is not None and t["checkpoint_every_iters"] < 1:
        raise ConfigError(
            f"{source}: training.checkpoint_every_iters (--checkpoint-every-iters) must be >= 1 or null, "
            f"got {t['checkpoint_every_iters']}"
        )
    if t["lr"] <= 0:
        raise ConfigError(f"{source}: training.lr must be > 0, got {t['lr']}")


def _check_repeat_factors(d: Dict[str, Any], source: str) -> None:
    t = d["repeat_factor_threshold"]
    if t is not None and t <= 0:
        raise ConfigError(f"{source}: data.repeat_factor_threshold (--repeat-factor-threshold) must be > 0, got {t}")
    if t is None and not d["repeat_sqrt"]:
        raise ConfigError(
            f"{source}: data.repeat_sqrt false (--no-repeat-sqrt) has no effect without "
            f"data.repeat_factor_threshold (--repeat-factor-threshold T)"
        )


def _check_data(d: Dict[str, Any], cfg: Dict[str, Any], source: str, reads: Optional[Sequence[str]] = None) -> None:
    _check_repeat_factors(d, source)
    if d["bad_annotations"] is None:
        d["bad_annotations"] = "drop" if d["dataset"] in ("coco", "coco_kp") else "stop"
    if d["data_path"] is None:
        d["data_path"] = "data" if d["dataset"] == "shapes" else TORCHVISION_COCO_PATH
    if d["dataset"] == "coco_json":
        missing = [
            f"--{k.replace('_', '-')}" for k in ("train_ann", "train_images", "val_ann", "val_images") if not d[k]
        ]
        if cfg["training"]["test_only"]:
            missing = [m for m in missing if m.startswith("--val")]
        if reads is not None:
            missing = [m for m in missing if m[2:].replace("-", "_") in reads]
        if missing:
            raise ConfigError(f"--dataset coco_json needs {', '.join(missing)} (data.train_ann ...)")
    if d["backend"] == "tv_tensor" and not d["use_v2"]:
        raise ConfigError("--backend tv_tensor needs --use-v2 (as in torchvision's script)")
    if d["use_copypaste"] and d["augmentation"] != "lsj":
        raise ConfigError(
            f"--use-copypaste works with --data-augmentation lsj only (as in torchvision), got {d['augmentation']!r}"
        )
    if d["shapes"]:
        from shapes import ShapesSpec

        known = {f.name for f in fields(ShapesSpec)}
        for k in d["shapes"]:
            if k not in known:
                raise ConfigError(f"{source}: unknown key 'data.shapes.{k}'{did_you_mean(k, known, 'data.shapes.')}")


def _check_anchors(m: Dict[str, Any], source: str) -> None:
    def nested(v, name, kind):
        ok = (
            isinstance(v, list)
            and v
            and all(
                isinstance(row, list)
                and row
                and all(isinstance(x, kind) and not isinstance(x, bool) and x > 0 for x in row)
                for row in v
            )
        )
        if not ok:
            raise ConfigError(
                f"{source}: model.{name} must be a list of non-empty lists of positive numbers "
                f"(one list per feature map), got {v!r}"
            )

    if m["anchor_sizes"] is not None:
        nested(m["anchor_sizes"], "anchor_sizes", (int, float))
    if m["aspect_ratios"] is not None:
        nested(m["aspect_ratios"], "aspect_ratios", (int, float))


def _auto_class_weight(m: Dict[str, Any]) -> bool:
    return isinstance(m["roi_head"], dict) and m["roi_head"].get("class_weight") == "auto"


def _check_class_weight_keys(m: Dict[str, Any], source: str) -> None:
    """model.class_weight_method / _beta shape ``class_weight: auto`` only: refused anywhere else."""
    method, beta = m["class_weight_method"], m["class_weight_beta"]
    if not _auto_class_weight(m):
        for key in ("class_weight_method", "class_weight_beta"):
            if m[key] is not None:
                raise ConfigError(
                    f"{source}: model.{key} ({m[key]!r}) applies only with model.roi_head.class_weight: auto "
                    f"(set it, or drop model.{key})"
                )
    if beta is not None and method == "inverse_sqrt":
        raise ConfigError(
            f"{source}: model.class_weight_beta is the effective_number parameter: drop it for inverse_sqrt"
        )
    if beta is not None and not 0 <= beta < 1:
        raise ConfigError(f"{source}: model.class_weight_beta must be in [0, 1), got {beta!r}")


def finalize(
    cfg: Dict[str, Any], source: str = "config", reads: Optional[Sequence[str]] = None
) -> Tuple[Dict[str, Any], LossConfig]:
    for o in OPTIONS:
        _set(cfg, o.path, _check_value(o, _get(cfg, o.path), source))
    _check_training(cfg["training"], source)
    _check_data(cfg["data"], cfg, source, reads)
    m = cfg["model"]
    _check_anchors(m, source)
    loss_keys = {k: v for k, v in m.items() if v is not None}
    if _auto_class_weight(m):  # train.py resolves the marker from the training data; the library refuses it
        loss_keys["roi_head"] = {k: v for k, v in m["roi_head"].items() if k != "class_weight"}
    _check_class_weight_keys(m, source)
    try:
        # The library reads the loss keys of model: exactly as LossConfig.from_yaml does.
        loss_cfg = LossConfig.from_dict({"model": loss_keys})
    except LossConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _check_stock(m, loss_cfg, source)
    return cfg, loss_cfg


def _check_stock(m: Dict[str, Any], loss_cfg: LossConfig, source: str) -> None:
    """--stock builds torchvision's own heads: a loss or sampling setting could not take effect there."""
    if not m["stock"] or (loss_cfg.is_default() and not _auto_class_weight(m)):
        return
    default = LossConfig().to_dict()
    now = loss_cfg.to_dict()
    keys = [f"model.{sec}.{k}" for sec in ("rpn_head", "roi_head") for k, v in now[sec].items() if default[sec][k] != v]
    keys += ["model.sync_avg_factor"] if loss_cfg.sync_avg_factor else []
    keys += ["model.roi_head.class_weight"] if _auto_class_weight(m) else []
    raise ConfigError(
        f"{source}: --stock builds torchvision's own heads, which cannot apply {', '.join(keys)}: "
        f"drop --stock or those settings"
    )


def dump(cfg: Dict[str, Any], loss_cfg: LossConfig) -> str:
    """The resolved config as YAML, with the effective loss settings spelled out."""
    out = copy.deepcopy(cfg)
    out["model"]["rpn_head"] = loss_cfg.rpn_head.to_dict()
    out["model"]["roi_head"] = loss_cfg.roi_head.to_dict()
    if _auto_class_weight(cfg["model"]):  # not resolved yet (train.py rewrites config.yaml with the list)
        out["model"]["roi_head"]["class_weight"] = "auto"
    out["model"]["loss_preset"] = out["model"]["preset"] = None  # folded into the explicit values above
    return yaml.safe_dump(out, sort_keys=False)


assert set(SECTIONS["model"]) == set(TRAINING_MODEL_KEYS), "train_config's model keys and tv_lossfix's disagree"
