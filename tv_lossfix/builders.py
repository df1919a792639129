"""Builders with torchvision's signatures plus ``loss_cfg``.

Each one calls torchvision's builder of the same name and then :func:`patch_model`. Two
fine-tuning steps torchvision leaves to the user are done here:

* ``weights`` with a ``num_classes`` (or ``num_keypoints``) other than the weights' own loads the
  pretrained model and replaces the predictors, as torchvision's fine-tuning tutorial does by hand
  (torchvision's builders raise a ValueError instead);
* ``weights`` may be the path of a local checkpoint: a ``state_dict`` saved from the same
  architecture, or a training checkpoint with it under ``"model"``. A checkpoint that carries
  ``"model_settings"`` (references/train.py writes them) rebuilds the model it trained: anchors,
  input sizes, thresholds, samplers and loss config; a keyword given here wins and is named in a
  ``ModelSettingsWarning`` (``from tv_lossfix.model_settings import ModelSettingsWarning``).

An unknown keyword argument is a TypeError; torchvision's builders silently ignore it.
:func:`build_with_report` builds the same model and says what was replaced and what the checkpoint held.
"""

import dataclasses
import inspect
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights
from torchvision.models import detection as tvdet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _validate_trainable_layers
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from ._suggest import did_you_mean
from .checkpoint import CheckpointError, model_state_dict, read_checkpoint
from .class_agnostic import (
    BOX_OUTPUTS,
    contradicted_flag,
    is_class_agnostic,
    make_heads_class_agnostic,
    new_mask_logits,
    state_class_agnostic,
)
from .classifiers import load_extra_state, prepare_classifier, split_extra_state
from .config import LossConfig
from .model_settings import apply_model_settings, warn_conflicts
from .patch import patch_model
from .sampling import TORCHVISION_KWARGS, check_builder_kwargs

__all__ = [
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "keypointrcnn_resnet50_fpn",
    "BUILDERS",
    "BuildReport",
    "CheckpointModel",
    "build_with_report",
    "load_checkpoint_model",
    "patch_loaded",
    "is_checkpoint_path",
    "load_checkpoint_state",
    "replace_predictors",
]

_LOG = logging.getLogger(__name__)
# The LossConfig keys that a torchvision builder keyword also sets (rpn_fg_iou_thresh -> pos_iou_thr...).
_SAMPLING_KEYS = {key for _, key in TORCHVISION_KWARGS.values()}

# Keywords the transform accepts besides the model class's named parameters.
_TRANSFORM_KWARGS = {
    n for n in inspect.signature(GeneralizedRCNNTransform.__init__).parameters if n not in ("self", "kwargs")
} | {"_skip_resize"}


def _check_kwargs(name: str, model_cls: type, kwargs: Dict[str, Any]) -> None:
    allowed = {
        n
        for n in inspect.signature(model_cls.__init__).parameters
        if n not in ("self", "backbone", "num_classes", "kwargs")
    } | _TRANSFORM_KWARGS
    for key in kwargs:
        if key not in allowed:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}{did_you_mean(key, allowed)}")


def is_checkpoint_path(weights: Any) -> bool:
    """Whether ``weights`` names a local checkpoint file rather than torchvision weights."""
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    return os.path.exists(weights) or os.sep in weights or weights.endswith((".pt", ".pth", ".ckpt"))


def load_checkpoint_state(path: Any) -> Dict[str, torch.Tensor]:
    """The model ``state_dict`` in a file: a bare state_dict or a training checkpoint's ``"model"``."""
    return read_weights_checkpoint(path)[0]


def read_weights_checkpoint(path: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(model ``state_dict``, ``model_settings``) of a checkpoint file; settings are {} for a bare state_dict.

    A missing file is a :class:`~tv_lossfix.checkpoint.CheckpointNotFoundError` (a FileNotFoundError too)."""
    ckpt = read_checkpoint(path, "weights")
    settings = ckpt.get("model_settings") if isinstance(ckpt, dict) else None
    return model_state_dict(ckpt, path, "weights"), dict(settings) if isinstance(settings, dict) else {}


def explicit_settings(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The builder keywords as model settings (an ``rpn_anchor_generator`` as its sizes and ratios)."""
    out = {k: v for k, v in kwargs.items() if k != "rpn_anchor_generator"}
    gen = kwargs.get("rpn_anchor_generator")
    if gen is not None and hasattr(gen, "sizes"):
        out["anchor_sizes"], out["aspect_ratios"] = gen.sizes, gen.aspect_ratios
    return out


def checkpoint_build_kwargs(
    settings: Dict[str, Any], kwargs: Dict[str, Any], state: Dict[str, torch.Tensor], path: Any
) -> Dict[str, Any]:
    """The builder keywords for a checkpoint's model: its anchors (the RPN head's shape depends on their
    count per location) unless an ``rpn_anchor_generator`` is given, which must fit the trained head."""
    out = dict(kwargs)
    trained = state.get("rpn.head.cls_logits.weight")
    gen = kwargs.get("rpn_anchor_generator")
    if gen is not None and trained is not None and hasattr(gen, "num_anchors_per_location"):
        given = gen.num_anchors_per_location()[0]
        if given != trained.shape[0]:
            raise CheckpointError(
                f"rpn_anchor_generator refused: it gives {given} anchors per location but the RPN head in "
                f"{os.fspath(path)} was trained for {trained.shape[0]}"
            )
    if gen is None and "anchor_sizes" in settings and "aspect_ratios" in settings:
        ratios = [tuple(r) for r in settings["aspect_ratios"]]
        out["rpn_anchor_generator"] = AnchorGenerator(tuple(tuple(s) for s in settings["anchor_sizes"]), tuple(ratios))
    return out


def _cfg_diff(old: LossConfig, new: LossConfig) -> Tuple[List[str], List[str]]:
    """``(["sec.key=old", ...], ["sec.key=new", ...])`` for the keys of two loss configs that differ.

    A sampling key given as None is no difference: it keeps the model's value, which the checkpoint's
    settings (``rpn_batch_size_per_image``...) have already restored.
    """
    was = old.flat()
    keys = {k: v for k, v in new.changed_keys(old).items() if not (v is None and k.split(".")[-1] in _SAMPLING_KEYS)}
    return [f"{k}={was[k]}" for k in keys], [f"{k}={v}" for k, v in keys.items()]


def restored_loss_cfg(
    settings: Dict[str, Any], loss_cfg: Any, cfg: LossConfig, kwargs: Dict[str, Any]
) -> Tuple[LossConfig, List[str]]:
    """(loss config, conflict lines): the checkpoint's config when none is given; a given one wins,
    named in a line when it differs.

    A torchvision builder keyword (``box_batch_size_per_image``...) wins over the restored config's key
    for the same value: that key becomes None (the model's value, which the keyword set).
    """
    saved = settings.get("loss_cfg")
    if not isinstance(saved, dict):
        return cfg, []
    if loss_cfg is None:
        restored = LossConfig.from_dict(saved)
        heads = {"rpn_head": {}, "roi_head": {}}
        for kwarg, (section, key) in TORCHVISION_KWARGS.items():
            if kwarg in kwargs:
                heads[section][key] = None
        rpn, roi = (dataclasses.replace(getattr(restored, h), **heads[h]) for h in ("rpn_head", "roi_head"))
        return dataclasses.replace(restored, rpn_head=rpn, roi_head=roi), []
    was, now = _cfg_diff(LossConfig.from_dict(saved), cfg)
    return cfg, [f"loss_cfg: checkpoint {', '.join(was)}, given {', '.join(now)} -> given"] if was else []


def _shape_of(state: Dict[str, torch.Tensor], key: str, path: Any, name: str) -> Tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{os.fspath(path)} is not a {name} checkpoint: it has no {key!r}")
    return tuple(state[key].shape)


def _match_norm_layers(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    # Pretrained torchvision detectors use FrozenBatchNorm2d (no num_batches_tracked); models built
    # with weights=None use BatchNorm2d. Convert where the checkpoint says the layer was frozen.
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d and f"{name}.weight" in state and f"{name}.num_batches_tracked" not in state:
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, frozen)


def _freeze_backbone(model: nn.Module, trainable_layers: int) -> None:
    # Same layers frozen as torchvision's builders freeze for weights=... (is_trained).
    body = model.backbone.body
    if hasattr(body, "layer4"):  # ResNet
        layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            layers.append("bn1")
        for pname, p in body.named_parameters():
            if not any(pname.startswith(layer) for layer in layers):
                p.requires_grad_(False)
    else:  # MobileNetV3 features
        blocks = list(body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        freeze_before = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        for b in blocks[:freeze_before]:
            b.requires_grad_(False)


def _replace_class_layers(heads: nn.Module, num_classes: int, agnostic_bbox: bool, agnostic_mask: bool) -> List[str]:
    # Only what depends on num_classes is replaced. A box regression / mask layer the caller wants
    # class-agnostic is left to make_heads_class_agnostic: kept if it already is (what it learned
    # transfers to the new classes), else replaced once, by the 4-output / 1-channel layer.
    replaced: List[str] = []
    pred = heads.box_predictor
    old_classes = pred.cls_score.out_features
    if agnostic_bbox:
        pred.cls_score = nn.Linear(pred.cls_score.in_features, num_classes)
        agnostic = is_class_agnostic(pred.bbox_pred.out_features, old_classes, BOX_OUTPUTS)
        kept = "; class-agnostic bbox_pred kept" if agnostic else ""
        replaced.append(f"roi_heads.box_predictor.cls_score ({old_classes} -> {num_classes} classes{kept})")
    else:
        heads.box_predictor = FastRCNNPredictor(pred.cls_score.in_features, num_classes)
        replaced.append(f"roi_heads.box_predictor ({old_classes} -> {num_classes} classes)")
    if heads.mask_predictor is not None and not agnostic_mask:
        # The pretrained class-agnostic upsampling (conv5_mask) is kept.
        old = heads.mask_predictor.mask_fcn_logits
        heads.mask_predictor.mask_fcn_logits = new_mask_logits(old.in_channels, num_classes)
        replaced.append(
            f"roi_heads.mask_predictor.mask_fcn_logits ({old.out_channels} -> {num_classes} classes; "
            "mask_predictor.conv5_mask kept)"
        )
    return replaced


def replace_predictors(
    model: nn.Module,
    num_classes: Optional[int],
    num_keypoints: Optional[int] = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
) -> List[str]:
    """Replace the layers that depend on the class (keypoint) count; returns what was replaced, one line
    per layer: ``"roi_heads.box_predictor (91 -> 5 classes)"``, ``"roi_heads.keypoint_predictor (17 -> 4
    keypoints)"``; [] when every count already matches.

    ``class_agnostic_bbox`` / ``class_agnostic_mask``: then make the box regression / mask logits
    class-agnostic (:func:`tv_lossfix.make_class_agnostic`), re-initialising a class-specific layer;
    only tv_lossfix's heads (:func:`tv_lossfix.patch_model`) run class-agnostic predictors.
    """
    heads = model.roi_heads
    replaced: List[str] = []
    if num_classes is not None and num_classes != heads.box_predictor.cls_score.out_features:
        replaced += _replace_class_layers(heads, num_classes, class_agnostic_bbox, class_agnostic_mask)
    if num_keypoints is not None and heads.keypoint_predictor is not None:
        old = heads.keypoint_predictor.kps_score_lowres
        if num_keypoints != old.out_channels:
            heads.keypoint_predictor = KeypointRCNNPredictor(old.in_channels, num_keypoints)
            replaced.append(f"roi_heads.keypoint_predictor ({old.out_channels} -> {num_keypoints} keypoints)")
    return replaced + make_heads_class_agnostic(heads, class_agnostic_bbox, class_agnostic_mask)


def _follow_agnostic_checkpoint(
    model: nn.Module, state: Dict[str, torch.Tensor], path: Any, asked: Tuple[bool, bool]
) -> None:
    """Shape the model's box / mask layers like a class-agnostic checkpoint's before loading it;
    refused when the caller did not ask for class-agnostic layers (the flag would be contradicted)."""
    found = state_class_agnostic(state)
    flag = contradicted_flag(found, asked)
    if flag is not None:
        layer = "bbox_pred" if flag == "class_agnostic_bbox" else "mask_fcn_logits"
        classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
        raise CheckpointError(
            f"{os.fspath(path)} has a class-agnostic {layer} (one slot for {classes} classes): "
            f"pass {flag}=True to load it"
        )
    make_heads_class_agnostic(model.roi_heads, *found)


def _check_class_agnostic(name: str, model_cls: type, agnostic_bbox: Any, agnostic_mask: Any) -> None:
    for flag, value in (("class_agnostic_bbox", agnostic_bbox), ("class_agnostic_mask", agnostic_mask)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}() {flag} must be True or False, got {value!r}")
    if agnostic_mask and model_cls is not tvdet.MaskRCNN:
        raise TypeError(f"{name}() got class_agnostic_mask=True but a {model_cls.__name__} has no mask branch")


def _log_replaced(name: str, lines: List[str]) -> None:
    # Layers re-initialised on top of loaded weights: said, never silent (references/ prints them too).
    for line in lines:
        _LOG.info("%s: re-initialised %s", name, line)


@dataclasses.dataclass
class CheckpointModel:
    """What :func:`load_checkpoint_model` read: the model as the checkpoint trained it, its
    ``model_settings`` ({} without), the keys loaded only once the model is patched (a long-tail
    classifier's layers, a loss's statistics) and one line per setting applied from the checkpoint."""

    model: nn.Module
    settings: Dict[str, Any]
    extra_state: Dict[str, torch.Tensor]
    lines: List[str]


def load_checkpoint_model(
    path: Any,
    name: str,
    make: Callable[[int, Dict[str, torch.Tensor], Dict[str, Any]], nn.Module],
    kwargs: Dict[str, Any],
    agnostic: Tuple[bool, bool] = (False, False),
) -> CheckpointModel:
    """The one reader of a ``weights`` checkpoint file: the model it holds, loaded.

    ``make(num_classes, state, build_kwargs)`` builds the untrained architecture ``name`` at the
    checkpoint's class count (``build_kwargs``: ``kwargs`` plus the checkpoint's anchors as an
    ``rpn_anchor_generator`` when ``kwargs`` has none). Its box / mask layers follow a class-agnostic
    checkpoint, refused where ``agnostic`` (bbox, mask) does not ask for it; its ``model_settings``
    are applied (a keyword in ``kwargs`` wins, named in ``lines``). Errors are
    :class:`~tv_lossfix.checkpoint.CheckpointError` naming the file.
    """
    state, settings = read_weights_checkpoint(path)
    state, extra_state = split_extra_state(state)
    num_classes = _shape_of(state, "roi_heads.box_predictor.cls_score.weight", path, name)[0]
    model = make(num_classes, state, checkpoint_build_kwargs(settings, kwargs, state, path))
    _match_norm_layers(model, state)
    _follow_agnostic_checkpoint(model, state, path, agnostic)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{os.fspath(path)} does not match {name}: {e}") from None
    # The model the checkpoint trained: its anchors, sizes and thresholds; a given kwarg wins, named.
    lines = apply_model_settings(model, settings, explicit_settings(kwargs)) if settings else []
    return CheckpointModel(model, settings, extra_state, lines)


def _from_checkpoint(
    arch: "_Arch", weights: Any, kwargs: Dict[str, Any], loss_cfg: Any, agnostic: Tuple[bool, bool]
) -> Tuple[CheckpointModel, LossConfig]:
    """:func:`load_checkpoint_model` for a torchvision architecture, and the loss config to patch it with
    (the checkpoint's when ``loss_cfg`` is None; a given one that differs is named in a warning)."""
    tv_builder: Callable[..., nn.Module] = getattr(tvdet, arch.name)

    def make(num_classes: int, state: Dict[str, torch.Tensor], build_kwargs: Dict[str, Any]) -> nn.Module:
        extra = {}
        if "mobilenet" in arch.name and "rpn_anchor_generator" not in kwargs:
            # torchvision's MobileNet builders make their own AnchorGenerator: the checkpoint's anchors
            # are set after building, with its other settings.
            build_kwargs = {k: v for k, v in build_kwargs.items() if k != "rpn_anchor_generator"}
        if arch.model_cls is tvdet.KeypointRCNN:
            key = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
            extra["num_keypoints"] = _shape_of(state, key, weights, arch.name)[1]
        # Nothing is downloaded (no weights, no backbone weights): torchvision's progress flag is moot.
        return tv_builder(weights=None, num_classes=num_classes, weights_backbone=None, **extra, **build_kwargs)

    loaded = load_checkpoint_model(weights, arch.name, make, kwargs, agnostic)
    cfg = LossConfig.coerce(loss_cfg)
    cfg_lines: List[str] = []
    if loaded.settings:
        cfg, cfg_lines = restored_loss_cfg(loaded.settings, loss_cfg, cfg, kwargs)
    warn_conflicts(loaded.lines + cfg_lines)  # called by _build, called by the public builder
    return loaded, cfg


@dataclasses.dataclass(frozen=True)
class _Arch:
    """What differs between the builders besides their signature's defaults."""

    name: str  # torchvision's builder of that name builds the model
    model_cls: type
    max_trainable: int  # backbone stages torchvision lets train


_ARCHS = {
    a.name: a
    for a in (
        _Arch("maskrcnn_resnet50_fpn", tvdet.MaskRCNN, 5),
        _Arch("maskrcnn_resnet50_fpn_v2", tvdet.MaskRCNN, 5),
        _Arch("fasterrcnn_resnet50_fpn", tvdet.FasterRCNN, 5),
        _Arch("fasterrcnn_resnet50_fpn_v2", tvdet.FasterRCNN, 5),
        _Arch("fasterrcnn_mobilenet_v3_large_fpn", tvdet.FasterRCNN, 6),
        _Arch("fasterrcnn_mobilenet_v3_large_320_fpn", tvdet.FasterRCNN, 6),
        _Arch("keypointrcnn_resnet50_fpn", tvdet.KeypointRCNN, 5),
    )
}


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What a builder did beyond loading: the layers it replaced or re-initialised (one line each, as
    :func:`replace_predictors` returns them) and the ``model_settings`` of a ``weights`` checkpoint
    ({} for torchvision weights, no weights, or a checkpoint without them), read once, by the builder."""

    replaced: Tuple[str, ...] = ()
    checkpoint_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _build(
    *,
    arch: _Arch,
    weights: Any,
    progress: bool,
    num_classes: Optional[int],
    weights_backbone: Any,
    trainable_backbone_layers: Optional[int],
    loss_cfg: Any,
    kwargs: Dict[str, Any],
    num_keypoints: Optional[int] = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
) -> Tuple[nn.Module, BuildReport]:
    name = arch.name
    _check_kwargs(name, arch.model_cls, kwargs)
    _check_class_agnostic(name, arch.model_cls, class_agnostic_bbox, class_agnostic_mask)
    cfg = LossConfig.coerce(loss_cfg)  # fail on a bad config before building anything
    check_builder_kwargs(cfg, kwargs)
    tv_builder: Callable[..., nn.Module] = getattr(tvdet, name)
    extra = {"num_keypoints": None} if arch.model_cls is tvdet.KeypointRCNN else {}
    agnostic = (class_agnostic_bbox, class_agnostic_mask)
    predictor_args = (num_classes, num_keypoints, class_agnostic_bbox, class_agnostic_mask)
    settings: Dict[str, Any] = {}
    extra_state: Dict[str, torch.Tensor] = {}

    if is_checkpoint_path(weights):
        loaded, cfg = _from_checkpoint(arch, weights, kwargs, loss_cfg, agnostic)
        model, settings, extra_state = loaded.model, loaded.settings, loaded.extra_state
        _freeze_backbone(model, _validate_trainable_layers(True, trainable_backbone_layers, arch.max_trainable, 3))
        replaced = replace_predictors(model, *predictor_args)
        _log_replaced(name, replaced)
    else:
        # torchvision loads pretrained weights at their own class count; the predictors are replaced after.
        pretrained = weights is not None
        if extra and not pretrained:
            extra["num_keypoints"] = num_keypoints
        model = tv_builder(
            weights=weights,
            progress=progress,
            num_classes=None if pretrained else num_classes,
            weights_backbone=weights_backbone,
            trainable_backbone_layers=trainable_backbone_layers,
            **extra,
            **kwargs,
        )
        if pretrained:
            replaced = replace_predictors(model, *predictor_args)
            _log_replaced(name, replaced)
        else:  # new layers anyway: made class-agnostic and reported, not logged (no trained weights lost)
            replaced = make_heads_class_agnostic(model.roi_heads, class_agnostic_bbox, class_agnostic_mask)
    model, lines = patch_loaded(model, cfg, extra_state, os.fspath(weights) if extra_state else "")
    return model, BuildReport(tuple(replaced) + tuple(lines), settings)


def patch_loaded(
    model: nn.Module, cfg: LossConfig, extra_state: Dict[str, torch.Tensor], where: str
) -> Tuple[nn.Module, List[str]]:
    """:func:`patch_model` after giving the box predictor the layers ``cfg`` asks for (Seesaw's object
    logit, the cosine classifier), then the checkpoint keys that needed them (``extra_state`` of
    :func:`load_checkpoint_model`; ``where`` names the file). Returns the model and one line per layer
    added or loaded."""
    lines = prepare_classifier(model.roi_heads, cfg.roi_head)
    model = patch_model(model, cfg)
    if extra_state:
        lines += load_extra_state(model, extra_state, where)
        if any(k.startswith("roi_heads.box_predictor.cls_objectness.") for k in model.state_dict() if k in extra_state):
            lines = [line for line in lines if "cls_objectness (new" not in line]  # the trained one was loaded
    return model, lines


def build_with_report(name: str, **kwargs: Any) -> Tuple[nn.Module, BuildReport]:
    """``BUILDERS[name](**kwargs)`` and its :class:`BuildReport`: what it replaced, and the checkpoint's
    ``model_settings`` (class names...) without reading the checkpoint a second time."""
    if name not in _ARCHS:
        raise ValueError(f"no tv_lossfix builder {name!r}{did_you_mean(name, _ARCHS)}")
    # The public builder's signature gives the defaults (weights_backbone differs between builders).
    bound = inspect.signature(BUILDERS[name]).bind(**kwargs)
    bound.apply_defaults()
    return _build(arch=_ARCHS[name], **bound.arguments)


def maskrcnn_resnet50_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = ResNet50_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
    **kwargs: Any,
) -> tvdet.MaskRCNN:
    """Mask R-CNN, ResNet-50-FPN backbone, with configurable losses.

    The arguments of ``torchvision.models.detection.maskrcnn_resnet50_fpn``, plus ``loss_cfg``
    and the class-agnostic switches; ``rpn`` and ``roi_heads`` are tv_lossfix's (:func:`tv_lossfix.patch_model`).
    With ``loss_cfg=None`` the model is torchvision's exactly: the same parameters, ``state_dict`` keys,
    losses and detections.

    Args:
        weights: pretrained weights, as for torchvision (a member of
            ``MaskRCNN_ResNet50_FPN_Weights``, ``"DEFAULT"`` or a name), or the path of a local
            checkpoint of the same architecture (a ``state_dict``, or a training checkpoint with it
            under ``"model"``; one written by references/train.py also restores its anchors, sizes,
            thresholds and loss config). Default: None.
        progress: show a download progress bar. Default: True.
        num_classes: number of classes including background. With ``weights``, a different value keeps
            the pretrained body and replaces the box predictor and the mask logits layer (torchvision raises
            instead). Default: None (the weights' own, else 91).
        weights_backbone: pretrained backbone weights, as for torchvision. Default:
            ``ResNet50_Weights.IMAGENET1K_V1``.
        trainable_backbone_layers: backbone stages left trainable (0 to 5); with pretrained weights
            or a checkpoint the default is 3, otherwise all.
        loss_cfg: the losses: a :class:`tv_lossfix.LossConfig`, a dict of its keys, a preset name
            (``"torchvision"``, ``"mmdetection"``, ``"positive"``) or a YAML path. It changes only the
            training losses and the RoI / anchor sampling: the RPN objectness loss (``bce`` or ``focal``)
            and box loss (``smooth_l1``, ``l1``, ``giou``...), the RoI classifier loss (``ce``,
            ``focal``, ``sigmoid``, ``federated``, ``seesaw``, ``eqlv2`` or a registered one) and box
            loss, each term's weight and normaliser, ``class_weight``, and the assigner / sampler keys
            (IoU thresholds, sample count, positive fraction, OHEM); the long-tail classifiers also set
            the inference scores and Seesaw adds one classifier output. Default: None, torchvision's
            losses.
        class_agnostic_bbox: one box regression (4 outputs) shared by every class instead of one per
            class (MMDetection ``reg_class_agnostic``, Detectron2 ``CLS_AGNOSTIC_BBOX_REG``). Over
            class-specific ``weights`` the pretrained ``box_predictor.bbox_pred`` is re-initialised
            (logged at INFO); a class-agnostic checkpoint needs True. Default: False.
        class_agnostic_mask: one mask channel shared by every class (MMDetection ``class_agnostic``,
            Detectron2 ``CLS_AGNOSTIC_MASK``). Over class-specific ``weights`` the pretrained
            ``mask_predictor.mask_fcn_logits`` is re-initialised (``conv5_mask`` kept). Default: False.
        **kwargs: the parameters of ``torchvision.models.detection.MaskRCNN`` (``min_size``,
            ``box_score_thresh``, ``rpn_batch_size_per_image``...). Unknown names raise TypeError
            (torchvision ignores them).

    Returns:
        A ``torchvision.models.detection.MaskRCNN`` whose ``rpn`` and ``roi_heads`` are tv_lossfix's.

    Example::

        >>> import tv_lossfix
        >>> model = tv_lossfix.maskrcnn_resnet50_fpn(
        ...     weights="DEFAULT", num_classes=5, loss_cfg={"roi_head": {"cls_loss": "focal"}}
        ... )
        >>> losses = model(images, targets)  # training: the same keys as torchvision's (loss_mask too)
    """
    model, _ = _build(
        arch=_ARCHS["maskrcnn_resnet50_fpn"],
        weights=weights,
        progress=progress,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        loss_cfg=loss_cfg,
        kwargs=kwargs,
        class_agnostic_bbox=class_agnostic_bbox,
        class_agnostic_mask=class_agnostic_mask,
    )
    return model


def maskrcnn_resnet50_fpn_v2(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
    **kwargs: Any,
) -> tvdet.MaskRCNN:
    """Mask R-CNN v2 (improved recipe, arXiv:2111.11429), with configurable losses.

    The arguments of ``torchvision.models.detection.maskrcnn_resnet50_fpn_v2``, plus ``loss_cfg``
    and the class-agnostic switches; ``rpn`` and ``roi_heads`` are tv_lossfix's (:func:`tv_lossfix.patch_model`).
    With ``loss_cfg=None`` the model is torchvision's exactly: the same parameters, ``state_dict`` keys,
    losses and detections.

    Args:
        weights: pretrained weights, as for torchvision (a member of
            ``MaskRCNN_ResNet50_FPN_V2_Weights``, ``"DEFAULT"`` or a name), or the path of a local
            checkpoint of the same architecture (a ``state_dict``, or a training checkpoint with it
            under ``"model"``; one written by references/train.py also restores its anchors, sizes,
            thresholds and loss config). Default: None.
        progress: show a download progress bar. Default: True.
        num_classes: number of classes including background. With ``weights``, a different value keeps
            the pretrained body and replaces the box predictor and the mask logits layer (torchvision raises
            instead). Default: None (the weights' own, else 91).
        weights_backbone: pretrained backbone weights, as for torchvision. Default:
            None.
        trainable_backbone_layers: backbone stages left trainable (0 to 5); with pretrained weights
            or a checkpoint the default is 3, otherwise all.
        loss_cfg: the losses: a :class:`tv_lossfix.LossConfig`, a dict of its keys, a preset name
            (``"torchvision"``, ``"mmdetection"``, ``"positive"``) or a YAML path. It changes only the
            training losses and the RoI / anchor sampling: the RPN objectness loss (``bce`` or ``focal``)
            and box loss (``smooth_l1``, ``l1``, ``giou``...), the RoI classifier loss (``ce``,
            ``focal``, ``sigmoid``, ``federated``, ``seesaw``, ``eqlv2`` or a registered one) and box
            loss, each term's weight and normaliser, ``class_weight``, and the assigner / sampler keys
            (IoU thresholds, sample count, positive fraction, OHEM); the long-tail classifiers also set
            the inference scores and Seesaw adds one classifier output. Default: None, torchvision's
            losses.
        class_agnostic_bbox: one box regression (4 outputs) shared by every class instead of one per
            class (MMDetection ``reg_class_agnostic``, Detectron2 ``CLS_AGNOSTIC_BBOX_REG``). Over
            class-specific ``weights`` the pretrained ``box_predictor.bbox_pred`` is re-initialised
            (logged at INFO); a class-agnostic checkpoint needs True. Default: False.
        class_agnostic_mask: one mask channel shared by every class (MMDetection ``class_agnostic``,
            Detectron2 ``CLS_AGNOSTIC_MASK``). Over class-specific ``weights`` the pretrained
            ``mask_predictor.mask_fcn_logits`` is re-initialised (``conv5_mask`` kept). Default: False.
        **kwargs: the parameters of ``torchvision.models.detection.MaskRCNN`` (``min_size``,
            ``box_score_thresh``, ``rpn_batch_size_per_image``...). Unknown names raise TypeError
            (torchvision ignores them).

    Returns:
        A ``torchvision.models.detection.MaskRCNN`` whose ``rpn`` and ``roi_heads`` are tv_lossfix's.

    Example::

        >>> import tv_lossfix
        >>> model = tv_lossfix.maskrcnn_resnet50_fpn_v2(
        ...     weights="DEFAULT", num_classes=5, loss_cfg={"roi_head": {"cls_loss": "focal"}}
        ... )
        >>> losses = model(images, targets)  # training: the same keys as torchvision's (loss_mask too)
    """
    model, _ = _build(
        arch=_ARCHS["maskrcnn_resnet50_fpn_v2"],
        weights=weights,
        progress=progress,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        loss_cfg=loss_cfg,
        kwargs=kwargs,
        class_agnostic_bbox=class_agnostic_bbox,
        class_agnostic_mask=class_agnostic_mask,
    )
    return model


def fasterrcnn_resnet50_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = ResNet50_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
    **kwargs: Any,
) -> tvdet.FasterRCNN:
    """Faster R-CNN, ResNet-50-FPN backbone, with configurable losses.

    The arguments of ``torchvision.models.detection.fasterrcnn_resnet50_fpn``, plus ``loss_cfg``
    and the class-agnostic switches; ``rpn`` and ``roi_heads`` are tv_lossfix's (:func:`tv_lossfix.patch_model`).
    With ``loss_cfg=None`` the model is torchvision's exactly: the same parameters, ``state_dict`` keys,
    losses and detections.

    Args:
        weights: pretrained weights, as for torchvision (a member of
            ``FasterRCNN_ResNet50_FPN_Weights``, ``"DEFAULT"`` or a name), or the path of a local
            checkpoint of the same architecture (a ``state_dict``, or a training checkpoint with it
            under ``"model"``; one written by references/train.py also restores its anchors, sizes,
            thresholds and loss config). Default: None.
        progress: show a download progress bar. Default: True.
        num_classes: number of classes including background. With ``weights``, a different value keeps
            the pretrained body and replaces the box predictor (torchvision raises instead). Default:
            None (the weights' own, else 91).
        weights_backbone: pretrained backbone weights, as for torchvision. Default:
            ``ResNet50_Weights.IMAGENET1K_V1``.
        trainable_backbone_layers: backbone stages left trainable (0 to 5); with pretrained weights
            or a checkpoint the default is 3, otherwise all.
        loss_cfg: the losses: a :class:`tv_lossfix.LossConfig`, a dict of its keys, a preset name
            (``"torchvision"``, ``"mmdetection"``, ``"positive"``) or a YAML path. It changes only the
            training losses and the RoI / anchor sampling: the RPN objectness loss (``bce`` or ``focal``)
            and box loss (``smooth_l1``, ``l1``, ``giou``...), the RoI classifier loss (``ce``,
            ``focal``, ``sigmoid``, ``federated``, ``seesaw``, ``eqlv2`` or a registered one) and box
            loss, each term's weight and normaliser, ``class_weight``, and the assigner / sampler keys
            (IoU thresholds, sample count, positive fraction, OHEM); the long-tail classifiers also set
            the inference scores and Seesaw adds one classifier output. Default: None, torchvision's
            losses.
        class_agnostic_bbox: one box regression (4 outputs) shared by every class instead of one per
            class (MMDetection ``reg_class_agnostic``, Detectron2 ``CLS_AGNOSTIC_BBOX_REG``). Over
            class-specific ``weights`` the pretrained ``box_predictor.bbox_pred`` is re-initialised
            (logged at INFO); a class-agnostic checkpoint needs True. Default: False.
        class_agnostic_mask: True raises TypeError: a FasterRCNN has no mask branch. Default: False.
        **kwargs: the parameters of ``torchvision.models.detection.FasterRCNN`` (``min_size``,
            ``box_score_thresh``, ``rpn_batch_size_per_image``...). Unknown names raise TypeError
            (torchvision ignores them).

    Returns:
        A ``torchvision.models.detection.FasterRCNN`` whose ``rpn`` and ``roi_heads`` are tv_lossfix's.

    Example::

        >>> import tv_lossfix
        >>> model = tv_lossfix.fasterrcnn_resnet50_fpn(
        ...     weights="DEFAULT", num_classes=5, loss_cfg={"roi_head": {"cls_loss": "focal"}}
        ... )
        >>> losses = model(images, targets)  # training: the same keys as torchvision's
    """
    model, _ = _build(
        arch=_ARCHS["fasterrcnn_resnet50_fpn"],
        weights=weights,
        progress=progress,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        loss_cfg=loss_cfg,
        kwargs=kwargs,
        class_agnostic_bbox=class_agnostic_bbox,
        class_agnostic_mask=class_agnostic_mask,
    )
    return model


def fasterrcnn_resnet50_fpn_v2(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
    **kwargs: Any,
) -> tvdet.FasterRCNN:
    """Faster R-CNN v2 (improved recipe, arXiv:2111.11429), with configurable losses.

    The arguments of ``torchvision.models.detection.fasterrcnn_resnet50_fpn_v2``, plus ``loss_cfg``
    and the class-agnostic switches; ``rpn`` and ``roi_heads`` are tv_lossfix's (:func:`tv_lossfix.patch_model`).
    With ``loss_cfg=None`` the model is torchvision's exactly: the same parameters, ``state_dict`` keys,
    losses and detections.

    Args:
        weights: pretrained weights, as for torchvision (a member of
            ``FasterRCNN_ResNet50_FPN_V2_Weights``, ``"DEFAULT"`` or a name), or the path of a local
            checkpoint of the same architecture (a ``state_dict``, or a training checkpoint with it
            under ``"model"``; one written by references/train.py also restores its anchors, sizes,
            thresholds and loss config). Default: None.
        progress: show a download progress bar. Default: True.
        num_classes: number of classes including background. With ``weights``, a different value keeps
            the pretrained body and replaces the box predictor (torchvision raises instead). Default:
            None (the weights' own, else 91).
        weights_backbone: pretrained backbone weights, as for torchvision. Default:
            None.
        trainable_backbone_layers: backbone stages left trainable (0 to 5); with pretrained weights
            or a checkpoint the default is 3, otherwise all.
        loss_cfg: the losses: a :class:`tv_lossfix.LossConfig`, a dict of its keys, a preset name
            (``"torchvision"``, ``"mmdetection"``, ``"positive"``) or a YAML path. It changes only the
            training losses and the RoI / anchor sampling: the RPN objectness loss (``bce`` or ``focal``)
            and box loss (``smooth_l1``, ``l1``, ``giou``...), the RoI classifier loss (``ce``,
            ``focal``, ``sigmoid``, ``federated``, ``seesaw``, ``eqlv2`` or a registered one) and box
            loss, each term's weight and normaliser, ``class_weight``, and the assigner / sampler keys
            (IoU thresholds, sample count, positive fraction, OHEM); the long-tail classifiers also set
            the inference scores and Seesaw adds one classifier output. Default: None, torchvision's
            losses.
        class_agnostic_bbox: one box regression (4 outputs) shared by every class instead of one per
            class (MMDetection ``reg_class_agnostic``, Detectron2 ``CLS_AGNOSTIC_BBOX_REG``). Over
            class-specific ``weights`` the pretrained ``box_predictor.bbox_pred`` is re-initialised
            (logged at INFO); a class-agnostic checkpoint needs True. Default: False.
        class_agnostic_mask: True raises TypeError: a FasterRCNN has no mask branch. Default: False.
        **kwargs: the parameters of ``torchvision.models.detection.FasterRCNN`` (``min_size``,
            ``box_score_thresh``, ``rpn_batch_size_per_image``...). Unknown names raise TypeError
            (torchvision ignores them).

    Returns:
        A ``torchvision.models.detection.FasterRCNN`` whose ``rpn`` and ``roi_heads`` are tv_lossfix's.

    Example::

        >>> import tv_lossfix
        >>> model = tv_lossfix.fasterrcnn_resnet50_fpn_v2(
        ...     weights="DEFAULT", num_classes=5, loss_cfg={"roi_head": {"cls_loss": "focal"}}
        ... )
        >>> losses = model(images, targets)  # training: the same keys as torchvision's
    """
    model, _ = _build(
        arch=_ARCHS["fasterrcnn_resnet50_fpn_v2"],
        weights=weights,
        progress=progress,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        loss_cfg=loss_cfg,
        kwargs=kwargs,
        class_agnostic_bbox=class_agnostic_bbox,
        class_agnostic_mask=class_agnostic_mask,
    )
    return model


def fasterrcnn_mobilenet_v3_large_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
    **kwargs: Any,
) -> tvdet.FasterRCNN:
    """Faster R-CNN, MobileNetV3-Large FPN backbone, with configurable losses.

    The arguments of ``torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn``, plus ``loss_cfg``
    and the class-agnostic switches; ``rpn`` and ``roi_heads`` are tv_lossfix's (:func:`tv_lossfix.patch_model`).
    With ``loss_cfg=None`` the model is torchvision's exactly: the same parameters, ``state_dict`` keys,
    losses and detections.

    Args:
        weights: pretrained weights, as for torchvision (a member of
            ``FasterRCNN_MobileNet_V3_Large_FPN_Weights``, ``"DEFAULT"`` or a name), or the path of a local
            checkpoint of the same architecture (a ``state_dict``, or a training checkpoint with it
            under ``"model"``; one written by references/train.py also restores its anchors, sizes,
            thresholds and loss config). Default: None.
        progress: show a download progress bar. Default: True.
        num_classes: number of classes including background. With ``weights``, a different value keeps
            the pretrained body and replaces the box predictor (torchvision raises instead). Default:
            None (the weights' own, else 91).
        weights_backbone: pretrained backbone weights, as for torchvision. Default:
            ``MobileNet_V3_Large_Weights.IMAGENET1K_V1``.
        trainable_backbone_layers: backbone stages left trainable (0 to 6); with pretrained weights
            or a checkpoint the default is 3, otherwise all.
        loss_cfg: the losses: a :class:`tv_lossfix.LossConfig`, a dict of its keys, a preset name
            (``"torchvision"``, ``"mmdetection"``, ``"positive"``) or a YAML path. It changes only the
            training losses and the RoI / anchor sampling: the RPN objectness loss (``bce`` or ``focal``)
            and box loss (``smooth_l1``, ``l1``, ``giou``...), the RoI classifier loss (``ce``,
            ``focal``, ``sigmoid``, ``federated``, ``seesaw``, ``eqlv2`` or a registered one) and box
            loss, each term's weight and normaliser, ``class_weight``, and the assigner / sampler keys
            (IoU thresholds, sample count, positive fraction, OHEM); the long-tail classifiers also set
            the inference scores and Seesaw adds one classifier output. Default: None, torchvision's
            losses.
        class_agnostic_bbox: one box regression (4 outputs) shared by every class instead of one per
            class (MMDetection ``reg_class_agnostic``, Detectron2 ``CLS_AGNOSTIC_BBOX_REG``). Over
            class-specific ``weights`` the pretrained ``box_predictor.bbox_pred`` is re-initialised
            (logged at INFO); a class-agnostic checkpoint needs True. Default: False.
        class_agnostic_mask: True raises TypeError: a FasterRCNN has no mask branch. Default: False.
        **kwargs: the parameters of ``torchvision.models.detection.FasterRCNN`` (``min_size``,
            ``box_score_thresh``, ``rpn_batch_size_per_image``...). Unknown names raise TypeError
            (torchvision ignores them).

    Returns:
        A ``torchvision.models.detection.FasterRCNN`` whose ``rpn`` and ``roi_heads`` are tv_lossfix's.

    Example::

        >>> import tv_lossfix
        >>> model = tv_lossfix.fasterrcnn_mobilenet_v3_large_fpn(
        ...     weights="DEFAULT", num_classes=5, loss_cfg={"roi_head": {"cls_loss": "focal"}}
        ... )
        >>> losses = model(images, targets)  # training: the same keys as torchvision's
    """
    model, _ = _build(
        arch=_ARCHS["fasterrcnn_mobilenet_v3_large_fpn"],
        weights=weights,
        progress=progress,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        loss_cfg=loss_cfg,
        kwargs=kwargs,
        class_agnostic_bbox=class_agnostic_bbox,
        class_agnostic_mask=class_agnostic_mask,
    )
    return model


def fasterrcnn_mobilenet_v3_large_320_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
    **kwargs: Any,
) -> tvdet.FasterRCNN:
    """Faster R-CNN, MobileNetV3-Large FPN tuned for 320px mobile inputs, with configurable losses.

    The arguments of ``torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn``, plus ``loss_cfg``
    and the class-agnostic switches; ``rpn`` and ``roi_heads`` are tv_lossfix's (:func:`tv_lossfix.patch_model`).
    With ``loss_cfg=None`` the model is torchvision's exactly: the same parameters, ``state_dict`` keys,
    losses and detections.

    Args:
        weights: pretrained weights, as for torchvision (a member of
            ``FasterRCNN_MobileNet_V3_Large_320_FPN_Weights``, ``"DEFAULT"`` or a name), or the path of a local
            checkpoint of the same architecture (a ``state_dict``, or a training checkpoint with it
            under ``"model"``; one written by references/train.py also restores its anchors, sizes,
            thresholds and loss config). Default: None.
        progress: show a download progress bar. Default: True.
        num_classes: number of classes including background. With ``weights``, a different value keeps
            the pretrained body and replaces the box predictor (torchvision raises instead). Default:
            None (the weights' own, else 91).
        weights_backbone: pretrained backbone weights, as for torchvision. Default:
            ``MobileNet_V3_Large_Weights.IMAGENET1K_V1``.
        trainable_backbone_layers: backbone stages left trainable (0 to 6); with pretrained weights
            or a checkpoint the default is 3, otherwise all.
        loss_cfg: the losses: a :class:`tv_lossfix.LossConfig`, a dict of its keys, a preset name
            (``"torchvision"``, ``"mmdetection"``, ``"positive"``) or a YAML path. It changes only the
            training losses and the RoI / anchor sampling: the RPN objectness loss (``bce`` or ``focal``)
            and box loss (``smooth_l1``, ``l1``, ``giou``...), the RoI classifier loss (``ce``,
            ``focal``, ``sigmoid``, ``federated``, ``seesaw``, ``eqlv2`` or a registered one) and box
            loss, each term's weight and normaliser, ``class_weight``, and the assigner / sampler keys
            (IoU thresholds, sample count, positive fraction, OHEM); the long-tail classifiers also set
            the inference scores and Seesaw adds one classifier output. Default: None, torchvision's
            losses.
        class_agnostic_bbox: one box regression (4 outputs) shared by every class instead of one per
            class (MMDetection ``reg_class_agnostic``, Detectron2 ``CLS_AGNOSTIC_BBOX_REG``). Over
            class-specific ``weights`` the pretrained ``box_predictor.bbox_pred`` is re-initialised
            (logged at INFO); a class-agnostic checkpoint needs True. Default: False.
        class_agnostic_mask: True raises TypeError: a FasterRCNN has no mask branch. Default: False.
        **kwargs: the parameters of ``torchvision.models.detection.FasterRCNN`` (``min_size``,
            ``box_score_thresh``, ``rpn_batch_size_per_image``...). Unknown names raise TypeError
            (torchvision ignores them).

    Returns:
        A ``torchvision.models.detection.FasterRCNN`` whose ``rpn`` and ``roi_heads`` are tv_lossfix's.

    Example::

        >>> import tv_lossfix
        >>> model = tv_lossfix.fasterrcnn_mobilenet_v3_large_320_fpn(
        ...     weights="DEFAULT", num_classes=5, loss_cfg={"roi_head": {"cls_loss": "focal"}}
        ... )
        >>> losses = model(images, targets)  # training: the same keys as torchvision's
    """
    model, _ = _build(
        arch=_ARCHS["fasterrcnn_mobilenet_v3_large_320_fpn"],
        weights=weights,
        progress=progress,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        loss_cfg=loss_cfg,
        kwargs=kwargs,
        class_agnostic_bbox=class_agnostic_bbox,
        class_agnostic_mask=class_agnostic_mask,
    )
    return model


def keypointrcnn_resnet50_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    num_keypoints: Optional[int] = None,
    weights_backbone: Any = ResNet50_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
    **kwargs: Any,
) -> tvdet.KeypointRCNN:
    """Keypoint R-CNN, ResNet-50-FPN backbone, with configurable losses.

    The arguments of ``torchvision.models.detection.keypointrcnn_resnet50_fpn``, plus ``loss_cfg``
    and the class-agnostic switches; ``rpn`` and ``roi_heads`` are tv_lossfix's (:func:`tv_lossfix.patch_model`).
    With ``loss_cfg=None`` the model is torchvision's exactly: the same parameters, ``state_dict`` keys,
    losses and detections.

    Args:
        weights: pretrained weights, as for torchvision (a member of
            ``KeypointRCNN_ResNet50_FPN_Weights``, ``"DEFAULT"`` or a name), or the path of a local
            checkpoint of the same architecture (a ``state_dict``, or a training checkpoint with it
            under ``"model"``; one written by references/train.py also restores its anchors, sizes,
            thresholds and loss config). Default: None.
        progress: show a download progress bar. Default: True.
        num_classes: number of classes including background. With ``weights``, a different value keeps
            the pretrained body and replaces the box predictor (torchvision raises instead). Default:
            None (the weights' own, else 91).
        num_keypoints: keypoints per instance; with ``weights``, a different value replaces the
            keypoint predictor. Default: None (the weights' own, else 17).
        weights_backbone: pretrained backbone weights, as for torchvision. Default:
            ``ResNet50_Weights.IMAGENET1K_V1``.
        trainable_backbone_layers: backbone stages left trainable (0 to 5); with pretrained weights
            or a checkpoint the default is 3, otherwise all.
        loss_cfg: the losses: a :class:`tv_lossfix.LossConfig`, a dict of its keys, a preset name
            (``"torchvision"``, ``"mmdetection"``, ``"positive"``) or a YAML path. It changes only the
            training losses and the RoI / anchor sampling: the RPN objectness loss (``bce`` or ``focal``)
            and box loss (``smooth_l1``, ``l1``, ``giou``...), the RoI classifier loss (``ce``,
            ``focal``, ``sigmoid``, ``federated``, ``seesaw``, ``eqlv2`` or a registered one) and box
            loss, each term's weight and normaliser, ``class_weight``, and the assigner / sampler keys
            (IoU thresholds, sample count, positive fraction, OHEM); the long-tail classifiers also set
            the inference scores and Seesaw adds one classifier output. Default: None, torchvision's
            losses.
        class_agnostic_bbox: one box regression (4 outputs) shared by every class instead of one per
            class (MMDetection ``reg_class_agnostic``, Detectron2 ``CLS_AGNOSTIC_BBOX_REG``). Over
            class-specific ``weights`` the pretrained ``box_predictor.bbox_pred`` is re-initialised
            (logged at INFO); a class-agnostic checkpoint needs True. Default: False.
        class_agnostic_mask: True raises TypeError: a KeypointRCNN has no mask branch. Default: False.
        **kwargs: the parameters of ``torchvision.models.detection.KeypointRCNN`` (``min_size``,
            ``box_score_thresh``, ``rpn_batch_size_per_image``...). Unknown names raise TypeError
            (torchvision ignores them).

    Returns:
        A ``torchvision.models.detection.KeypointRCNN`` whose ``rpn`` and ``roi_heads`` are tv_lossfix's.

    Example::

        >>> import tv_lossfix
        >>> model = tv_lossfix.keypointrcnn_resnet50_fpn(
        ...     weights="DEFAULT", num_classes=5, loss_cfg={"roi_head": {"cls_loss": "focal"}}
        ... )
        >>> losses = model(images, targets)  # training: the same keys as torchvision's (loss_keypoint too)
    """
    model, _ = _build(
        arch=_ARCHS["keypointrcnn_resnet50_fpn"],
        weights=weights,
        progress=progress,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        loss_cfg=loss_cfg,
        kwargs=kwargs,
        num_keypoints=num_keypoints,
        class_agnostic_bbox=class_agnostic_bbox,
        class_agnostic_mask=class_agnostic_mask,
    )
    return model


BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (
        maskrcnn_resnet50_fpn,
        maskrcnn_resnet50_fpn_v2,
        fasterrcnn_resnet50_fpn,
        fasterrcnn_resnet50_fpn_v2,
        fasterrcnn_mobilenet_v3_large_fpn,
        fasterrcnn_mobilenet_v3_large_320_fpn,
        keypointrcnn_resnet50_fpn,
    )
}
