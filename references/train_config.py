"""The training configuration: one typed, frozen schema for the YAML file and the command line.

Each section is a frozen dataclass (``cfg.training.lr``, ``cfg.model.anchor_sizes``) whose fields are
the schema: type, default, command-line flags and help live in one place, so that ``--help``,
``--print-config`` and the saved ``config.yaml`` cannot drift apart.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags given on the command line. Every flag of
torchvision's ``references/detection/train.py`` keeps its spelling, casing rules, meaning and default
(our kebab-case spellings stay as aliases). Unknown keys are errors that name the key. All rules across
fields run in one step, :func:`validate`, before any data is read. A config is never changed in place:
:meth:`TrainConfig.replace` returns a new one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from tv_lossfix import LossConfig, LossConfigError
from tv_lossfix._suggest import did_you_mean
from tv_lossfix._yaml import NotUTF8Error, load_yaml_file
from tv_lossfix.class_weights import CLASS_WEIGHT_METHODS
from tv_lossfix.config import TRAINING_MODEL_KEYS

TORCHVISION_COCO_PATH = "/datasets01/COCO/022719/"
DATASETS = ("coco", "coco_kp", "coco_json", "shapes")
AUGMENTATIONS = ("hflip", "lsj", "multiscale", "ssd", "ssdlite", "none")
OPTIMIZERS = ("sgd", "sgd_nesterov", "adamw")
SCHEDULERS = ("multisteplr", "cosineannealinglr")
BACKENDS = ("pil", "tensor", "tv_tensor")
LOSS_PRESETS = ("torchvision", "mmdetection", "positive")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key or flag."""


def setting(
    default: Any,
    *flags: str,
    help: str = "",
    choices: Sequence[str] = (),
    lower: bool = False,
    negative: Optional[Tuple[str, str]] = None,
    shown: Optional[str] = None,
):
    """A schema field. ``flags``: command-line spellings, torchvision's first (none: YAML only);
    ``lower``: torchvision lower-cases the value (``--opt SGD``); ``negative``: (flag, help) of a
    boolean's off switch (``--no-plots``); ``shown``: the default --help prints, where it differs."""
    meta = {"flags": flags, "help": help, "choices": tuple(choices) or None, "lower": lower}
    meta.update(negative=negative, shown=shown)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# Flags shared with torchvision's references/detection/train.py keep its defaults.
@dataclass(frozen=True)
class GradientClipConfig:
    enabled: bool = setting(False, help="clip the global gradient norm after backward")
    max_norm: float = setting(35.0, help="max global norm (MMDetection's 35)")
    norm_type: float = setting(2.0, help="p of the norm")


@dataclass(frozen=True)
class TrainingConfig:
    device: str = setting("cuda", "--device", help="device (cuda, cuda:N, cpu); cuda falls back to cpu without a GPU")
    batch_size: int = setting(2, "-b", "--batch-size", help="images per GPU; total batch = this x GPUs")
    epochs: int = setting(26, "--epochs", help="number of total epochs to run")
    opt: str = setting("sgd", "--opt", help="optimizer", choices=OPTIMIZERS, lower=True)
    lr: float = setting(0.02, "--lr", help="initial lr: 0.02 is for 8 GPUs x 2 images; scale linearly")
    momentum: float = setting(0.9, "--momentum", help="momentum")
    weight_decay: float = setting(1e-4, "--wd", "--weight-decay", help="weight decay")
    norm_weight_decay: Optional[float] = setting(
        None, "--norm-weight-decay", help="weight decay of normalization layers (default: --wd)"
    )
    lr_scheduler: str = setting("multisteplr", "--lr-scheduler", help="lr scheduler", choices=SCHEDULERS, lower=True)
    lr_step_size: int = setting(
        8,
        "--lr-step-size",
        help="accepted at its default for torchvision compatibility (its detection script does not read it "
        "either); another value is refused",
    )
    lr_steps: List[int] = setting([16, 22], "--lr-steps", help="epochs at which to decrease lr (multisteplr)")
    lr_gamma: float = setting(0.1, "--lr-gamma", help="lr decay factor (multisteplr)")
    print_freq: int = setting(20, "--print-freq", help="print a log line every N iterations")
    output_dir: str = setting(".", "--output-dir", help="where checkpoints, metrics and plots go ('': save nothing)")
    resume: str = setting("", "--resume", help="checkpoint to resume from")
    overwrite: bool = setting(
        False,
        "--overwrite",
        help="start a new run in an --output-dir holding another run's checkpoint: that run's files are removed "
        "first (without it, such a folder is refused unless --resume)",
    )
    start_epoch: int = setting(0, "--start_epoch", "--start-epoch", help="start epoch")
    sync_bn: bool = setting(False, "--sync-bn", help="use SyncBatchNorm (CUDA)")
    test_only: bool = setting(False, "--test-only", help="only evaluate the model")
    use_deterministic_algorithms: bool = setting(
        False, "--use-deterministic-algorithms", help="forces deterministic algorithms"
    )
    amp: bool = setting(False, "--amp", help="mixed precision (CUDA autocast + GradScaler)")
    # tv_lossfix's additions.
    clip_grad_norm: Optional[float] = setting(
        None, "--clip-grad-norm", help="clip the global grad norm at MAX (0: off); sets training.gradient_clip"
    )
    gradient_clip: GradientClipConfig = field(default_factory=GradientClipConfig)
    warmup_iters: int = setting(
        1000,
        "--warmup-iters",
        help="linear lr warmup iterations, capped at the first epoch's length as torchvision does",
    )
    warmup_factor: float = setting(0.001, "--warmup-factor", help="lr multiplier at the first iteration")
    auto_scale_lr: bool = setting(
        False,
        "--auto-scale-lr",
        help="lr is for 16 images per step (MMDetection's base batch): scale it by the real images per step",
    )
    nan_policy: str = setting(
        "stop", "--nan-policy", help="non-finite loss/grad: stop, or skip the step", choices=("stop", "skip")
    )
    max_consecutive_skips: int = setting(10, "--max-consecutive-skips", help="stop after N skipped steps in a row")
    seed: int = setting(0, "--seed", help="seed of model init, sampling and data order")
    iters_per_epoch: Optional[int] = setting(
        None, "--iters-per-epoch", help="cap the iterations of an epoch (quick runs)"
    )
    checkpoint_every_iters: Optional[int] = setting(
        None,
        "--checkpoint-every-iters",
        help="also write checkpoint.pth every N iterations (mid-epoch; --resume continues from it)",
    )
    eval_every: int = setting(1, "--eval-every", help="evaluate every N epochs (and after the last)")
    judge_after_iters: int = setting(
        200, "--judge-after-iters", help="no collapse warning before this many iterations (and the end of warmup)"
    )
    gallery_images: int = setting(8, "--gallery-images", help="validation images drawn in the final gallery (0: none)")
    plots: bool = setting(True, "--plots", help="write PNG plots at the end", negative=("--no-plots", "write no plots"))
    num_threads: Optional[int] = setting(None, "--num-threads", help="torch CPU threads (default: torch's)")


@dataclass(frozen=True)
class DataConfig:
    data_path: Optional[str] = setting(
        None,
        "--data-path",
        help=f"dataset root (default: {TORCHVISION_COCO_PATH}; 'data' for --dataset shapes)",
        shown=TORCHVISION_COCO_PATH,
    )
    dataset: str = setting(
        "coco",
        "--dataset",
        help="dataset: coco (detection, segmentation), coco_kp (keypoints), "
        "coco_json (any COCO-format files), shapes (the embedded demo)",
        choices=DATASETS,
    )
    workers: int = setting(4, "-j", "--workers", help="number of data loading workers")
    aspect_ratio_group_factor: int = setting(3, "--aspect-ratio-group-factor", help="aspect-ratio grouping (-1: off)")
    augmentation: str = setting(
        "hflip", "--data-augmentation", help="data augmentation policy", choices=AUGMENTATIONS, lower=True
    )
    use_copypaste: bool = setting(
        False, "--use-copypaste", help="simple copy-paste augmentation (with --data-augmentation lsj)"
    )
    backend: str = setting("pil", "--backend", help="image decoding backend", choices=BACKENDS, lower=True)
    use_v2: bool = setting(False, "--use-v2", help="torchvision's switch to transforms.v2; here they are always used")
    train_ann: Optional[str] = setting(None, "--train-ann", help="coco_json: training annotation JSON")
    train_images: Optional[str] = setting(None, "--train-images", help="coco_json: training image folder")
    val_ann: Optional[str] = setting(None, "--val-ann", help="coco_json: validation annotation JSON")
    val_images: Optional[str] = setting(None, "--val-images", help="coco_json: validation image folder")
    bad_annotations: Optional[str] = setting(
        None,
        "--bad-annotations",
        help="faulty annotations: stop with the list, or drop them "
        "(default: drop for coco/coco_kp, whose 2017 files hold a few degenerate boxes torchvision drops silently; "
        "stop otherwise)",
        choices=("stop", "drop"),
    )
    check_samples: int = setting(16, "--check-samples", help="decoded samples checked before training")
    lsj_size: int = setting(1024, help="--data-augmentation lsj: the square output size (torchvision's 1024)")
    report: bool = setting(
        True,
        "--data-report",
        help="print the data and anchor report before step 1",
        negative=("--no-data-report", "skip it"),
    )
    repeat_factor_threshold: Optional[float] = setting(
        None,
        "--repeat-factor-threshold",
        help="repeat-factor sampling (LVIS / Detectron2): images of classes in fewer than this fraction of the "
        "images repeat per epoch; the data report suggests a value (default: off)",
    )
    repeat_sqrt: bool = setting(
        True,
        "--repeat-sqrt",
        help="repeat-factor sampling: factor sqrt(t / f(c)), as Detectron2",
        negative=("--no-repeat-sqrt", "factor t / f(c) instead"),
    )
    shapes: Dict[str, Any] = setting({}, help="shapes dataset knobs (see references/shapes.py ShapesSpec)")
    tile_size: Optional[int] = setting(
        None,
        "--tile-size",
        help="tiled (sliced) training and evaluation: square tiles of this many native pixels, each resized by the "
        "model as an image (references/tiles.py; default: off)",
    )
    tile_overlap: Optional[int] = setting(
        None, "--tile-overlap", help="pixels neighbouring tiles share (default: 20%% of data.tile_size)"
    )
    tile_whole_image: bool = setting(
        True,
        "--tile-whole-image",
        help="sliced inference also runs the whole image and merges its detections with the tiles'",
        negative=("--no-tile-whole-image", "tiles only"),
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("maskrcnn_resnet50_fpn", "--model", help="model name (a tv_lossfix builder or maskrcnn_tiny)")
    rpn_score_thresh: Optional[float] = setting(None, "--rpn-score-thresh", help="rpn score threshold for faster-rcnn")
    trainable_backbone_layers: Optional[int] = setting(
        None, "--trainable-backbone-layers", help="number of trainable layers of backbone"
    )
    weights: Optional[str] = setting(None, "--weights", help="weights: enum name, DEFAULT, or a local checkpoint path")
    weights_backbone: Optional[str] = setting(None, "--weights-backbone", help="backbone weights enum name")
    num_classes: Optional[int] = setting(
        None,
        "--num-classes",
        help="classes incl. background (default: 91 for coco, 2 for coco_kp, else from the data)",
    )
    stock: bool = setting(False, "--stock", help="build torchvision's own model (no tv_lossfix), for A/B runs")
    kwargs: Dict[str, Any] = setting(
        {}, help="extra keyword arguments of the builder (min_size, box_score_thresh, ...)"
    )
    anchor_sizes: Optional[List[List[float]]] = setting(
        None, help="RPN anchor sizes, one list per feature map, e.g. [[16], [32], [64]]"
    )
    aspect_ratios: Optional[List[List[float]]] = setting(
        None, help="RPN anchor aspect ratios (h/w): one list for every feature map, or one per feature map"
    )
    loss_preset: Optional[str] = setting(
        None, "--loss-preset", help="loss preset the rpn_head/roi_head keys override", choices=LOSS_PRESETS
    )
    preset: Optional[str] = setting(
        None, help="same as model.loss_preset (the bare loss-config spelling)", choices=LOSS_PRESETS
    )
    rpn_head: Dict[str, Any] = setting({}, help="RPN loss settings (tv_lossfix.RPNLossConfig)")
    roi_head: Dict[str, Any] = setting(
        {},
        help="RoI loss settings (tv_lossfix.RoILossConfig); class_weight: auto is resolved from the training data",
    )
    class_weight_method: Optional[str] = setting(
        None,
        help="how model.roi_head.class_weight: auto weights the classes (default: effective_number)",
        choices=CLASS_WEIGHT_METHODS,
    )
    class_weight_beta: Optional[float] = setting(
        None, help="the effective_number beta of model.roi_head.class_weight: auto (default: 0.999)"
    )
    class_agnostic_bbox: bool = setting(
        False, help="one box regression for every class (roi_heads.box_predictor.bbox_pred with 4 outputs)"
    )
    class_agnostic_mask: bool = setting(False, help="one mask for every class (mask logits with 1 channel)")
    sync_avg_factor: bool = setting(False, "--sync-avg-factor", help="average loss normalizers over DDP ranks")


@dataclass(frozen=True)
class DistributedConfig:
    world_size: int = setting(
        1,
        "--world-size",
        help="number of distributed processes (torchrun sets it; under SLURM it is read from here, else from "
        "SLURM_NTASKS)",
    )
    dist_url: str = setting("env://", "--dist-url", help="url used to set up distributed training")
    backend: Optional[str] = setting(
        None,
        "--dist-backend",
        help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)",
        choices=("nccl", "gloo"),
    )


@dataclass(frozen=True)
class TrainConfig:
    """The resolved training config: build it with :func:`resolve` or :func:`finalize`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> Dict[str, Any]:
        """The nested plain-type form (YAML, checkpoints, JSON)."""
        return dataclasses.asdict(self)

    def get(self, path: str) -> Any:
        """The value at a dotted path (``"training.lr"``)."""
        node: Any = self
        for part in path.split("."):
            node = getattr(node, part)
        return node

    def replace(self, changes: Dict[str, Any], source: str = "config") -> "TrainConfig":
        """A new config with ``changes`` ({dotted path: value}) applied, each value type-checked."""
        tree = self.to_dict()
        for path, value in changes.items():
            if path not in BY_PATH:
                raise ConfigError(f"{source}: unknown key {path!r}{did_you_mean(path, BY_PATH)}")
            _set(tree, path, _check_value(BY_PATH[path], value, source))
        return _build(TrainConfig, tree)


# -- the schema, read from the dataclasses ------------------------------------------------------------
@dataclass(frozen=True)
class Opt:
    """One leaf of the schema, as --help, the YAML reader and the value checks see it."""

    path: str  # dotted YAML path
    flags: Tuple[str, ...]  # command-line flags ((): YAML only); the first is torchvision's spelling
    default: Any
    kind: type  # int, float, str, bool, list (of ints), dict, object (checked by its own rule)
    nullable: bool
    help: str
    choices: Optional[Tuple[str, ...]]
    lower: bool
    negative: Optional[Tuple[str, str]]
    shown: Optional[str]


_META = ("help", "choices", "lower", "negative", "shown")


def _kind(hint: Any) -> Tuple[type, bool]:
    """(kind, nullable) of a field's type hint."""
    args = typing.get_args(hint)
    nullable = typing.get_origin(hint) is typing.Union and type(None) in args
    if nullable:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin in (int, float, str, bool, dict):
        return origin, nullable
    return (list if hint == List[int] else object), nullable  # object: a rule of its own checks it


def _options(cls: type, prefix: str) -> List[Opt]:
    out: List[Opt] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += _options(hints[f.name], path + ".")
            continue
        kind, nullable = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        m = f.metadata
        out.append(Opt(path, m["flags"], default, kind, nullable=nullable, **{k: m[k] for k in _META}))
    return out


OPTIONS: List[Opt] = _options(TrainConfig, "")
BY_PATH = {o.path: o for o in OPTIONS}


def _sections() -> Dict[str, set]:
    sec: Dict[str, set] = {"": set()}
    for o in OPTIONS:
        parts = o.path.split(".")
        for i in range(len(parts)):
            sec.setdefault(".".join(parts[:i]), set()).add(parts[i])
    return sec


SECTIONS = _sections()


def _build(cls: type, tree: Dict[str, Any]):
    """``cls`` from a nested dict of checked values (nested dataclasses built from their sub-dicts)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        v = tree[f.name]
        values[f.name] = _build(hints[f.name], v) if dataclasses.is_dataclass(hints[f.name]) else copy.deepcopy(v)
    return cls(**values)


def defaults_tree() -> Dict[str, Any]:
    """The defaults as a nested dict (the YAML form)."""
    return TrainConfig().to_dict()


def defaults() -> TrainConfig:
    """The default config, validated."""
    return finalize(defaults_tree())[0]


def _set(d: Dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _get(d: Dict[str, Any], path: str) -> Any:
    for p in path.split("."):
        d = d[p]
    return d


def flatten(tree: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """{dotted path: value} of a config's nested dict (a checkpoint's, or ``cfg.to_dict()``), at the
    schema's leaves: a mapping-valued key (``model.kwargs``, ``model.roi_head``) stays one value."""
    out: Dict[str, Any] = {}

    def walk(node: Dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and path not in BY_PATH:
                walk(v, path + ".")
            else:
                out[path] = v

    walk(tree or {}, "")
    return out


# -- reading: YAML, flags, values -----------------------------------------------------------------------
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
    if o.kind is list and isinstance(v, tuple):
        v = list(v)
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


def _add_flag(p, o: Opt) -> None:
    dest = o.path.replace(".", "__")
    shown = o.default if o.shown is None else o.shown
    default_text = "" if o.kind is bool or "default:" in o.help else f" (default: {shown})"
    if o.kind is bool:
        on_help = o.help + (" (default)" if o.negative and o.default else "")
        p.add_argument(*o.flags, dest=dest, action="store_true", default=argparse.SUPPRESS, help=on_help)
        if o.negative:
            flag, off_help = o.negative
            p.add_argument(flag, dest=dest, action="store_false", default=argparse.SUPPRESS, help=off_help)
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
            metavar=None if o.choices else o.path.rsplit(".", 1)[-1].upper(),
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
    groups = {s: p.add_argument_group(f"{s} (YAML section {s}:)") for s in ("data", "model", "training", "distributed")}
    for o in OPTIONS:
        if o.flags:
            _add_flag(groups[o.path.split(".")[0]], o)
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
) -> Tuple[TrainConfig, LossConfig, bool]:
    """Parse the command line, merge defaults < YAML < flags, validate.

    ``reads``: the data files the caller reads (e.g. ("train_ann",) for analyze_data.py); by default
    those a run needs. Returns (config, loss config, whether --print-config was given).
    """
    args = build_parser().parse_args(argv)
    tree = defaults_tree()
    if args.config:
        _merge_yaml(tree, read_yaml(args.config), "", args.config)
    for dest, value in vars(args).items():
        if dest not in ("config", "print_config"):
            _set(tree, dest.replace("__", "."), value)
    cfg, loss_cfg = finalize(tree, source=args.config or "config", reads=reads)
    return cfg, loss_cfg, args.print_config


def finalize(
    tree: Dict[str, Any], source: str = "config", reads: Optional[Sequence[str]] = None
) -> Tuple[TrainConfig, LossConfig]:
    """A nested dict of values (defaults < YAML < flags) -> the frozen, validated config and its loss config."""
    tree = copy.deepcopy(tree)
    for o in OPTIONS:
        _set(tree, o.path, _check_value(o, _get(tree, o.path), source))
    _fill_derived(tree, source)
    cfg = _build(TrainConfig, tree)
    return cfg, validate(cfg, source, reads)


def _fill_derived(tree: Dict[str, Any], source: str) -> None:
    """Values that follow from others, set before the config is frozen: --clip-grad-norm over the YAML
    section, the per-dataset defaults of --bad-annotations and --data-path."""
    t, d = tree["training"], tree["data"]
    if t["clip_grad_norm"] is not None:
        if t["clip_grad_norm"] < 0:
            raise ConfigError(
                f"--clip-grad-norm (training.clip_grad_norm) must be >= 0 (0 turns clipping off), "
                f"got {t['clip_grad_norm']:g}"
            )
        t["gradient_clip"]["enabled"] = t["clip_grad_norm"] > 0
        if t["clip_grad_norm"] > 0:
            t["gradient_clip"]["max_norm"] = t["clip_grad_norm"]
    if d["bad_annotations"] is None:
        d["bad_annotations"] = "drop" if d["dataset"] in ("coco", "coco_kp") else "stop"
    if d["data_path"] is None:
        d["data_path"] = "data" if d["dataset"] == "shapes" else TORCHVISION_COCO_PATH
    d["tile_overlap"] = check_tile_keys(d["tile_size"], d["tile_overlap"], d["tile_whole_image"], source)


# -- every rule across fields, before any data is read -----------------------------------------------
def validate(cfg: TrainConfig, source: str = "config", reads: Optional[Sequence[str]] = None) -> LossConfig:
    """Check every rule that involves more than one field; returns the loss config the model keys give."""
    _check_ranges(cfg, source)
    _check_only_with(cfg, source)
    _check_training(cfg.training, source)
    _check_repeat_factors(cfg.data, source)
    _check_data(cfg, source, reads)
    _check_model_and_data(cfg)
    _check_anchors(cfg.model, source)
    _check_tiles_for_model(cfg, source)
    _check_class_weight_keys(cfg.model, source)
    loss_cfg = _loss_config(cfg.model, source)
    _check_stock(cfg.model, loss_cfg, source)
    _check_class_weight_length(cfg)
    return loss_cfg


# The range of every numeric setting: (test, the rule in words, why where it is not plain). null passes
# where the schema allows it. A value out of range fails here, naming its key and flag, before any data.
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
RANGES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "training.batch_size": _AT_LEAST_1,
    "training.epochs": _AT_LEAST_1,
    "training.print_freq": _AT_LEAST_1,
    "training.eval_every": _AT_LEAST_1,
    "training.lr": (lambda v: v > 0, "> 0"),
    "training.momentum": (lambda v: 0 <= v < 1, "in [0, 1) (1 or more never forgets a gradient)"),
    "training.weight_decay": (lambda v: v >= 0, ">= 0 (a negative decay grows the weights)"),
    "training.norm_weight_decay": (lambda v: v >= 0, ">= 0 (a negative decay grows the weights)"),
    "training.lr_step_size": _AT_LEAST_1,
    "training.lr_gamma": (lambda v: 0 < v <= 1, "in (0, 1]: the lr is multiplied by it at each step (< 0: ascent)"),
    "training.lr_steps": (lambda v: all(x >= 1 for x in v), "epochs >= 1"),
    "training.warmup_iters": _AT_LEAST_0,
    "training.warmup_factor": (lambda v: 0 < v <= 1, "in (0, 1]: the first iteration's lr multiplier"),
    "training.max_consecutive_skips": _AT_LEAST_1,
    "training.iters_per_epoch": _AT_LEAST_1,
    "training.judge_after_iters": _AT_LEAST_0,
    "training.gallery_images": _AT_LEAST_0,
    "training.num_threads": _AT_LEAST_1,
    "training.start_epoch": _AT_LEAST_0,
    "training.gradient_clip.max_norm": (lambda v: v > 0, "> 0"),
    "training.gradient_clip.norm_type": (lambda v: v >= 1, ">= 1: the p of a p-norm (2: L2; 0 counts, < 1 is no norm)"),
    "data.workers": _AT_LEAST_0,
    "data.aspect_ratio_group_factor": (lambda v: v >= -1, ">= -1 (-1: off)"),
    "data.check_samples": _AT_LEAST_0,
    "data.lsj_size": (lambda v: v >= 32, ">= 32 (the backbone's largest stride)"),
    "model.rpn_score_thresh": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "model.num_classes": (lambda v: v >= 2, ">= 2 (the background and one class)"),
    "distributed.world_size": _AT_LEAST_1,
}


# Settings that one mode alone reads: a value other than the default under another mode cannot take effect
# (torchvision's script ignores them there; here they are refused, naming the key and what reads it).
_MULTISTEP = "only --lr-scheduler multisteplr reads it"
ONLY_WITH: Dict[str, Tuple[Callable[[TrainConfig], bool], str]] = {
    "data.lsj_size": (lambda c: c.data.augmentation == "lsj", "only --data-augmentation lsj reads it"),
    "training.lr_steps": (lambda c: c.training.lr_scheduler == "multisteplr", _MULTISTEP),
    "training.lr_gamma": (lambda c: c.training.lr_scheduler == "multisteplr", _MULTISTEP),
    "training.momentum": (lambda c: c.training.opt.startswith("sgd"), "only --opt sgd or sgd_nesterov reads it"),
    "training.warmup_factor": (lambda c: c.training.warmup_iters > 0, "only --warmup-iters >= 1 reads it"),
    "training.gallery_images": (
        lambda c: c.training.plots or c.training.gallery_images == 0,  # 0 asks for nothing
        "only --plots reads it (the gallery is one of the plots)",
    ),
    "training.lr_step_size": (
        lambda c: False,
        "no scheduler reads it (accepted at its default for torchvision's command lines): use --lr-steps",
    ),
}


def _check_only_with(cfg: TrainConfig, source: str) -> None:
    for path, (read, why) in ONLY_WITH.items():
        v = cfg.get(path)
        if v != BY_PATH[path].default and not read(cfg):
            raise ConfigError(f"{_where(BY_PATH[path], source)} = {v!r} has no effect: {why}")


def _check_ranges(cfg: TrainConfig, source: str) -> None:
    for path, (ok, rule) in RANGES.items():
        v = cfg.get(path)
        if v is not None and not ok(v):
            raise ConfigError(f"{_where(BY_PATH[path], source)} must be {rule}, got {v!r}")


def _check_training(t: TrainingConfig, source: str) -> None:
    if t.start_epoch >= t.epochs and not t.test_only and not t.resume:
        raise ConfigError(
            f"{source}: training.start_epoch (--start-epoch) {t.start_epoch} is not below training.epochs "
            f"(--epochs) {t.epochs}: no epoch would be trained"
        )
    if not t.output_dir:
        for key, flag in (("checkpoint_every_iters", "--checkpoint-every-iters"), ("overwrite", "--overwrite")):
            if getattr(t, key):
                raise ConfigError(
                    f"{source}: training.{key} ({flag}) has no effect with --output-dir '' (save nothing)"
                )
    if t.checkpoint_every_iters is not None and t.checkpoint_every_iters < 1:
        raise ConfigError(
            f"{source}: training.checkpoint_every_iters (--checkpoint-every-iters) must be >= 1 or null, "
            f"got {t.checkpoint_every_iters}"
        )
    try:
        import torch

        torch.device(t.device)
    except RuntimeError:
        raise ConfigError(f"--device {t.device!r} is not a torch device: use cuda, cuda:N or cpu") from None


def _check_repeat_factors(d: DataConfig, source: str) -> None:
    t = d.repeat_factor_threshold
    if t is not None and t <= 0:
        raise ConfigError(f"{source}: data.repeat_factor_threshold (--repeat-factor-threshold) must be > 0, got {t}")
    if t is None and not d.repeat_sqrt:
        raise ConfigError(
            f"{source}: data.repeat_sqrt false (--no-repeat-sqrt) has no effect without "
            f"data.repeat_factor_threshold (--repeat-factor-threshold T)"
        )


def _check_data(cfg: TrainConfig, source: str, reads: Optional[Sequence[str]]) -> None:
    d = cfg.data
    if d.dataset == "coco_json":
        keys = ("train_ann", "train_images", "val_ann", "val_images")
        missing = [f"--{k.replace('_', '-')}" for k in keys if not getattr(d, k)]
        if cfg.training.test_only:
            missing = [m for m in missing if m.startswith("--val")]
        if reads is not None:
            missing = [m for m in missing if m[2:].replace("-", "_") in reads]
        if missing:
            raise ConfigError(f"--dataset coco_json needs {', '.join(missing)} (data.train_ann ...)")
    if d.backend == "tv_tensor" and not d.use_v2:
        raise ConfigError("--backend tv_tensor needs --use-v2 (as in torchvision's script)")
    if d.use_copypaste and d.augmentation != "lsj":
        raise ConfigError(
            f"--use-copypaste works with --data-augmentation lsj only (as in torchvision), got {d.augmentation!r}"
        )
    if d.shapes:
        shapes_spec(d, source)  # a misspelt knob first: the more precise error
        if d.dataset != "shapes":
            raise ConfigError(
                f"{source}: data.shapes sets the embedded demo's data: it has no effect with --dataset {d.dataset}"
            )
    files = [
        f"--{k.replace('_', '-')}" for k in ("train_ann", "train_images", "val_ann", "val_images") if getattr(d, k)
    ]
    if files and d.dataset != "coco_json":
        raise ConfigError(
            f"{', '.join(files)} (data.{files[0][2:].replace('-', '_')} ...) are read with --dataset coco_json only; "
            f"--dataset {d.dataset} finds its files "
            + ("under --data-path" if d.dataset != "shapes" else "itself (data.shapes)")
        )


def shapes_spec(d: DataConfig, source: str = "config"):
    """``data.shapes`` as a references/shapes.py ShapesSpec; an unknown or bad knob is a ConfigError."""
    from shapes import ShapesSpec

    known = {f.name for f in dataclasses.fields(ShapesSpec)}
    for k in d.shapes:
        if k not in known:
            raise ConfigError(f"{source}: unknown key 'data.shapes.{k}'{did_you_mean(k, known, 'data.shapes.')}")
    try:
        return ShapesSpec(**d.shapes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: data.{e}") from None


def _check_model_and_data(cfg: TrainConfig) -> None:
    m, d = cfg.model, cfg.data
    if "keypoint" in m.name and d.dataset == "coco":
        raise ConfigError("--model keypointrcnn_* trains on keypoints: use --dataset coco_kp (as torchvision says)")
    if "keypoint" not in m.name and d.dataset == "coco_kp":
        raise ConfigError(f"--dataset coco_kp is for keypoint models; {m.name} uses --dataset coco")
    if d.use_copypaste and "maskrcnn" not in m.name:
        raise ConfigError("--use-copypaste pastes instance masks: it needs a Mask R-CNN model")
    check_class_agnostic(m.name, m.stock, m.class_agnostic_bbox, m.class_agnostic_mask)
    if m.weights and m.weights_backbone:  # torchvision's builders drop the backbone weights silently
        raise ConfigError(
            f"--weights-backbone {m.weights_backbone} has no effect with --weights {m.weights}, which holds the "
            f"backbone too: drop one"
        )
    top = 6 if "mobilenet" in m.name else 5  # torchvision's backbones: MobileNetV3 has 6 stages, ResNet 5
    if m.trainable_backbone_layers is not None and not 0 <= m.trainable_backbone_layers <= top:
        raise ConfigError(
            f"--trainable-backbone-layers (model.trainable_backbone_layers) must be in 0..{top} for {m.name}, "
            f"got {m.trainable_backbone_layers}"
        )
    if m.trainable_backbone_layers is not None and (m.name == "maskrcnn_tiny" or not (m.weights or m.weights_backbone)):
        why = (
            "maskrcnn_tiny trains its whole backbone"
            if m.name == "maskrcnn_tiny"
            else "without --weights or --weights-backbone every layer trains (torchvision falls back to 5)"
        )
        raise ConfigError(f"--trainable-backbone-layers {m.trainable_backbone_layers} has no effect: {why}")


def check_class_agnostic(name: str, stock: bool, bbox: bool, mask: bool) -> None:
    """The class-agnostic keys need tv_lossfix's heads, and a mask branch for ``mask`` (models.build_model
    applies this rule too)."""
    if (bbox or mask) and stock:
        raise ConfigError(
            "model.class_agnostic_bbox / class_agnostic_mask need tv_lossfix's heads (torchvision's own pick the "
            "box and mask outputs by class): drop --stock"
        )
    if mask and "maskrcnn" not in name:
        raise ConfigError(f"model.class_agnostic_mask: --model {name} has no mask branch: drop it")


def _check_anchors(m: ModelConfig, source: str) -> None:
    for name in ("anchor_sizes", "aspect_ratios"):
        v = getattr(m, name)
        ok = v is None or (
            isinstance(v, list)
            and v
            and all(
                isinstance(row, list)
                and row
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in row)
                for row in v
            )
        )
        if not ok:
            raise ConfigError(
                f"{source}: model.{name} must be a list of non-empty lists of positive numbers "
                f"(one list per feature map), got {v!r}"
            )


def check_tile_keys(tile_size: Optional[int], overlap: Optional[int], whole_image: bool, source: str) -> Optional[int]:
    """The tile keys' rules, before any data is read; returns the overlap to use (its default filled in)."""
    from tiles import MIN_TILE, OVERLAP_FRACTION

    if tile_size is None:
        if overlap is not None:
            raise ConfigError(f"{source}: data.tile_overlap (--tile-overlap) has no effect without data.tile_size")
        if not whole_image:
            raise ConfigError(f"{source}: data.tile_whole_image false has no effect without data.tile_size")
        return None
    if tile_size < MIN_TILE:
        raise ConfigError(f"{source}: data.tile_size (--tile-size) must be >= {MIN_TILE} px, got {tile_size}")
    if overlap is None:
        return int(round(OVERLAP_FRACTION * tile_size))
    if overlap < 0:
        raise ConfigError(f"{source}: data.tile_overlap (--tile-overlap) must be >= 0, got {overlap}")
    if overlap >= tile_size:
        raise ConfigError(
            f"{source}: data.tile_overlap ({overlap}) must be smaller than data.tile_size ({tile_size}): "
            f"the tiles would not advance"
        )
    return overlap


def _check_tiles_for_model(cfg: TrainConfig, source: str) -> None:
    """Tiles clip boxes and masks: they are for box and mask models. (model.kwargs min_size / max_size,
    the input scale the data report advises, are range-checked with the other builder keywords in
    models.check_model_kwargs.)"""
    if cfg.data.tile_size and "keypoint" in cfg.model.name:
        raise ConfigError(
            f"{source}: data.tile_size: tiles clip boxes and masks, not keypoints: drop it for {cfg.model.name}"
        )


def auto_class_weight(m: ModelConfig) -> bool:
    """``model.roi_head.class_weight: auto``: train.py resolves it from the training data."""
    return m.roi_head.get("class_weight") == "auto"


def auto_fed_image_counts(m: ModelConfig) -> bool:
    """``model.roi_head.cls_loss: federated`` with ``fed_image_counts: auto`` or none given: train.py counts
    the training images of each class (Detectron2 reads them from the dataset's metadata)."""
    roi = m.roi_head or {}
    return roi.get("cls_loss") == "federated" and roi.get("fed_image_counts") in (None, "auto")


def _check_class_weight_keys(m: ModelConfig, source: str) -> None:
    """model.class_weight_method / _beta shape ``class_weight: auto`` only: refused anywhere else."""
    if not auto_class_weight(m):
        for key in ("class_weight_method", "class_weight_beta"):
            if getattr(m, key) is not None:
                raise ConfigError(
                    f"{source}: model.{key} ({getattr(m, key)!r}) applies only with model.roi_head.class_weight: "
                    f"auto (set it, or drop model.{key})"
                )
    beta = m.class_weight_beta
    if beta is not None and m.class_weight_method == "inverse_sqrt":
        raise ConfigError(
            f"{source}: model.class_weight_beta is the effective_number parameter: drop it for inverse_sqrt"
        )
    if beta is not None and not 0 <= beta < 1:
        raise ConfigError(f"{source}: model.class_weight_beta must be in [0, 1), got {beta!r}")


def _loss_config(m: ModelConfig, source: str) -> LossConfig:
    """The library reads the loss keys of ``model:`` exactly as LossConfig.from_yaml does."""
    keys = {k: v for k, v in dataclasses.asdict(m).items() if v is not None}
    if auto_class_weight(m):  # resolved later from the training data; the library refuses the marker
        keys["roi_head"] = {k: v for k, v in m.roi_head.items() if k != "class_weight"}
    if auto_fed_image_counts(m):  # the same for the federated loss's image counts
        keys["roi_head"] = {k: v for k, v in keys["roi_head"].items() if k != "fed_image_counts"}
    try:
        return LossConfig.from_dict({"model": keys})
    except LossConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_stock(m: ModelConfig, loss_cfg: LossConfig, source: str) -> None:
    """--stock builds torchvision's own heads: a loss or sampling setting could not take effect there."""
    if not m.stock or (loss_cfg.is_default() and not auto_class_weight(m)):
        return
    keys = [f"model.{k}" for k in loss_cfg.changed_keys()]
    keys += ["model.roi_head.class_weight"] if auto_class_weight(m) else []
    raise ConfigError(
        f"{source}: --stock builds torchvision's own heads, which cannot apply {', '.join(keys)}: "
        f"drop --stock or those settings"
    )


def known_num_classes(cfg: TrainConfig) -> Tuple[Optional[int], str]:
    """(the model's class count, where it comes from) before any data is read; (None, "") if unknown.
    For coco_json this reads the categories of the annotation file (contiguous labels 1..K)."""
    m, d = cfg.model, cfg.data
    if m.num_classes:
        return m.num_classes, "model.num_classes (--num-classes)"
    if d.dataset in ("coco", "coco_kp"):
        return {"coco": 91, "coco_kp": 2}[d.dataset], f"--dataset {d.dataset}"
    if d.dataset == "shapes":
        return shapes_spec(d).num_classes + 1, "data.shapes.num_classes"
    path = d.val_ann or d.train_ann
    try:
        with open(path, encoding="utf-8") as f:
            cats = json.load(f).get("categories")
    except (OSError, TypeError, ValueError, AttributeError):  # the data checks say what is wrong with it
        return None, ""
    return (len(cats) + 1, f"the {len(cats)} categories of {path}") if isinstance(cats, list) and cats else (None, "")


def _check_class_weight_length(cfg: TrainConfig) -> None:
    """A model.roi_head.class_weight list of the wrong length fails before any data is read."""
    weights = cfg.model.roi_head.get("class_weight")
    if not isinstance(weights, (list, tuple)):
        return
    n, source = known_num_classes(cfg)
    if n is not None and len(weights) != n:
        raise ConfigError(
            f"model.roi_head.class_weight has {len(weights)} entries but the model has {n} classes "
            f"({source}, background included): give one weight per class, background first"
        )


# -- writing ------------------------------------------------------------------------------------------
def dump(cfg: TrainConfig, loss_cfg: LossConfig) -> str:
    """The resolved config as YAML, with the effective loss settings spelled out."""
    model = {"rpn_head": loss_cfg.rpn_head.to_dict(), "roi_head": loss_cfg.roi_head.to_dict()}
    if auto_class_weight(cfg.model):  # not resolved yet (train.py rewrites config.yaml with the list)
        model["roi_head"]["class_weight"] = "auto"
    if auto_fed_image_counts(cfg.model):
        model["roi_head"]["fed_image_counts"] = "auto"
    model.update(loss_preset=None, preset=None)  # folded into the explicit values above
    out = cfg.to_dict()
    out["model"].update(model)
    return yaml.safe_dump(out, sort_keys=False)


assert set(SECTIONS["model"]) == set(TRAINING_MODEL_KEYS), "train_config's model keys and tv_lossfix's disagree"
