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
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ._checks import LossConfigError, check_choice, check_number, check_weight
from ._suggest import did_you_mean
from .cls_losses import cls_loss_names, param_owners, registered

__all__ = ["RPNLossConfig", "RoILossConfig", "LossConfig", "LossConfigError", "PRESETS", "MODEL_LOSS_KEYS"]

BBOX_LOSSES = ("smooth_l1", "l1", "giou", "diou", "ciou")
# "sampled": positives + negatives of the batch (torchvision, Detectron2, MMDetection RoI head).
# "positive": positives only (the guide's option). "sampled_per_image": sum over images of
# max(P_i, 1) + max(N_i, 1) (MMDetection's RPN head).
RPN_AVG_FACTORS = ("sampled", "positive", "sampled_per_image")
ROI_AVG_FACTORS = ("sampled", "positive")
RPN_CLS_AVG_FACTORS = ("sampled", "sampled_per_image")
ROI_CLS_AVG_FACTORS = ("sampled",)
# Classification losses (``cls_loss``) and their parameters are read from the registry of
# tv_lossfix.cls_losses at each check: a new loss is registered there, not listed here.


def _reject_unknown(prefix: str, data: Mapping[str, Any], allowed) -> None:
    for key in data:
        if key not in allowed:
            raise LossConfigError(
                f"unknown key {prefix + str(key)!r}{did_you_mean(key, allowed, prefix)} "
                f"(allowed under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(allowed))})"
            )


# The loss-fix guide's spellings of three sampler keys, read as the canonical (MMDetection) key.
SAMPLING_ALIASES = {"num_samples": "num", "pos_ratio": "pos_fraction", "num_neg_ratio": "neg_pos_ub"}
ROI_SAMPLERS = ("random", "ohem")


def _canonical_keys(where: str, data: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in data.items():
        canonical = SAMPLING_ALIASES.get(key, key)
        if canonical != key and canonical in data:
            raise LossConfigError(
                f"{where}.{key} and {where}.{canonical} are the same setting ({key} is an alias): keep one"
            )
        out[canonical] = value
    return out


def _check_sampling(cfg: Any) -> None:
    """The assigner / sampler keys of one head (their order against the model is checked at patch time)."""
    s = cfg._section
    for key in ("pos_iou_thr", "neg_iou_thr"):
        if getattr(cfg, key) is not None:
            object.__setattr__(cfg, key, check_number(f"{s}.{key}", getattr(cfg, key), 0.0, 1.0))
    if cfg.pos_iou_thr is not None and cfg.neg_iou_thr is not None and cfg.neg_iou_thr > cfg.pos_iou_thr:
        raise LossConfigError(f"{s}.neg_iou_thr ({cfg.neg_iou_thr}) must be <= {s}.pos_iou_thr ({cfg.pos_iou_thr})")
    if cfg.pos_fraction is not None:
        object.__setattr__(cfg, "pos_fraction", check_number(f"{s}.pos_fraction", cfg.pos_fraction, 0.0, 1.0, True))
    for key in ("num", "feat_channels"):
        value = getattr(cfg, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LossConfigError(f"{s}.{key} must be an integer >= 1, got {value!r}")
    ub = cfg.neg_pos_ub
    if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not math.isfinite(ub) or not (ub == -1 or ub >= 0):
        raise LossConfigError(f"{s}.neg_pos_ub must be -1 (no cap) or a number > 0, got {ub!r}")
    if ub == 0:  # MMDetection allows it; it is never what is meant
        raise LossConfigError(
            f"{s}.neg_pos_ub 0 samples no negative: the classifier never sees background and fires everywhere "
            f"(about box_detections_per_img detections per image); use -1 (no cap) or a ratio > 0 such as 3"
        )
    if hasattr(cfg, "sampler"):
        check_choice(f"{s}.sampler", cfg.sampler, ROI_SAMPLERS)


# Keys only one head reads: under the other head the error says so (a did-you-mean would point at an
# unrelated key, rpn_head.sampler -> num_samples), with the reason where it is not obvious.
_ONE_HEAD_KEYS = {
    **{key: "roi_head" for key in param_owners("roi_head") if key not in param_owners("rpn_head")},
    "cosine_classifier": "roi_head",
    "cosine_temperature": "roi_head",
    "sampler": "roi_head",
    "class_weight": "roi_head",
    "loss_mask_weight": "roi_head",
    "loss_keypoint_weight": "roi_head",
    "focal_alpha": "rpn_head",
    "feat_channels": "rpn_head",
}
_ONE_HEAD_WHY = {
    "sampler": "OHEM ranks RoIs by the box head's loss; the RPN samples its anchors at random",
    "focal_alpha": "the RoI head's softmax focal loss takes roi_head.class_weight as its per-class alpha",
    "class_weight": "the RPN has one foreground class: weigh its positives with rpn_head.cls_pos_weight",
}


def _reject_other_heads_keys(where: str, cls: type, data: Mapping[str, Any]) -> None:
    for key in data:
        head = _ONE_HEAD_KEYS.get(key)
        if head is not None and head != cls._section:
            why = _ONE_HEAD_WHY.get(key)
            raise LossConfigError(
                f"unknown key {where + '.' + key!r}: it is a {head} key only" + (f" ({why})" if why else "")
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
    # Assigner (torchvision's Matcher) and sampler, with MMDetection's names. None keeps the
    # model's own value (its builder arguments); see tv_lossfix/sampling.py.
    pos_iou_thr: Optional[float] = None
    neg_iou_thr: Optional[float] = None
    num: Optional[int] = None
    pos_fraction: Optional[float] = None
    neg_pos_ub: Union[int, float] = -1
    # The parameters of registered losses that are not fields here (a loss registered outside this
    # package), key -> value; written flat under the head in dicts and YAML, like the fields.
    loss_params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    # Class-level constants, not fields (no annotation): the section name used in messages
    # and the normalization modes this head supports.
    _section = "head"
    _bbox_avg_factors = ()
    _cls_avg_factors = ()

    def __post_init__(self) -> None:
        s = self._section
        # A positive weight of 0 would delete every positive's classification loss: the collapse
        # this package exists to prevent. MMDetection reads pos_weight <= 0 as 1; we refuse it.
        object.__setattr__(self, "cls_pos_weight", check_weight(f"{s}.cls_pos_weight", self.cls_pos_weight, True))
        # A loss weight of 0 turns a term off, which is legitimate (e.g. freezing a branch).
        for name in ("loss_cls_weight", "loss_bbox_weight", "smooth_l1_beta"):
            object.__setattr__(self, name, check_weight(f"{s}.{name}", getattr(self, name)))
        for name in self._weight_fields():
            object.__setattr__(self, name, check_weight(f"{s}.{name}", getattr(self, name)))
        check_choice(f"{s}.bbox_avg_factor", self.bbox_avg_factor, self._bbox_avg_factors)
        check_choice(f"{s}.cls_avg_factor", self.cls_avg_factor, self._cls_avg_factors)
        check_choice(f"{s}.bbox_loss", self.bbox_loss, BBOX_LOSSES)
        _check_sampling(self)

    def _weight_fields(self) -> Tuple[str, ...]:
        return ()

    @classmethod
    def keys(cls) -> Tuple[str, ...]:
        """The keys of this head in a dict / YAML: the fields and the registered losses' parameters."""
        own = tuple(f.name for f in fields(cls) if f.name != "loss_params")
        return own + tuple(k for k in param_owners(cls._section) if k not in own)

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
        _reject_other_heads_keys(where, cls, data)
        _reject_unknown(f"{where}.", data, cls.keys() + tuple(SAMPLING_ALIASES))
        aliases = [k for k in data if k in SAMPLING_ALIASES]
        data = _canonical_keys(where, data)
        base = base if base is not None else cls()
        own = {f.name for f in fields(cls)} - {"loss_params"}
        params = {k: v for k, v in data.items() if k not in own}
        data = {k: v for k, v in data.items() if k in own}
        if params:
            data["loss_params"] = {**base.loss_params, **params}
        try:
            return dataclasses.replace(base, **data)
        except LossConfigError as e:
            # A message about an aliased key also names the spelling the user wrote.
            given = "".join(f" (given as {where}.{a})" for a in aliases if f".{SAMPLING_ALIASES[a]} " in str(e))
            raise LossConfigError(f"{prefix}{e}{given}") from None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "loss_params"}
        out.update(self.loss_params)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def param(self, key: str) -> Any:
        """A registered loss parameter's value as given (None: the loss's default), field or not."""
        return self.loss_params.get(key) if key in self.loss_params else getattr(self, key, None)

    def is_default(self) -> bool:
        return self == type(self)()


def _check_cls_loss_keys(cfg: _HeadLossConfig) -> None:
    """``cls_loss`` is a registered loss of the head; a loss parameter set while ``cls_loss`` is a loss
    that does not read it is refused, never ignored; each set parameter is checked by its registration."""
    s = cfg._section
    check_choice(f"{s}.cls_loss", cfg.cls_loss, cls_loss_names(s))
    owners_of = param_owners(s)
    if not isinstance(cfg.loss_params, Mapping):
        raise LossConfigError(f"{s}.loss_params must be a mapping, got {type(cfg.loss_params).__name__}")
    params = dict(cfg.loss_params)
    for key in params:
        if key not in owners_of:
            raise LossConfigError(f"unknown key {s + '.' + key!r}: no registered {s}.cls_loss reads it")
    for key, owners in owners_of.items():
        value = cfg.param(key)
        if value is None:
            continue
        if cfg.cls_loss not in owners:
            raise LossConfigError(
                f"{s}.{key} is set ({value!r}) but {s}.cls_loss is {cfg.cls_loss!r}: "
                f"{key} applies only with {s}.cls_loss: {' or '.join(owners)} (set it, or drop {s}.{key})"
            )
        value = registered(s, cfg.cls_loss).params[key].check(f"{s}.{key}", value)
        if key in params:
            params[key] = value
        else:
            object.__setattr__(cfg, key, value)
    object.__setattr__(cfg, "loss_params", params)


@dataclass(frozen=True)
class RPNLossConfig(_HeadLossConfig):
    """Loss settings of the region proposal network (objectness BCE + anchor box regression).

    ``cls_loss: focal`` replaces the objectness BCE by the sigmoid focal loss of
    ``torchvision.ops.sigmoid_focal_loss``, with ``focal_gamma`` (None: 2.0) and ``focal_alpha``
    (None: 0.25; -1: no alpha weighting), normalized like the BCE.
    """

    cls_loss: str = "bce"
    focal_gamma: Optional[float] = None
    focal_alpha: Optional[float] = None
    # The guide's model code reads rpn_head.feat_channels; torchvision's RPNHead has the backbone's
    # out_channels, so the value is accepted only when it equals the model's (checked at patch time).
    feat_channels: Optional[int] = None

    _section = "rpn_head"
    _bbox_avg_factors = RPN_AVG_FACTORS
    _cls_avg_factors = RPN_CLS_AVG_FACTORS

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_cls_loss_keys(self)


@dataclass(frozen=True)
class RoILossConfig(_HeadLossConfig):
    """Loss settings of the RoI heads (Fast R-CNN classifier and box, mask, keypoint).

    ``cls_loss: focal`` replaces the classifier's cross-entropy by the softmax focal loss with
    ``focal_gamma`` (None: 2.0); ``class_weight`` is then its per-class alpha (1 without it).
    The long-tail classifiers (see :mod:`tv_lossfix.cls_losses`; None means the default given):
    ``sigmoid`` (Detectron2 USE_SIGMOID_CE), ``federated`` (USE_FED_LOSS: ``fed_num_classes`` 50,
    ``fed_freq_power`` 0.5, ``fed_image_counts`` the training images of each foreground class, required),
    ``seesaw`` (MMDetection SeesawLoss: ``seesaw_p`` 0.8, ``seesaw_q`` 2.0; one more classifier output),
    ``eqlv2`` (EQLV2Loss: ``eqlv2_mu`` 0.8, ``eqlv2_alpha`` 4.0, ``eqlv2_gamma`` 12).
    A loss registered outside this package (:func:`tv_lossfix.cls_losses.register`) reads its parameters
    from the same section (``roi_head: {cls_loss: poly1, poly_epsilon: 2.0}``); they are kept in
    ``loss_params`` and read with :meth:`param`.
    ``cosine_classifier``: the class scores of a cosine classifier (MMDetection's ``NormedLinear``,
    ``cosine_temperature`` None: 20) instead of a linear layer, with any ``cls_loss``.
    """

    cls_loss: str = "ce"
    focal_gamma: Optional[float] = None
    fed_num_classes: Optional[int] = None
    fed_freq_power: Optional[float] = None
    fed_image_counts: Optional[Tuple[int, ...]] = None
    seesaw_p: Optional[float] = None
    seesaw_q: Optional[float] = None
    eqlv2_mu: Optional[float] = None
    eqlv2_alpha: Optional[float] = None
    eqlv2_gamma: Optional[float] = None
    cosine_classifier: bool = False
    cosine_temperature: Optional[float] = None
    class_weight: Optional[Tuple[float, ...]] = None
    loss_mask_weight: float = 1.0
    loss_keypoint_weight: float = 1.0
    # "ohem": MMDetection's OHEMSampler, the highest-loss candidates instead of a random draw.
    sampler: str = "random"

    _section = "roi_head"
    _bbox_avg_factors = ROI_AVG_FACTORS
    _cls_avg_factors = ROI_CLS_AVG_FACTORS

    def _weight_fields(self) -> Tuple[str, ...]:
        return ("loss_mask_weight", "loss_keypoint_weight")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.fed_image_counts, str) and self.fed_image_counts == "auto":
            raise LossConfigError(
                "roi_head.fed_image_counts 'auto' is resolved by references/train.py from the training annotations; "
                "in your own code pass the number of training images of each foreground class"
            )
        _check_cls_loss_keys(self)
        if not isinstance(self.cosine_classifier, bool):
            raise LossConfigError(f"roi_head.cosine_classifier must be true or false, got {self.cosine_classifier!r}")
        if self.cosine_temperature is not None:
            if not self.cosine_classifier:
                raise LossConfigError(
                    f"roi_head.cosine_temperature is set ({self.cosine_temperature!r}) but roi_head.cosine_classifier "
                    "is false: it applies only to the cosine classifier (set it, or drop roi_head.cosine_temperature)"
                )
            value = check_weight("roi_head.cosine_temperature", self.cosine_temperature, True)
            object.__setattr__(self, "cosine_temperature", value)
        cw = self.class_weight
        if isinstance(cw, str) and cw == "auto":
            raise LossConfigError(
                "roi_head.class_weight 'auto' is resolved by references/train.py from the training annotations; "
                "in your own code compute the list with tv_lossfix.class_weights_from_counts(counts) and pass it"
            )
        if cw is not None:
            if isinstance(cw, (str, bytes)) or not hasattr(cw, "__iter__"):
                raise LossConfigError(
                    f"roi_head.class_weight must be a list with one weight per class "
                    f"(background first), got {type(cw).__name__} {cw!r}"
                )
            cw = tuple(check_weight(f"roi_head.class_weight[{i}]", w) for i, w in enumerate(cw))
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

# The loss keys of a training config's ``model:`` section, read here the same way for LossConfig.from_yaml
# and for a training script. Its other keys (the architecture, the weights...) are the script's, which
# checks them against its own schema; one that reads as a misspelt loss key is refused here.
MODEL_LOSS_KEYS = ("loss_preset", "preset", "rpn_head", "roi_head", "sync_avg_factor")


def _loss_keys_of_model_section(model: Any) -> dict:
    """The loss settings of a training config's ``model:`` section, in the bare form."""
    if model is None:
        return {}
    if not isinstance(model, Mapping):
        raise LossConfigError(f"model must be a mapping, got {type(model).__name__}")
    for key in model:
        tip = did_you_mean(key, MODEL_LOSS_KEYS, "model.") if key not in MODEL_LOSS_KEYS else ""
        if tip:  # a loss setting that would otherwise be left to the training script, unread
            raise LossConfigError(
                f"unknown key {'model.' + str(key)!r}{tip} (the loss keys under model: are "
                f"{', '.join(MODEL_LOSS_KEYS)})"
            )
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
        references/train.py reads them; a key under ``model:`` that reads as a misspelt loss key
        (``roi_heads``) is an error. Its other ``model:`` keys and sections (``data:``, ``training:``...)
        are left to the training script, which checks them against its own schema.
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

        from ._yaml import NotUTF8Error, load_yaml_file

        path = os.fspath(path)
        try:
            data = load_yaml_file(path)
        except FileNotFoundError:
            raise LossConfigError(f"loss config file not found: {path}") from None
        except NotUTF8Error as e:
            raise LossConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise LossConfigError(f"{path}: not valid YAML: {e}") from None
        except OSError as e:
            raise LossConfigError(f"loss config {path}: cannot read it: {e.strerror or e}") from None
        try:
            return cls.from_dict(data or {})
        except LossConfigError as e:
            raise LossConfigError(f"{path}: {e}") from None

    @classmethod
    def preset(cls, name: str) -> "LossConfig":
        """A named configuration: ``"torchvision"``, ``"mmdetection"`` or ``"positive"``."""
        return PRESETS[check_choice("preset", name, tuple(PRESETS))]

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

    def flat(self) -> Dict[str, Any]:
        """Every setting by its dotted key (``"roi_head.cls_loss"``, ..., ``"sync_avg_factor"``), as in
        :meth:`to_dict` (lists for tuples)."""
        tree = self.to_dict()
        out = {f"{sec}.{k}": v for sec in ("rpn_head", "roi_head") for k, v in tree[sec].items()}
        out["sync_avg_factor"] = tree["sync_avg_factor"]
        return out

    def changed_keys(self, base: Optional["LossConfig"] = None) -> Dict[str, Any]:
        """The settings that differ from ``base`` (None: the defaults, stock torchvision), dotted key ->
        this config's value, in :meth:`flat`'s order: ``{"roi_head.cls_loss": "focal"}``."""
        old = (base if base is not None else LossConfig()).flat()
        return {k: v for k, v in self.flat().items() if k not in old or old[k] != v}

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
