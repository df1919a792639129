"""One validated loss configuration for both detection heads.

``LossConfig`` is immutable and checked on construction, so a model never holds a half-valid
config. It is built from a dict, a YAML file (bare, or a full training config with the heads
under ``model:``), a preset name, or another ``LossConfig``: see :meth:`LossConfig.coerce`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Tuple, Union

from ._suggest import did_you_mean

__all__ = ["RPNLossConfig", "RoILossConfig", "LossConfig", "LossConfigError", "PRESETS", "TRAINING_MODEL_KEYS"]

BBOX_LOSSES = ("smooth_l1", "l1", "giou", "diou", "ciou")
# "sampled": positives + negatives of the batch (torchvision, Detectron2, MMDetection RoI head).
# "positive": positives only (the guide's option). "sampled_per_image": sum over images of
# max(P_i, 1) + max(N_i, 1) (MMDetection's RPN head).
RPN_AVG_FACTORS = ("sampled", "positive", "sampled_per_image")
ROI_AVG_FACTORS = ("sampled", "positive")
RPN_CLS_AVG_FACTORS = ("sampled", "sampled_per_image")
ROI_CLS_AVG_FACTORS = ("sampled",)


class LossConfigError(ValueError):
    """A loss config that cannot be used; the message names the offending key."""


def _check_weight(where: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LossConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise LossConfigError(f"{where} must be a finite number {bound}, got {value!r}")
    return value


def _check_choice(where: str, value: Any, allowed: Tuple[str, ...]) -> str:
    if value not in allowed:
        tip = did_you_mean(value, allowed)
        raise LossConfigError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}{tip}")
    return value


def _reject_unknown(prefix: str, data: Mapping[str, Any], allowed) -> None:
    for key in data:
        if key not in allowed:
            raise LossConfigError(
                f"unknown key {prefix + str(key)!r}{did_you_mean(key, allowed, prefix)} "
                f"(allowed under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(allowed))})"
            )


@dataclass(frozen=True)
class _HeadLossConfig:
    cls_pos_weight: float = 1.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0
    cls_avg_factor: str = "sampled"
    bbox_avg_factor: str = "sampled"
    bbox_loss: str = "smooth_l1"
    smooth_l1_beta: float = 1.0 / 9.0

    # Class-level constants, not fields (no annotation): the section name used in messages
    # and the normalization modes this head supports.
    _section = "head"
    _bbox_avg_factors = ()
    _cls_avg_factors = ()

    def __post_init__(self) -> None:
        s = self._section
        # A positive weight of 0 would delete every positive's classification loss: the collapse
        # this package exists to prevent. MMDetection reads pos_weight <= 0 as 1; we refuse it.
        object.__setattr__(self, "cls_pos_weight", _check_weight(f"{s}.cls_pos_weight", self.cls_pos_weight, True))
        # A loss weight of 0 turns a term off, which is legitimate (e.g. freezing a branch).
        for name in ("loss_cls_weight", "loss_bbox_weight", "smooth_l1_beta"):
            object.__setattr__(self, name, _check_weight(f"{s}.{name}", getattr(self, name)))
        for name in self._weight_fields():
            object.__setattr__(self, name, _check_weight(f"{s}.{name}", getattr(self, name)))
        _check_choice(f"{s}.bbox_avg_factor", self.bbox_avg_factor, self._bbox_avg_factors)
        _check_choice(f"{s}.cls_avg_factor", self.cls_avg_factor, self._cls_avg_factors)
        _check_choice(f"{s}.bbox_loss", self.bbox_loss, BBOX_LOSSES)

    def _weight_fields(self) -> Tuple[str, ...]:
        return ()

    @classmethod
    def keys(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(
        cls, data: Optional[Mapping[str, Any]], base: Optional["_HeadLossConfig"] = None, prefix: str = ""
    ) -> "_HeadLossConfig":
        """Build from a mapping of this head's keys, on top of ``base``; ``prefix`` is for messages."""
        where = prefix + cls._section
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise LossConfigError(f"{where} must be a mapping of loss settings, got {type(data).__name__}")
        _reject_unknown(f"{where}.", data, cls.keys())
        try:
            return dataclasses.replace(base if base is not None else cls(), **dict(data))
        except LossConfigError as e:
            raise LossConfigError(f"{prefix}{e}" if prefix else str(e)) from None

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance((v := getattr(self, f.name)), tuple) else v) for f in fields(self)}

    def is_default(self) -> bool:
        return self == type(self)()


@dataclass(frozen=True)
class RPNLossConfig(_HeadLossConfig):
    """Loss settings of the region proposal network (objectness BCE + anchor box regression)."""

    _section = "rpn_head"
    _bbox_avg_factors = RPN_AVG_FACTORS
    _cls_avg_factors = RPN_CLS_AVG_FACTORS


@dataclass(frozen=True)
class RoILossConfig(_HeadLossConfig):
    """Loss settings of the RoI heads (Fast R-CNN classifier and box, mask, keypoint)."""

    class_weight: Optional[Tuple[float, ...]] = None
    loss_mask_weight: float = 1.0
    loss_keypoint_weight: float = 1.0

    _section = "roi_head"
    _bbox_avg_factors = ROI_AVG_FACTORS
    _cls_avg_factors = ROI_CLS_AVG_FACTORS

    def _weight_fields(self) -> Tuple[str, ...]:
        return ("loss_mask_weight", "loss_keypoint_weight")

    def __post_init__(self) -> None:
        super().__post_init__()
        cw = self.class_weight
        if cw is not None:
            if isinstance(cw, (str, bytes)) or not hasattr(cw, "__iter__"):
                raise LossConfigError(
                    f"roi_head.class_weight must be a list with one weight per class "
                    f"(background first), got {type(cw).__name__} {cw!r}"
                )
            cw = tuple(_check_weight(f"roi_head.class_weight[{i}]", w) for i, w in enumerate(cw))
            if len(cw) < 2:
                raise LossConfigError(
                    f"roi_head.class_weight needs one weight per class including background (>= 2), got {len(cw)}"
                )
            object.__setattr__(self, "class_weight", cw)

    def check_num_classes(self, num_classes: int) -> None:
        """Raise if ``class_weight`` does not match a model with ``num_classes`` (incl. background)."""
        if self.class_weight is not None and len(self.class_weight) != num_classes:
            raise LossConfigError(
                f"roi_head.class_weight has {len(self.class_weight)} entries but the model has "
                f"{num_classes} classes (background included): give one weight per class"
            )


_TOP_KEYS = ("rpn_head", "roi_head", "sync_avg_factor", "preset")

# The keys references/train.py documents under ``model:`` in a training config. The loss keys
# among them are read here, the same way for LossConfig.from_yaml and for the training script;
# the others belong to the script, and any key in neither list is an error, never dropped.
TRAINING_MODEL_LOSS_KEYS = ("loss_preset", "preset", "rpn_head", "roi_head", "sync_avg_factor")
TRAINING_MODEL_KEYS = TRAINING_MODEL_LOSS_KEYS + (
    "name",
    "num_classes",
    "weights",
    "weights_backbone",
    "trainable_backbone_layers",
    "rpn_score_thresh",
    "stock",
    "kwargs",
    "anchor_sizes",
    "aspect_ratios",
)


def _loss_keys_of_model_section(model: Any) -> dict:
    """The loss settings of a training config's ``model:`` section, in the bare form."""
    if model is None:
        return {}
    if not isinstance(model, Mapping):
        raise LossConfigError(f"model must be a mapping, got {type(model).__name__}")
    _reject_unknown("model.", model, TRAINING_MODEL_KEYS)
    if model.get("loss_preset") is not None and model.get("preset") is not None:
        raise LossConfigError("model.loss_preset and model.preset both name a preset: keep one")
    out = {k: model[k] for k in ("rpn_head", "roi_head", "sync_avg_factor") if model.get(k) is not None}
    preset = model.get("loss_preset", model.get("preset"))
    if preset is not None:
        out["preset"] = preset
    return out


@dataclass(frozen=True)
class LossConfig:
    """The complete loss configuration of a two-stage detector.

    The defaults reproduce stock torchvision exactly. Build one with :meth:`from_dict`,
    :meth:`from_yaml`, :meth:`preset`, or :meth:`coerce` (any of those forms).

    Attributes:
        rpn_head: settings of the RPN objectness and anchor-box losses.
        roi_head: settings of the classifier, box, mask and keypoint losses.
        sync_avg_factor: average the normalizers over DDP ranks (MMDetection's ``reduce_mean``),
            so every rank divides by the same count. Off by default, as in torchvision.
    """

    rpn_head: RPNLossConfig = field(default_factory=RPNLossConfig)
    roi_head: RoILossConfig = field(default_factory=RoILossConfig)
    sync_avg_factor: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rpn_head, RPNLossConfig):
            raise LossConfigError(f"rpn_head must be an RPNLossConfig, got {type(self.rpn_head).__name__}")
        if not isinstance(self.roi_head, RoILossConfig):
            raise LossConfigError(f"roi_head must be a RoILossConfig, got {type(self.roi_head).__name__}")
        if not isinstance(self.sync_avg_factor, bool):
            raise LossConfigError(f"sync_avg_factor must be true or false, got {self.sync_avg_factor!r}")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "LossConfig":
        """Build from ``{"rpn_head": {...}, "roi_head": {...}, "sync_avg_factor": ..., "preset": ...}``.

        A full training config is accepted too: its loss keys are read from ``model:``
        (``loss_preset`` or ``preset``, ``rpn_head``, ``roi_head``, ``sync_avg_factor``), exactly as
        references/train.py reads them, and an unknown key under ``model:`` is an error. Its other
        sections (``data:``, ``training:``...) are left to the training script.
        """
        if data is None:
            return cls()
        if isinstance(data, LossConfig):
            return data
        if not isinstance(data, Mapping):
            raise LossConfigError(f"loss config must be a mapping, got {type(data).__name__}")
        prefix = ""
        if "model" in data:
            data, prefix = _loss_keys_of_model_section(data["model"]), "model."
        _reject_unknown(prefix, data, _TOP_KEYS)
        base = cls.preset(data["preset"]) if data.get("preset") is not None else cls()
        sync = data.get("sync_avg_factor", base.sync_avg_factor)
        if not isinstance(sync, bool):
            raise LossConfigError(f"{prefix}sync_avg_factor must be true or false, got {sync!r}")
        return cls(
            rpn_head=RPNLossConfig.from_dict(data.get("rpn_head"), base.rpn_head, prefix),
            roi_head=RoILossConfig.from_dict(data.get("roi_head"), base.roi_head, prefix),
            sync_avg_factor=sync,
        )

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "LossConfig":
        """Read a YAML file: bare (``rpn_head:`` at the top) or a training config (under ``model:``)."""
        import yaml

        from ._yaml import load_yaml

        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = load_yaml(f)
        except FileNotFoundError:
            raise LossConfigError(f"loss config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise LossConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(data or {})
        except LossConfigError as e:
            raise LossConfigError(f"{path}: {e}") from None

    @classmethod
    def preset(cls, name: str) -> "LossConfig":
        """A named configuration: ``"torchvision"``, ``"mmdetection"`` or ``"positive"``."""
        return PRESETS[_check_choice("preset", name, tuple(PRESETS))]

    @classmethod
    def coerce(cls, obj: Any) -> "LossConfig":
        """Accept ``None``, a ``LossConfig``, a dict, a preset name or a YAML path."""
        if obj is None:
            return cls()
        if isinstance(obj, LossConfig):
            return obj
        if isinstance(obj, Mapping):
            return cls.from_dict(obj)
        if isinstance(obj, (str, os.PathLike)):
            s = os.fspath(obj)
            if s in PRESETS:
                return PRESETS[s]
            if s.endswith((".yaml", ".yml")) or os.path.exists(s):
                return cls.from_yaml(s)
            raise LossConfigError(
                f"loss_cfg {s!r} is neither a preset ({', '.join(map(repr, PRESETS))}) nor an existing YAML file"
            )
        raise LossConfigError(
            f"loss_cfg must be a LossConfig, dict, preset name or YAML path, got {type(obj).__name__}"
        )

    # -- use ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "rpn_head": self.rpn_head.to_dict(),
            "roi_head": self.roi_head.to_dict(),
            "sync_avg_factor": self.sync_avg_factor,
        }

    def replace(self, **changes: Any) -> "LossConfig":
        return dataclasses.replace(self, **changes)

    def is_default(self) -> bool:
        return self == LossConfig()


PRESETS = {
    "torchvision": LossConfig(),
    # MMDetection's Mask R-CNN R50-FPN config: L1 box losses; the RPN divides both terms by
    # sum_i max(P_i, 1) + max(N_i, 1); the RoI head by the sampled count.
    "mmdetection": LossConfig(
        rpn_head=RPNLossConfig(bbox_loss="l1", cls_avg_factor="sampled_per_image", bbox_avg_factor="sampled_per_image"),
        roi_head=RoILossConfig(bbox_loss="l1"),
    ),
    # The guide's option: box losses averaged over positives instead of all sampled.
    "positive": LossConfig(
        rpn_head=RPNLossConfig(bbox_avg_factor="positive"),
        roi_head=RoILossConfig(bbox_avg_factor="positive"),
    ),
}
