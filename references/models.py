"""Models the training script builds: every tv_lossfix builder, plus a small CPU demo model.

The checks here run before any data is read: a wrong model name, weights name, an offline
``--weights DEFAULT`` or wrong anchors each end the run in one line.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import detection as tvdet
from torchvision.models import get_model_weights
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

import tv_lossfix
from tv_lossfix._suggest import did_you_mean
from tv_lossfix.builders import (
    BuildReport,
    build_with_report,
    is_checkpoint_path,
    load_checkpoint_model,
    load_checkpoint_state,
    patch_loaded,
    replace_predictors,
)
from tv_lossfix.checkpoint import CheckpointError, check_checkpoint_file, model_state_dict, read_checkpoint
from tv_lossfix.class_agnostic import contradicted_flag, state_class_agnostic
from tv_lossfix.classifiers import prepare_classifier
from tv_lossfix.model_settings import ModelSettingsWarning
from tv_lossfix.sampling import check_builder_kwargs

from train_config import check_class_agnostic
from training_checkpoint import checkpoint_model_name


class ModelError(ValueError):
    """A model, weights or anchor setting that cannot be used."""


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def maskrcnn_tiny(num_classes: int, image_size: int = 128, **kwargs: Any) -> tvdet.MaskRCNN:
    """A stock torchvision ``MaskRCNN`` scaled for CPU: 4-stage conv backbone (stride 4..32)
    with a 64-channel FPN, a 256-d box head and a 2-conv mask head. Same heads, sampling and
    losses as the ResNet-50 model, about 100x fewer FLOPs. A keyword ``MaskRCNN`` does not take is a
    ModelError (its constructor would pass it to the transform, which drops it silently)."""
    from tv_lossfix.builders import _check_kwargs

    try:
        _check_kwargs("maskrcnn_tiny", tvdet.MaskRCNN, kwargs)
    except TypeError as e:
        raise ModelError(f"model.kwargs: {e}") from None
    body = nn.Sequential(
        OrderedDict(
            [
                ("stem", _stage(3, 32)),
                ("c2", _stage(32, 32)),
                ("c3", _stage(32, 64)),
                ("c4", _stage(64, 128)),
            ]
        )
    )
    backbone = BackboneWithFPN(body, {"c2": "0", "c3": "1", "c4": "2"}, [32, 64, 128], 64)
    levels = ["0", "1", "2"]
    defaults: Dict[str, Any] = dict(
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=AnchorGenerator(((12,), (24,), (48,), (96,)), ((0.5, 1.0, 2.0),) * 4),
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(64 * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(64, [64, 64], 1),
        mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
        box_batch_size_per_image=128,  # roi_align backward dominates a CPU step; 128 keeps it small
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300,
    )
    defaults.update(kwargs)
    return tvdet.MaskRCNN(backbone, num_classes=None, **defaults)


EXTRA_MODELS = {"maskrcnn_tiny": maskrcnn_tiny}
MODEL_NAMES = sorted(tv_lossfix.BUILDERS) + sorted(EXTRA_MODELS)


# -- checks before any data is read ---------------------------------------------------------------
def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ModelError(
            f"--model {name!r} is not a two-stage model we build{did_you_mean(name, MODEL_NAMES)} "
            f"(choose from {', '.join(MODEL_NAMES)})"
        )


def resolve_weights(name: str, weights: Optional[str], flag: str = "--weights"):
    """The torchvision weights enum member ``weights`` names for model ``name`` (None for none / a path)."""
    if weights is None or is_checkpoint_path(weights):
        return None
    if name in EXTRA_MODELS:
        raise ModelError(
            f"{flag} {weights!r}: {name} has no pretrained weights; pass a checkpoint path to fine-tune it"
        )
    enum = get_model_weights(getattr(tvdet, name)) if flag == "--weights" else _backbone_enum(name)
    key = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
    if key == "DEFAULT":
        return enum.DEFAULT
    if key not in enum.__members__:
        valid = ["DEFAULT"] + [f"{enum.__name__}.{m}" for m in enum.__members__]
        raise ModelError(
            f"{flag} {weights!r} is not a weights name of {name}: valid are {', '.join(valid)}, "
            f"or the path of a local checkpoint"
        )
    return enum[key]


def _backbone_enum(name: str):
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights

    return MobileNet_V3_Large_Weights if "mobilenet" in name else ResNet50_Weights


def ensure_weights_file(member, flag: str = "--weights") -> None:
    """Fetch pretrained weights into torch's hub cache now (once), so an offline machine fails here, in one line."""
    if member is None:
        return
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(member.url).path))
    if os.path.isfile(cached):
        return
    try:
        torch.hub.load_state_dict_from_url(member.url, progress=True, check_hash=True)
    except Exception as e:  # URLError, socket errors, hash mismatch
        raise ModelError(
            f"{flag} {member}: could not download {member.url} ({type(e).__name__}: {str(e).splitlines()[0][:80]}). "
            f"torchvision looks for it at {cached}: copy the file there, or pass a local checkpoint path to {flag}"
        ) from None


def check_weights_path(weights: Optional[str]) -> None:
    """A --weights path that is no file: tv_lossfix's one check (CheckpointError, CheckpointNotFoundError)."""
    if weights and is_checkpoint_path(weights):
        check_checkpoint_file(weights, "--weights")


def check_weights_model(name: str, weights: Optional[str]) -> None:
    """A --weights checkpoint of another model fails here, before the data pass: by the model name its
    config records, else (a bare state_dict) by its keys against ``name`` built on the meta device."""
    if not weights or not is_checkpoint_path(weights):
        return
    ckpt = read_checkpoint(weights, "--weights")
    saved = checkpoint_model_name(ckpt) if isinstance(ckpt, dict) else None
    if saved is not None and saved != name:
        raise ModelError(f"--weights {weights} holds a {saved} model, not --model {name}")
    if saved is not None:
        return
    state = model_state_dict(ckpt, weights, "--weights")
    expected = _meta_model(name).state_dict()  # only the key names are wanted
    drop = ("num_batches_tracked",)  # BatchNorm2d has it, FrozenBatchNorm2d (pretrained bodies) not
    have = {k for k in state if not k.endswith(drop)}
    want = {k for k in expected if not k.endswith(drop)}
    if have != want:
        odd = (sorted(have - want) or sorted(want - have))[0]
        raise ModelError(
            f"--weights {weights} is not a {name} state_dict: {len(have & want)} of its {len(have)} keys are "
            f"{name}'s ({odd!r} is {'not' if odd in have else 'missing'})"
        )


# -- model.kwargs and the sampler, on the model built on the meta device ------------------------------
def _kwarg_defaults(model_cls: type) -> Dict[str, Any]:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    out: Dict[str, Any] = {}
    for fn in (GeneralizedRCNNTransform.__init__, model_cls.__init__):
        out.update({n: p.default for n, p in inspect.signature(fn).parameters.items()})
    return out


def _number_ok(key: str, value: Any, default: Any) -> bool:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if key == "min_size":  # torchvision takes one size or a tuple to draw from
        return number(value) or (isinstance(value, (list, tuple)) and bool(value) and all(map(number, value)))
    return not number(default) or value is None and default is None or number(value)


def _kwarg_range(key: str):
    """The range of torchvision's numeric builder keywords, by their naming: thresholds, fractions, sizes
    and counts (a box_score_thresh of 5 or a min_size of 0 would build, and then detect nothing)."""
    if key.endswith("_thresh"):
        return (lambda v: 0 <= v <= 1), "in [0, 1]"
    if key.endswith("_fraction"):
        return (lambda v: 0 < v <= 1), "in (0, 1]"
    sizes = ("min_size", "max_size", "image_size")
    if key in sizes or key.endswith(("_per_img", "_per_image")) or "_top_n_" in key:
        return (lambda v: v >= 1), ">= 1"
    return None


def check_model_kwargs(name: str, kwargs: Dict[str, Any], loss_cfg: Any = None, stock: bool = False) -> None:
    """model.kwargs and the loss config's sampler before any data is read, in one line each: a keyword
    the builder does not take (torchvision's silently drop it), a number given as another type, a
    value the model's constructor refuses, and sampler settings the model's own values make void."""
    from tv_lossfix.builders import _ARCHS, _check_kwargs
    from tv_lossfix.sampling import check_sampling

    if name not in MODEL_NAMES:
        return
    model_cls = tvdet.MaskRCNN if name in EXTRA_MODELS else _ARCHS[name].model_cls
    given = {k: v for k, v in kwargs.items() if k != "image_size" or name not in EXTRA_MODELS}
    try:
        _check_kwargs(name, model_cls, given)
    except TypeError as e:
        raise ModelError(f"model.kwargs: {e}") from None
    defaults = _kwarg_defaults(model_cls)
    for key, value in kwargs.items():
        default = 128 if key == "image_size" else defaults.get(key)
        if not _number_ok(key, value, default):
            raise ModelError(f"model.kwargs.{key} must be a number (default {default!r}), got {value!r}")
        rule = _kwarg_range(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if rule is not None and not all(isinstance(v, (int, float)) and rule[0](v) for v in values):
            raise ModelError(f"model.kwargs.{key} must be {rule[1]}, got {value!r}")
    try:
        with torch.device("meta"):
            if name in EXTRA_MODELS:
                model = EXTRA_MODELS[name](2, **kwargs)
            else:
                model = getattr(tvdet, name)(weights=None, weights_backbone=None, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ModelError(f"model.kwargs {kwargs}: {name} refuses them: {str(e).splitlines()[0]}") from None
    if loss_cfg is not None and not stock:
        cfg = tv_lossfix.LossConfig.coerce(loss_cfg)
        try:
            check_sampling(model.rpn, cfg.rpn_head)
            check_sampling(model.roi_heads, cfg.roi_head)
        except tv_lossfix.LossConfigError as e:
            raise ModelError(f"model.{e}") from None


# -- anchors ----------------------------------------------------------------------------------------
def check_anchors(name: str, sizes: Optional[Sequence[Sequence[float]]], ratios) -> None:
    """model.anchor_sizes / aspect_ratios against ``name``'s feature maps before any data is read: set on
    the model built on the meta device (no memory, no weights); a mismatch is set_anchors' ModelError."""
    if sizes is None and ratios is None:
        return
    set_anchors(_meta_model(name), sizes, ratios)


def _meta_model(name: str) -> nn.Module:
    """``name``'s architecture on the meta device: no memory, no weights, nothing downloaded."""
    with torch.device("meta"):
        if name in EXTRA_MODELS:
            return EXTRA_MODELS[name](2)
        return getattr(tvdet, name)(weights=None, weights_backbone=None)


def set_anchors(
    model: nn.Module, sizes: Optional[Sequence[Sequence[float]]], ratios: Optional[Sequence[Sequence[float]]]
) -> List[str]:
    """Give the RPN other anchors (model.anchor_sizes / model.aspect_ratios); returns what changed.

    One size list per feature map; ratios either one list for all maps or one per map. Every map
    must get the same number of anchors per location (the RPN head's convs are shared across maps);
    when that number changes, the head's two output convs are re-initialised as torchvision does.
    """
    if sizes is None and ratios is None:
        return []
    old = model.rpn.anchor_generator
    levels = len(old.sizes)
    sizes = [tuple(s) for s in sizes] if sizes is not None else [tuple(s) for s in old.sizes]
    ratios = [tuple(r) for r in ratios] if ratios is not None else [tuple(r) for r in old.aspect_ratios]
    if len(sizes) != levels:
        raise ModelError(
            f"model.anchor_sizes has {len(sizes)} lists but the backbone gives {levels} feature maps: "
            f"give one list per feature map (now {[list(s) for s in old.sizes]})"
        )
    if len(ratios) == 1:
        ratios = ratios * levels
    if len(ratios) != levels:
        raise ModelError(
            f"model.aspect_ratios has {len(ratios)} lists: give one list, or one per feature map ({levels})"
        )
    per_loc = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    if len(per_loc) != 1:
        raise ModelError(
            "model.anchor_sizes x model.aspect_ratios must give every feature map the same number of "
            f"anchors per location (the RPN head is shared); got {sorted(per_loc)}"
        )
    model.rpn.anchor_generator = AnchorGenerator(tuple(sizes), tuple(ratios))
    changed = [f"rpn.anchor_generator: sizes {[list(s) for s in sizes]}, aspect ratios {[list(r) for r in ratios]}"]
    n_new, n_old = per_loc.pop(), old.num_anchors_per_location()[0]
    if n_new != n_old:
        head = model.rpn.head
        channels = head.cls_logits.in_channels
        head.cls_logits = nn.Conv2d(channels, n_new, 1)
        head.bbox_pred = nn.Conv2d(channels, n_new * 4, 1)
        for layer in (head.cls_logits, head.bbox_pred):  # torchvision's RPNHead init
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)
        changed.append(
            f"rpn.head.cls_logits and rpn.head.bbox_pred re-initialised ({n_old} -> {n_new} anchors per location)"
        )
    return changed


# -- building ---------------------------------------------------------------------------------------
def _tiny_from_checkpoint(
    path: str, num_classes: int, loss_cfg: Any, stock: bool, kwargs: Dict[str, Any], notes: List[str]
):
    # The library's one checkpoint reader; a class-agnostic checkpoint is followed (build_model has
    # already refused one that model.class_agnostic_* does not ask for).
    try:
        loaded = load_checkpoint_model(
            path, "maskrcnn_tiny", lambda n, _, kw: maskrcnn_tiny(n, **kw), kwargs, (True, True)
        )
    except CheckpointError as e:
        raise ModelError(f"--weights {str(e).splitlines()[0]}") from None
    model, settings = loaded.model, loaded.settings
    notes.extend(loaded.lines)
    replaced = replace_predictors(model, num_classes, None, *state_class_agnostic(model.state_dict()))
    if not stock:
        model, lines = patch_loaded(
            model, tv_lossfix.LossConfig.coerce(loss_cfg), loaded.extra_state, f"--weights {path}"
        )
        replaced += lines
    return model, BuildReport(tuple(replaced), settings)


def _builder_with_notes(name: str, notes: List[str], **args) -> Tuple[nn.Module, BuildReport]:
    """A tv_lossfix builder and its report; its warnings about explicit values that overrode the
    checkpoint's become notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModelSettingsWarning)
        model, report = build_with_report(name, **args)
    for w in caught:
        if issubclass(w.category, ModelSettingsWarning):
            notes.append(str(w.message).removeprefix("weights checkpoint: "))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model, report


def build_model(
    *,
    name: str,
    num_classes: int,
    loss_cfg: Any = None,
    weights: Optional[str] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    rpn_score_thresh: Optional[float] = None,
    stock: bool = False,
    kwargs: Optional[Dict[str, Any]] = None,
    notes: Optional[List[str]] = None,
    class_agnostic_bbox: bool = False,
    class_agnostic_mask: bool = False,
) -> Tuple[nn.Module, BuildReport]:
    """:func:`build` with class-agnostic box regression and/or masks (model.class_agnostic_bbox /
    _mask): the layers tv_lossfix.make_class_agnostic re-initialises (from a class-specific
    ``weights`` checkpoint, or the fresh ones) are added to the report's ``replaced`` lines."""
    check_class_agnostic(name, stock, class_agnostic_bbox, class_agnostic_mask)
    have = checkpoint_class_agnostic(weights)
    flag = contradicted_flag(have, (class_agnostic_bbox, class_agnostic_mask))
    if flag is not None:
        what = "box regression" if flag == "class_agnostic_bbox" else "mask"
        raise ModelError(
            f"--weights {weights} has a class-agnostic {what} predictor: set model.{flag}: true to load it"
        )
    kwargs = dict(kwargs or {})
    if any(have) and name not in EXTRA_MODELS:  # the builder makes the heads agnostic before it loads them
        kwargs.update(class_agnostic_bbox=have[0], class_agnostic_mask=have[1])
    model, report = build(
        name=name,
        num_classes=num_classes,
        loss_cfg=loss_cfg,
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        rpn_score_thresh=rpn_score_thresh,
        stock=stock,
        kwargs=kwargs,
        notes=notes,
    )
    if class_agnostic_bbox or class_agnostic_mask:
        agnostic = tv_lossfix.make_class_agnostic(model, class_agnostic_bbox, class_agnostic_mask)
        report = dataclasses.replace(report, replaced=report.replaced + tuple(agnostic))
    return model, report


def checkpoint_class_agnostic(weights: Optional[str]) -> tuple:
    """(box, mask) predictors of a ``weights`` checkpoint that are class-agnostic: 4 box outputs, 1 mask channel."""
    if not weights or not is_checkpoint_path(weights) or not os.path.isfile(weights):
        return False, False
    return state_class_agnostic(load_checkpoint_state(weights))


def build(
    *,
    name: str,
    num_classes: int,
    loss_cfg: Any = None,
    weights: Optional[str] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    rpn_score_thresh: Optional[float] = None,
    stock: bool = False,
    kwargs: Optional[Dict[str, Any]] = None,
    notes: Optional[List[str]] = None,
) -> Tuple[nn.Module, BuildReport]:
    """Build ``name`` with tv_lossfix's heads, or torchvision's own when ``stock`` (for A/B runs).

    A ``weights`` checkpoint that carries ``model_settings`` rebuilds the model it trained (anchors,
    sizes, thresholds); a value in ``kwargs`` that differs from the checkpoint's wins and is named in
    ``notes`` (one line each). Returns (model, :class:`tv_lossfix.builders.BuildReport`): the layers
    replaced because ``num_classes`` (or the keypoint count) differs from the weights', and the
    checkpoint's ``model_settings``, as the builder read them (the checkpoint is read once).
    """
    check_model_name(name)
    kwargs = dict(kwargs or {})
    if rpn_score_thresh is not None:
        kwargs["rpn_score_thresh"] = rpn_score_thresh
    notes = notes if notes is not None else []
    first = len(notes)
    args = dict(
        weights=weights,
        weights_backbone=weights_backbone,
        num_classes=num_classes,
        trainable_backbone_layers=trainable_backbone_layers,
        **kwargs,
    )
    if name in EXTRA_MODELS:
        if weights_backbone:
            raise ModelError(f"model {name} has no pretrained backbone: drop --weights-backbone")
        if weights:
            model, report = _tiny_from_checkpoint(weights, num_classes, loss_cfg, stock, kwargs, notes)
        else:
            if not stock:  # the builders make this check; the demo model is built here
                check_builder_kwargs(tv_lossfix.LossConfig.coerce(loss_cfg), kwargs)
            model = EXTRA_MODELS[name](num_classes, **kwargs)
            # A long-tail classifier's layers (Seesaw's object logit, a cosine classifier), said as the builders say.
            lines = (
                [] if stock else prepare_classifier(model.roi_heads, tv_lossfix.LossConfig.coerce(loss_cfg).roi_head)
            )
            model, report = (model if stock else tv_lossfix.patch_model(model, loss_cfg)), BuildReport(tuple(lines))
    elif stock:
        if weights is not None:
            raise ModelError("--stock builds torchvision's own model: it takes no --weights here")
        model, report = getattr(tvdet, name)(**args), BuildReport()
    else:
        model, report = _builder_with_notes(name, notes, loss_cfg=loss_cfg, **args)
    settings = report.checkpoint_settings
    if "anchor_sizes" in settings:  # first: the builder's notes name what overrode these settings
        notes.insert(
            first,
            f"anchors from the checkpoint: sizes {settings['anchor_sizes']}, aspect ratios {settings['aspect_ratios']}",
        )
    return model, report
