"""The settings that shape a detector but are not in its ``state_dict``.

A ``state_dict`` holds weights, not the anchors the RPN head was trained for, the input size, the
NMS and score thresholds or the sampler sizes. :func:`model_settings` reads them as plain types
(a checkpoint stores them under ``"model_settings"``); :func:`apply_model_settings` puts them back,
so a model rebuilt from a checkpoint predicts as the one that was trained. The keys are
torchvision's builder keywords (``min_size``, ``rpn_nms_thresh``, ``box_score_thresh``...), plus
``anchor_sizes`` / ``aspect_ratios`` (the ``AnchorGenerator``), ``loss_cfg`` and ``class_names``.
"""

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from .checkpoint import CheckpointError
from .sampling import set_matcher, set_sampler

__all__ = ["model_settings", "apply_model_settings", "ModelSettingsWarning", "anchors_per_location"]


class ModelSettingsWarning(UserWarning):
    """A value given explicitly differs from the one the checkpoint's model was trained with."""


def _lists(x: Any) -> Any:
    """Tuples -> lists, recursively, numbers as Python numbers: what a checkpoint and YAML hold."""
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x.item() if hasattr(x, "item") else x


def _set_matcher(m: nn.Module, head: str, high: Optional[float], low: Optional[float]) -> None:
    """Both thresholds of one head's Matcher at once (a Matcher checks low <= high)."""
    old = getattr(m, head).proposal_matcher
    high = old.high_threshold if high is None else high
    low = old.low_threshold if low is None else low
    set_matcher(getattr(m, head), high, low)


def _sampler_setter(head: str, field: str) -> Callable:
    def set_(m: nn.Module, v: Any) -> None:
        s = getattr(m, head).fg_bg_sampler
        num = int(v) if field == "batch_size_per_image" else s.batch_size_per_image
        frac = float(v) if field == "positive_fraction" else s.positive_fraction
        set_sampler(getattr(m, head), num, frac)

    return set_


def _attr(path: str, cast: Callable = lambda v: v) -> Tuple[Callable, Callable]:
    *parents, leaf = path.split(".")

    def owner(m: nn.Module):
        for p in parents:
            m = getattr(m, p)
        return m

    return (lambda m: getattr(owner(m), leaf)), (lambda m, v: setattr(owner(m), leaf, cast(v)))


def _topn(attr: str, mode: str) -> Tuple[Callable, Callable]:
    def set_(m: nn.Module, v: Any) -> None:
        getattr(m.rpn, attr)[mode] = int(v)

    return (lambda m: getattr(m.rpn, attr)[mode]), set_


def _head_value(head: str, attr: str, field: str) -> Callable:
    return lambda m: getattr(getattr(getattr(m, head), attr), field)


def _tuple(v: Any) -> Tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _fixed(v: Any) -> Optional[Tuple[int, int]]:
    return None if v is None else tuple(int(x) for x in v)


# key -> (read from the model, write to the model). Keys are torchvision's builder keywords.
_T = "transform"
_SETTERS: Dict[str, Tuple[Callable, Callable]] = {
    "min_size": _attr(f"{_T}.min_size", lambda v: tuple(int(x) for x in _tuple(v))),
    "max_size": _attr(f"{_T}.max_size", int),
    "image_mean": _attr(f"{_T}.image_mean", lambda v: [float(x) for x in v]),
    "image_std": _attr(f"{_T}.image_std", lambda v: [float(x) for x in v]),
    "size_divisible": _attr(f"{_T}.size_divisible", int),
    "fixed_size": _attr(f"{_T}.fixed_size", _fixed),
    "_skip_resize": _attr(f"{_T}._skip_resize", bool),
    "rpn_pre_nms_top_n_train": _topn("_pre_nms_top_n", "training"),
    "rpn_pre_nms_top_n_test": _topn("_pre_nms_top_n", "testing"),
    "rpn_post_nms_top_n_train": _topn("_post_nms_top_n", "training"),
    "rpn_post_nms_top_n_test": _topn("_post_nms_top_n", "testing"),
    "rpn_nms_thresh": _attr("rpn.nms_thresh", float),
    "rpn_score_thresh": _attr("rpn.score_thresh", float),
    "rpn_fg_iou_thresh": (_head_value("rpn", "proposal_matcher", "high_threshold"), None),
    "rpn_bg_iou_thresh": (_head_value("rpn", "proposal_matcher", "low_threshold"), None),
    "rpn_batch_size_per_image": (
        _head_value("rpn", "fg_bg_sampler", "batch_size_per_image"),
        _sampler_setter("rpn", "batch_size_per_image"),
    ),
    "rpn_positive_fraction": (
        _head_value("rpn", "fg_bg_sampler", "positive_fraction"),
        _sampler_setter("rpn", "positive_fraction"),
    ),
    "box_score_thresh": _attr("roi_heads.score_thresh", float),
    "box_nms_thresh": _attr("roi_heads.nms_thresh", float),
    "box_detections_per_img": _attr("roi_heads.detections_per_img", int),
    "box_fg_iou_thresh": (_head_value("roi_heads", "proposal_matcher", "high_threshold"), None),
    "box_bg_iou_thresh": (_head_value("roi_heads", "proposal_matcher", "low_threshold"), None),
    "box_batch_size_per_image": (
        _head_value("roi_heads", "fg_bg_sampler", "batch_size_per_image"),
        _sampler_setter("roi_heads", "batch_size_per_image"),
    ),
    "box_positive_fraction": (
        _head_value("roi_heads", "fg_bg_sampler", "positive_fraction"),
        _sampler_setter("roi_heads", "positive_fraction"),
    ),
    "bbox_reg_weights": _attr("roi_heads.box_coder.weights", lambda v: tuple(float(x) for x in v)),
}
# The two thresholds of one Matcher are written together, by _set_matcher.
_MATCHERS = {"rpn": ("rpn_fg_iou_thresh", "rpn_bg_iou_thresh"), "roi_heads": ("box_fg_iou_thresh", "box_bg_iou_thresh")}
_ANCHORS = ("anchor_sizes", "aspect_ratios")
_OTHER = {"loss_cfg", "class_names"}
# torchvision's builder defaults for the keywords whose default is None.
_NONE_MEANS = {"bbox_reg_weights": [10.0, 10.0, 5.0, 5.0]}


def _target(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / DataParallel


def model_settings(model: nn.Module, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Every setting that shapes ``model`` but is not in its ``state_dict``, as plain types.

    Keys: the builder keywords of the transform (``min_size``, ``max_size``, ``image_mean``,
    ``image_std``, ``size_divisible``, ``fixed_size``, ``_skip_resize``), the RPN (``rpn_*``) and the
    RoI heads (``box_*``, ``bbox_reg_weights``), ``anchor_sizes`` and ``aspect_ratios``, ``loss_cfg``
    (``LossConfig.to_dict()``, when tv_lossfix patched the model) and ``class_names`` when given.
    """
    m = _target(model)
    out: Dict[str, Any] = {k: _lists(get(m)) for k, (get, _) in _SETTERS.items() if _has(m, get)}
    gen = m.rpn.anchor_generator
    out["anchor_sizes"], out["aspect_ratios"] = _lists(gen.sizes), _lists(gen.aspect_ratios)
    cfg = getattr(m, "loss_cfg", None)
    if cfg is not None:
        out["loss_cfg"] = cfg.to_dict()
    if class_names is not None:
        out["class_names"] = [str(n) for n in class_names]
    return out


def _has(m: nn.Module, get: Callable) -> bool:
    try:
        get(m)
    except AttributeError:  # e.g. _skip_resize before torchvision 0.15
        return False
    return True


def anchors_per_location(model: nn.Module) -> Optional[int]:
    """The anchors per location the model's RPN head predicts for (None: not torchvision's RPNHead)."""
    cls_logits = getattr(getattr(_target(model).rpn, "head", None), "cls_logits", None)
    return int(cls_logits.out_channels) if isinstance(cls_logits, nn.Conv2d) else None


def _norm(key: str, v: Any) -> Any:
    """One spelling per value, so a builder's ``min_size=64`` equals a checkpoint's ``[64]``."""
    if v is None and key in _NONE_MEANS:
        v = _NONE_MEANS[key]
    if key == "min_size":
        v = list(_tuple(v))
    if key == "aspect_ratios" and v is not None and v and not isinstance(v[0], (list, tuple)):
        v = [v]
    v = _lists(v)
    return [float(x) for x in v] if key in ("image_mean", "image_std", "bbox_reg_weights") else v


def _per_level(ratios: Any, levels: int) -> List[List[float]]:
    ratios = _norm("aspect_ratios", ratios)
    return ratios * levels if len(ratios) == 1 and levels > 1 else ratios


def _anchor_lines(m: nn.Module, settings: Dict[str, Any], explicit: Dict[str, Any], lines: List[str]) -> None:
    gen = m.rpn.anchor_generator
    saved_sizes = _norm("anchor_sizes", settings.get("anchor_sizes", gen.sizes))
    sizes = _norm("anchor_sizes", explicit.get("anchor_sizes", saved_sizes))
    if sizes != saved_sizes:
        lines.append(f"anchor_sizes: checkpoint {saved_sizes}, given {sizes} -> {sizes}")
    saved_ratios = _per_level(settings.get("aspect_ratios", gen.aspect_ratios), len(saved_sizes))
    ratios = _per_level(explicit.get("aspect_ratios", saved_ratios), len(sizes))
    if "aspect_ratios" in explicit and ratios != _per_level(saved_ratios, len(sizes)):
        lines.append(f"aspect_ratios: checkpoint {saved_ratios}, given {ratios} -> {ratios}")
    if sizes == _lists(gen.sizes) and ratios == _lists(gen.aspect_ratios):
        return
    counts = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    have = anchors_per_location(m)
    if len(sizes) != len(ratios) or (have is not None and counts != {have}):
        raise CheckpointError(
            f"anchor_sizes {sizes} x aspect_ratios {ratios} refused: they give {sorted(counts)} anchors per location "
            f"but the RPN head was trained for {have}"
        )
    m.rpn.anchor_generator = AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in ratios))
    lines.append(
        f"anchors: sizes {_lists(gen.sizes)} -> {sizes}, aspect ratios {_lists(gen.aspect_ratios)} -> {ratios}"
    )


def apply_model_settings(
    model: nn.Module, settings: Dict[str, Any], explicit: Optional[Dict[str, Any]] = None
) -> List[str]:
    """Give ``model`` the settings :func:`model_settings` read from the trained model; returns one line
    per change, and one per value in ``explicit`` that differs from the checkpoint's.

    ``explicit`` holds what the caller was given (builder keywords, ``anchor_sizes`` /
    ``aspect_ratios``): such a value wins over the checkpoint's and is named ("min_size:
    checkpoint [64], given [128] -> [128]"). Anchors are replaced by a new ``AnchorGenerator``; ones
    whose count per location differs from the model's RPN head are refused (CheckpointError).
    ``loss_cfg`` and ``class_names`` are not applied here (the loss is set by ``patch_model``).
    """
    m, explicit = _target(model), {k: v for k, v in (explicit or {}).items() if v is not None}
    unknown = sorted(set(settings) - set(_SETTERS) - set(_ANCHORS) - _OTHER)
    if unknown:
        raise CheckpointError(f"model_settings: unknown setting(s) {', '.join(unknown)} (a newer tv_lossfix?)")
    lines: List[str] = []
    _anchor_lines(m, settings, explicit, lines)
    wanted: Dict[str, Any] = {}
    for key in _SETTERS:
        if key not in settings and key not in explicit:
            continue
        value = settings.get(key)
        if key in explicit and key in settings and _norm(key, explicit[key]) != _norm(key, value):
            given = _norm(key, explicit[key])
            lines.append(f"{key}: checkpoint {_norm(key, value)}, given {given} -> {given}")
        wanted[key] = explicit.get(key, value)
    for key, value in wanted.items():
        get, set_ = _SETTERS[key]
        if not _has(m, get) or _norm(key, get(m)) == _norm(key, value):
            continue
        before = _norm(key, get(m))
        if set_ is not None:
            set_(m, value)
        lines.append(f"{key}: {before} -> {_norm(key, value)}")
    for head, (high, low) in _MATCHERS.items():
        if high in wanted or low in wanted:
            _set_matcher(m, head, wanted.get(high), wanted.get(low))
    return lines


def warn_conflicts(lines: Sequence[str], stacklevel: int = 5) -> None:
    """The builders' way of naming an explicit value that overrode the checkpoint's.

    ``stacklevel`` 5 points the warning at the line that called a public builder (through
    ``_from_checkpoint`` and ``_build``).
    """
    for line in lines:
        if ", given " in line:
            warnings.warn(f"weights checkpoint: {line}", ModelSettingsWarning, stacklevel=stacklevel)
