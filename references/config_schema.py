"""The training configuration's schema: one typed, frozen dataclass per YAML section, and each key's policy.

Each section is a frozen dataclass (``cfg.training.lr``, ``cfg.model.anchor_sizes``) whose fields are
the schema: type, default, command-line flags and help live in one place, so that ``--help``,
``--print-config`` and the saved ``config.yaml`` cannot drift apart. A field's :func:`setting` also
carries what the rest of the recipe does with the key (its range, the mode that reads it, what
``--resume`` does with a new value, whether a mid-epoch resume may change it, whether the Lightning CLI
honours it): a new key states its policy where it is declared, and the consumers read it from
:data:`OPTIONS` (references/config_rules.py, training_checkpoint.py, run_model.py, lightning/train.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from tv_lossfix._suggest import did_you_mean
from tv_lossfix.class_weights import CLASS_WEIGHT_METHODS

TORCHVISION_COCO_PATH = "/datasets01/COCO/022719/"
DATASETS = ("coco", "coco_kp", "coco_json", "shapes")
AUGMENTATIONS = ("hflip", "lsj", "multiscale", "ssd", "ssdlite", "none")
OPTIMIZERS = ("sgd", "sgd_nesterov", "adamw")
SCHEDULERS = ("multisteplr", "cosineannealinglr")
BACKENDS = ("pil", "tensor", "tv_tensor")
LOSS_PRESETS = ("torchvision", "mmdetection", "positive")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key or flag."""


@dataclass(frozen=True)
class Resume:
    """What ``--resume`` does when this run's value of a key differs from the checkpoint's config."""

    refused: Optional[str] = None  # why a new value cannot take effect (None: it can)
    applied: str = "read by this run as given"  # how a new value takes effect
    toggle_only: bool = False  # refused only between null and a value; a new value for a set one is applied
    compared: bool = True  # False: a setting of this invocation (--resume itself, --test-only ...)

    def refusal(self, old: Any, new: Any) -> Optional[str]:
        """Why the change old -> new is refused, or None when it is applied."""
        if self.toggle_only and old is not None and new is not None:
            return None
        return self.refused


def refused_on_resume(why: str, applied: str = Resume.applied, toggle_only: bool = False) -> Resume:
    return Resume(refused=why, applied=applied, toggle_only=toggle_only)


def applied_on_resume(how: str) -> Resume:
    return Resume(applied=how)


NOT_COMPARED = Resume(compared=False)
NO_OFF = object()  # Opt.off of a key that has no value asking for nothing


def setting(default: Any, *flags: str, **meta: Any):
    """A schema field. ``flags``: command-line spellings, torchvision's first (none: YAML only).
    ``meta``: :class:`Opt`'s fields after ``nullable``, by name: help, choices, lower, negative, shown,
    and the key's policies (range, only_with, off, resume, mid_epoch_fixed, lightning, torchvision_dest).
    A misspelt one fails when the schema is read, at import."""
    if "choices" in meta:
        meta["choices"] = tuple(meta["choices"]) or None
    meta = {"flags": flags, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# The ranges of the numeric settings (Opt.range): (test, the rule in words, why where it is not plain).
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_NO_NEGATIVE_DECAY = (lambda v: v >= 0, ">= 0 (a negative decay grows the weights)")
# Settings that one mode alone reads (Opt.only_with).
_MULTISTEP = (lambda c: c.training.lr_scheduler == "multisteplr", "only --lr-scheduler multisteplr reads it")
_SAVING = (lambda c: c.training.output_dir != "", "only --output-dir DIR reads it (--output-dir '' saves nothing)")
# A resumed run keeps the warmup it started with.
_WARMUP_FIXED = refused_on_resume("warmup was fixed when the run started")
_SAME_ANCHORS = refused_on_resume("the RPN head was trained for other anchors")


# Flags shared with torchvision's references/detection/train.py keep its defaults.
@dataclass(frozen=True)
class GradientClipConfig:
    enabled: bool = setting(False, help="clip the global gradient norm after backward", lightning=True)
    max_norm: float = setting(
        35.0, help="max global norm (MMDetection's 35)", range=(lambda v: v > 0, "> 0"), lightning=True
    )
    norm_type: float = setting(
        2.0,
        help="p of the norm",
        range=(lambda v: v >= 1, ">= 1: the p of a p-norm (2: L2; 0 counts, < 1 is no norm)"),
        lightning=True,  # the L2 norm only (lightning/train.py refuses another p)
    )


@dataclass(frozen=True)
class TrainingConfig:
    device: str = setting(
        "cuda",
        "--device",
        help="device (cuda, cuda:N, cpu); cuda falls back to cpu without a GPU",
        lightning=True,  # -> Trainer(accelerator, devices)
    )
    batch_size: int = setting(
        2,
        "-b",
        "--batch-size",
        help="images per GPU; total batch = this x GPUs",
        range=_AT_LEAST_1,
        mid_epoch_fixed=True,
        lightning=True,  # the recipe's loaders
    )
    epochs: int = setting(
        26,
        "--epochs",
        help="number of total epochs to run",
        range=_AT_LEAST_1,
        resume=applied_on_resume("the run continues to the new epoch count"),
        lightning=True,
    )
    opt: str = setting(
        "sgd",
        "--opt",
        help="optimizer",
        choices=OPTIMIZERS,
        lower=True,
        resume=refused_on_resume("the optimizer state belongs to another optimizer"),
        lightning=True,
    )
    lr: float = setting(
        0.02,
        "--lr",
        help="initial lr: 0.02 is for 8 GPUs x 2 images; scale linearly",
        range=(lambda v: v > 0, "> 0"),
        resume=applied_on_resume("the new base lr replaces the restored one; the schedule continues from its position"),
        lightning=True,
    )
    momentum: float = setting(
        0.9,
        "--momentum",
        help="momentum",
        range=(lambda v: 0 <= v < 1, "in [0, 1) (1 or more never forgets a gradient)"),
        only_with=(lambda c: c.training.opt.startswith("sgd"), "only --opt sgd or sgd_nesterov reads it"),
        resume=applied_on_resume("set in every parameter group"),
        lightning=True,
    )
    weight_decay: float = setting(
        1e-4,
        "--wd",
        "--weight-decay",
        help="weight decay",
        torchvision_dest="weight_decay",  # torchvision's add_argument("--wd", ..., dest="weight_decay")
        range=_NO_NEGATIVE_DECAY,
        resume=applied_on_resume(
            "set in every parameter group (but the normalization group under --norm-weight-decay)"
        ),
        lightning=True,
    )
    norm_weight_decay: Optional[float] = setting(
        None,
        "--norm-weight-decay",
        help="weight decay of normalization layers (default: --wd)",
        range=_NO_NEGATIVE_DECAY,
        resume=refused_on_resume(
            "the parameter groups were built without/with it (a new value is applied)",
            applied="set in the normalization layers' parameter group",
            toggle_only=True,
        ),
        lightning=True,
    )
    lr_scheduler: str = setting(
        "multisteplr",
        "--lr-scheduler",
        help="lr scheduler",
        choices=SCHEDULERS,
        lower=True,
        resume=refused_on_resume("the scheduler state belongs to another scheduler"),
        lightning=True,
    )
    lr_step_size: int = setting(
        8,
        "--lr-step-size",
        help="accepted at its default for torchvision compatibility (its detection script does not read it "
        "either); another value is refused",
        range=_AT_LEAST_1,
        only_with=(
            lambda c: False,
            "no scheduler reads it (accepted at its default for torchvision's command lines): use --lr-steps",
        ),
        lightning=True,  # unused by torchvision's script too (refused at another value by only_with)
    )
    lr_steps: List[int] = setting(
        [16, 22],
        "--lr-steps",
        help="epochs at which to decrease lr (multisteplr)",
        range=(lambda v: all(x >= 1 for x in v), "epochs >= 1"),
        only_with=_MULTISTEP,
        resume=applied_on_resume("the scheduler's milestones are replaced"),
        lightning=True,
    )
    lr_gamma: float = setting(
        0.1,
        "--lr-gamma",
        help="lr decay factor (multisteplr)",
        range=(lambda v: 0 < v <= 1, "in (0, 1]: the lr is multiplied by it at each step (< 0: ascent)"),
        only_with=_MULTISTEP,
        resume=applied_on_resume("the scheduler's gamma is replaced"),
        lightning=True,
    )
    print_freq: int = setting(
        20,
        "--print-freq",
        help="print a log line every N iterations",
        range=_AT_LEAST_1,
        lightning=True,  # -> log_every_n_steps and the console line
    )
    output_dir: str = setting(
        ".",
        "--output-dir",
        help="where checkpoints, metrics and plots go ('': save nothing)",
        lightning=True,  # -> default_root_dir ('': no logger, no checkpoints)
    )
    resume: str = setting(
        "",
        "--resume",
        help="checkpoint to resume from",
        resume=NOT_COMPARED,
        lightning="Lightning resumes from its own checkpoints (Trainer.fit(ckpt_path=...))",
    )
    overwrite: bool = setting(
        False,
        "--overwrite",
        help="start a new run in an --output-dir holding another run's checkpoint: that run's files are removed "
        "first (without it, such a folder is refused unless --resume)",
        only_with=_SAVING,
        resume=NOT_COMPARED,
        lightning="Lightning writes each run to a folder of its own (lightning_logs/version_N)",
    )
    start_epoch: int = setting(
        0, "--start_epoch", "--start-epoch", help="start epoch", range=_AT_LEAST_0, resume=NOT_COMPARED, lightning=False
    )
    sync_bn: bool = setting(
        False,
        "--sync-bn",
        help="use SyncBatchNorm (CUDA)",
        lightning="this CLI trains on one device (Trainer(sync_batchnorm=True) in your own script)",
    )
    test_only: bool = setting(
        False,
        "--test-only",
        help="only evaluate the model",
        resume=NOT_COMPARED,
        lightning="use Trainer.validate(module, val_loader)",
    )
    use_deterministic_algorithms: bool = setting(
        False,
        "--use-deterministic-algorithms",
        help="forces deterministic algorithms",
        lightning=True,  # -> Trainer(deterministic=True)
    )
    amp: bool = setting(
        False,
        "--amp",
        help="mixed precision (CUDA autocast + GradScaler)",
        lightning="use --precision 16-mixed (Lightning's GradScaler; it unscales before clipping)",
    )
    # tv_lossfix's additions.
    clip_grad_norm: Optional[float] = setting(
        None,
        "--clip-grad-norm",
        help="clip the global grad norm at MAX (0: off); sets training.gradient_clip",
        range=(lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
        lightning=True,  # folded into gradient_clip by the config
    )
    gradient_clip: GradientClipConfig = field(default_factory=GradientClipConfig)  # -> --gradient-clip-val
    warmup_iters: int = setting(
        1000,
        "--warmup-iters",
        help="linear lr warmup iterations, capped at the first epoch's length as torchvision does",
        range=_AT_LEAST_0,
        resume=_WARMUP_FIXED,
        lightning=True,
    )
    warmup_factor: float = setting(
        0.001,
        "--warmup-factor",
        help="lr multiplier at the first iteration",
        range=(lambda v: 0 < v <= 1, "in (0, 1]: the first iteration's lr multiplier"),
        only_with=(lambda c: c.training.warmup_iters > 0, "only --warmup-iters >= 1 reads it"),
        resume=_WARMUP_FIXED,
        lightning=True,
    )
    auto_scale_lr: bool = setting(
        False,
        "--auto-scale-lr",
        help="lr is for 16 images per step (MMDetection's base batch): scale it by the real images per step",
        lightning=False,
    )
    nan_policy: str = setting(
        "stop",
        "--nan-policy",
        help="non-finite loss/grad: stop, or skip the step",
        choices=("stop", "skip"),
        lightning="Lightning has no NaN policy (references/train.py stops or skips a non-finite step)",
    )
    max_consecutive_skips: int = setting(
        10,
        "--max-consecutive-skips",
        help="stop after N skipped steps in a row",
        range=_AT_LEAST_1,
        lightning="Lightning has no NaN policy",
    )
    seed: int = setting(
        0,
        "--seed",
        help="seed of model init, sampling and data order",
        resume=refused_on_resume("the checkpoint's RNG states continue the run; a new seed cannot take effect"),
        lightning=True,
    )
    iters_per_epoch: Optional[int] = setting(
        None,
        "--iters-per-epoch",
        help="cap the iterations of an epoch (quick runs)",
        range=_AT_LEAST_1,
        lightning=True,  # -> limit_train_batches
    )
    checkpoint_every_iters: Optional[int] = setting(
        None,
        "--checkpoint-every-iters",
        help="also write checkpoint.pth every N iterations (mid-epoch; --resume continues from it)",
        range=(lambda v: v >= 1, ">= 1 or null"),
        only_with=_SAVING,
        lightning=False,
    )
    eval_every: int = setting(
        1,
        "--eval-every",
        help="evaluate every N epochs (and after the last)",
        range=_AT_LEAST_1,
        lightning=True,  # -> check_val_every_n_epoch
    )
    judge_after_iters: int = setting(
        200,
        "--judge-after-iters",
        help="no collapse warning before this many iterations (and the end of warmup)",
        range=_AT_LEAST_0,
        lightning=False,
    )
    gallery_images: int = setting(
        8,
        "--gallery-images",
        help="validation images drawn in the final gallery (0: none)",
        range=_AT_LEAST_0,
        only_with=(lambda c: c.training.plots, "only --plots reads it (the gallery is one of the plots)"),
        off=0,
        lightning=False,  # references/train.py's pictures are not drawn there: 0 asks for nothing
    )
    plots: bool = setting(
        True,
        "--plots",
        help="write PNG plots at the end",
        negative=("--no-plots", "write no plots"),
        off=False,
        lightning=False,
    )
    num_threads: Optional[int] = setting(
        None, "--num-threads", help="torch CPU threads (default: torch's)", range=_AT_LEAST_1, lightning=True
    )


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
    workers: int = setting(4, "-j", "--workers", help="number of data loading workers", range=_AT_LEAST_0)
    aspect_ratio_group_factor: int = setting(
        3,
        "--aspect-ratio-group-factor",
        help="aspect-ratio grouping (-1: off)",
        range=(lambda v: v >= -1, ">= -1 (-1: off)"),
        mid_epoch_fixed=True,
    )
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
    check_samples: int = setting(
        16, "--check-samples", help="decoded samples checked before training", range=_AT_LEAST_0
    )
    lsj_size: int = setting(
        1024,
        help="--data-augmentation lsj: the square output size (torchvision's 1024)",
        range=(lambda v: v >= 32, ">= 32 (the backbone's largest stride)"),
        only_with=(lambda c: c.data.augmentation == "lsj", "only --data-augmentation lsj reads it"),
    )
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
        range=(lambda v: v > 0, "> 0"),
        mid_epoch_fixed=True,
    )
    repeat_sqrt: bool = setting(
        True,
        "--repeat-sqrt",
        help="repeat-factor sampling: factor sqrt(t / f(c)), as Detectron2",
        negative=("--no-repeat-sqrt", "factor t / f(c) instead"),
        mid_epoch_fixed=True,
    )
    sampler: Optional[str] = setting(
        None,
        "--sampler",
        help="the training images' order: a name registered in references/samplers.py (random, repeat_factor; "
        "default: repeat_factor with --repeat-factor-threshold, else random)",
        mid_epoch_fixed=True,
    )
    shapes: Dict[str, Any] = setting({}, help="shapes dataset knobs (see references/shapes.py ShapesSpec)")
    tile_size: Optional[int] = setting(
        None,
        "--tile-size",
        help="tiled (sliced) training and evaluation: square tiles of this many native pixels, each resized by the "
        "model as an image (references/tiles.py; default: off)",
        lightning="the Lightning module evaluates whole images (sliced evaluation: references/train.py, predict.py)",
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
    name: str = setting(
        "maskrcnn_resnet50_fpn",
        "--model",
        help="model name (a tv_lossfix builder or maskrcnn_tiny)",
        resume=refused_on_resume("the checkpoint holds another architecture"),
    )
    rpn_score_thresh: Optional[float] = setting(
        None,
        "--rpn-score-thresh",
        help="rpn score threshold for faster-rcnn",
        range=(lambda v: 0 <= v <= 1, "in [0, 1]"),
    )
    trainable_backbone_layers: Optional[int] = setting(
        None, "--trainable-backbone-layers", help="number of trainable layers of backbone"
    )
    weights: Optional[str] = setting(None, "--weights", help="weights: enum name, DEFAULT, or a local checkpoint path")
    weights_backbone: Optional[str] = setting(None, "--weights-backbone", help="backbone weights enum name")
    num_classes: Optional[int] = setting(
        None,
        "--num-classes",
        help="classes incl. background (default: 91 for coco, 2 for coco_kp, else from the data)",
        range=(lambda v: v >= 2, ">= 2 (the background and one class)"),
        resume=refused_on_resume("the checkpoint's predictors have another class count"),
    )
    stock: bool = setting(
        False,
        "--stock",
        help="build torchvision's own model (no tv_lossfix), for A/B runs",
        resume=refused_on_resume("the checkpoint's heads are the other kind"),
        lightning="the Lightning module trains tv_lossfix heads (their statistics are logged)",
    )
    kwargs: Dict[str, Any] = setting(
        {}, help="extra keyword arguments of the builder (min_size, box_score_thresh, ...)"
    )
    anchor_sizes: Optional[List[List[float]]] = setting(
        None, help="RPN anchor sizes, one list per feature map, e.g. [[16], [32], [64]]", resume=_SAME_ANCHORS
    )
    aspect_ratios: Optional[List[List[float]]] = setting(
        None,
        help="RPN anchor aspect ratios (h/w): one list for every feature map, or one per feature map",
        resume=_SAME_ANCHORS,
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
        None,
        help="the effective_number beta of model.roi_head.class_weight: auto (default: 0.999)",
        range=(lambda v: 0 <= v < 1, "in [0, 1)"),
    )
    class_agnostic_bbox: bool = setting(
        False,
        help="one box regression for every class (roi_heads.box_predictor.bbox_pred with 4 outputs)",
        resume=refused_on_resume("the checkpoint's box predictor has the other shape (4 outputs or 4 per class)"),
    )
    class_agnostic_mask: bool = setting(
        False,
        help="one mask for every class (mask logits with 1 channel)",
        resume=refused_on_resume("the checkpoint's mask predictor has the other shape (1 channel or 1 per class)"),
    )
    sync_avg_factor: bool = setting(False, "--sync-avg-factor", help="average loss normalizers over DDP ranks")


# Lightning's CLI trains on one device: every distributed: key is refused there.
_ONE_DEVICE = "this CLI trains on one device (DDP: use module.py)"


@dataclass(frozen=True)
class DistributedConfig:
    world_size: int = setting(
        1,
        "--world-size",
        help="number of distributed processes (torchrun sets it; under SLURM it is read from here, else from "
        "SLURM_NTASKS)",
        range=_AT_LEAST_1,
        mid_epoch_fixed=True,
        lightning=_ONE_DEVICE,
    )
    dist_url: str = setting(
        "env://", "--dist-url", help="url used to set up distributed training", lightning=_ONE_DEVICE
    )
    backend: Optional[str] = setting(
        None,
        "--dist-backend",
        help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)",
        choices=("nccl", "gloo"),
        lightning=_ONE_DEVICE,
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
            set_path(tree, path, check_value(BY_PATH[path], value, source))
        return from_tree(TrainConfig, tree)


# -- the schema, read from the dataclasses ------------------------------------------------------------
@dataclass(frozen=True)
class Opt:
    """One leaf of the schema, as --help, the YAML reader and the value checks see it."""

    path: str  # dotted YAML path
    flags: Tuple[str, ...]  # command-line flags ((): YAML only); the first is torchvision's spelling
    default: Any
    kind: type  # int, float, str, bool, list (of ints), dict, object (checked by its own rule)
    nullable: bool
    help: str = ""
    choices: Optional[Tuple[str, ...]] = None
    lower: bool = False  # torchvision lower-cases the value (``--opt SGD``)
    negative: Optional[Tuple[str, str]] = None  # (flag, help) of a boolean's off switch (``--no-plots``)
    shown: Optional[str] = None  # the default --help prints, where it differs
    # -- the key's policies, read by the rest of the recipe --
    range: Optional[Tuple[Callable[[Any], bool], str]] = None  # (test, the rule in words); null passes
    # (whether this config's mode reads the key, what reads it): another value than the default (or
    # ``off``) under another mode is refused.
    only_with: Optional[Tuple[Callable[["TrainConfig"], bool], str]] = None
    off: Any = NO_OFF  # the value that asks for nothing (gallery_images 0): accepted where the key is not read
    resume: Resume = Resume()  # what --resume does with a new value
    mid_epoch_fixed: bool = False  # the batch order follows from it: a mid-epoch resume may not change it
    # The Lightning CLI (references/lightning/train.py): True honours it; False or the hint (str) refuses a
    # value other than the default (or ``off``); None: a model:/data: key, honoured through the recipe's code.
    lightning: Union[None, bool, str] = None
    # The name torchvision's script keeps it under in ``args``, where it is not its first long flag's.
    torchvision_dest: Optional[str] = None

    def torchvision_args_name(self) -> Optional[str]:
        """The attribute of torchvision's ``args`` (a reference checkpoint's) that holds this setting:
        argparse's dest of the first long flag, unless torchvision names it (``--wd``: weight_decay)."""
        long = next((f for f in self.flags if f.startswith("--")), None)
        return self.torchvision_dest or (long[2:].replace("-", "_") if long else None)


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
        out.append(Opt(path, default=default, kind=kind, nullable=nullable, **f.metadata))
    return out


OPTIONS: List[Opt] = _options(TrainConfig, "")
BY_PATH = {o.path: o for o in OPTIONS}


def mid_epoch_fixed_paths() -> List[str]:
    """The keys a mid-epoch checkpoint's remaining batches follow from (Opt.mid_epoch_fixed)."""
    return [o.path for o in OPTIONS if o.mid_epoch_fixed]


def on_resume(path: str) -> Resume:
    """What --resume does with a new value of ``path`` (a key the schema no longer has: read as given)."""
    return BY_PATH[path].resume if path in BY_PATH else Resume()


def _sections() -> Dict[str, set]:
    sec: Dict[str, set] = {"": set()}
    for o in OPTIONS:
        parts = o.path.split(".")
        for i in range(len(parts)):
            sec.setdefault(".".join(parts[:i]), set()).add(parts[i])
    return sec


SECTIONS = _sections()


def from_tree(cls: type, tree: Dict[str, Any]):
    """``cls`` from a nested dict of checked values (nested dataclasses built from their sub-dicts)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        v = tree[f.name]
        values[f.name] = from_tree(hints[f.name], v) if dataclasses.is_dataclass(hints[f.name]) else copy.deepcopy(v)
    return cls(**values)


def defaults_tree() -> Dict[str, Any]:
    """The defaults as a nested dict (the YAML form)."""
    return TrainConfig().to_dict()


def set_path(d: Dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def get_path(d: Dict[str, Any], path: str) -> Any:
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


def key_named(o: Opt, source: str) -> str:
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


def check_value(o: Opt, v: Any, source: str) -> Any:
    if v is None:
        if o.nullable:
            return None
        raise ConfigError(f"{key_named(o, source)} may not be null")
    if o.kind is list and isinstance(v, tuple):
        v = list(v)
    ok, what = _TYPE_CHECKS[o.kind]
    if not ok(v):
        raise ConfigError(f"{key_named(o, source)} must be {what}, got {v!r}")
    if o.kind is float:
        if not math.isfinite(v):
            raise ConfigError(f"{key_named(o, source)} must be finite, got {v!r}")
        v = float(v)
    if o.lower:
        v = v.lower()
    if o.choices and v not in o.choices:
        raise ConfigError(
            f"{key_named(o, source)} must be one of {', '.join(o.choices)}, got {v!r}{did_you_mean(v, o.choices)}"
        )
    return v
