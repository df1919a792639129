"""The box classifier layers the long-tail losses use: Seesaw's objectness logit and a cosine classifier.

* ``roi_head.cls_loss: seesaw`` needs MMDetection's ``C + 2`` classifier outputs: the classes and an
  ``[object, background]`` pair. torchvision's ``cls_score`` keeps its ``K + 1`` outputs (background
  first, so every checkpoint and class count reads as before) and one ``cls_objectness`` layer adds
  the object logit: :class:`SeesawPredictor` returns ``[background, class 1..K, object]``.
* ``roi_head.cosine_classifier``: ``cls_score`` (with Seesaw also ``cls_objectness``: MMDetection's
  ``NormedLinear`` is its whole ``C + 2`` output layer) becomes a :class:`NormedLinear`, MMDetection's
  cosine classifier (``temperature * cos(feature, class weight)`` + bias, temperature 20). Its
  parameters are ``nn.Linear``'s (same ``state_dict`` keys and shapes), so the conversion keeps the
  weights either way.

:func:`prepare_classifier` gives the box predictor what a config asks for and says what it changed,
one line per layer (``patch_model`` logs them; the builders list them in their report).
"""

import logging
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from ._checks import LossConfigError
from .cls_losses import registered

__all__ = ["NormedLinear", "SeesawPredictor", "prepare_classifier", "split_extra_state", "load_extra_state"]

_LOG = logging.getLogger(__name__)
# state_dict keys that only the long-tail classifiers have (a stock model built to load a checkpoint lacks them).
EXTRA_STATE_PREFIXES = ("roi_heads.box_predictor.cls_objectness.", "roi_heads.cls_criterion.")


class NormedLinear(nn.Linear):
    """MMDetection's ``NormedLinear``: ``temperature * (x / (|x| + eps)) @ (W / (|W_row| + eps)).T + b``."""

    temperature: float
    eps: float

    def __init__(self, in_features: int, out_features: int, temperature: float = 20.0, eps: float = 1e-6) -> None:
        super().__init__(in_features, out_features)
        self.temperature, self.eps = float(temperature), float(eps)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight / (torch.linalg.vector_norm(self.weight, 2.0, [1], True) + self.eps)
        x = x / (torch.linalg.vector_norm(x, 2.0, [1], True) + self.eps)
        return F.linear(x * self.temperature, weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature}"


class SeesawPredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` plus ``cls_objectness``: class logits ``[bg, 1..K, object]``."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.dim() == 4:
            torch._assert(
                list(x.shape[2:]) == [1, 1], "x has the wrong shape, expecting the last two dimensions [1, 1]"
            )
        x = x.flatten(start_dim=1)
        return torch.cat([self.cls_score(x), self.cls_objectness(x)], dim=1), self.bbox_pred(x)


def _check_predictor(heads: nn.Module, what: str) -> None:
    pred = heads.box_predictor
    if not isinstance(getattr(pred, "cls_score", None), nn.Linear) or not isinstance(pred, FastRCNNPredictor):
        raise LossConfigError(
            f"{what} replaces layers of torchvision's FastRCNNPredictor, but roi_heads.box_predictor is a "
            f"{type(pred).__name__}: give it the outputs yourself and keep the defaults"
        )


def _set_cosine(layer: nn.Linear, where: str, cosine: bool, temperature: float) -> List[str]:
    """Convert ``layer`` in place to / from :class:`NormedLinear` (weights kept); one line per change."""
    if cosine and not isinstance(layer, NormedLinear):
        layer.__class__ = NormedLinear
        layer.eps = 1e-6
        layer.temperature = temperature
        return [f"{where}: Linear -> NormedLinear (cosine, temperature {temperature:g}; weights kept)"]
    if cosine and layer.temperature != temperature:
        line = f"{where}: NormedLinear temperature {layer.temperature:g} -> {temperature:g}"
        layer.temperature = temperature
        return [line]
    if not cosine and isinstance(layer, NormedLinear):
        layer.__class__ = nn.Linear
        del layer.temperature, layer.eps
        return [f"{where}: NormedLinear -> Linear (weights kept)"]
    return []


def _extra_outputs(cfg) -> int:
    """The classifier outputs beyond the classes that ``cfg.cls_loss`` reads (its registration's)."""
    return registered("roi_head", cfg.cls_loss).extra_outputs


def check_classifier(heads: nn.Module, cfg) -> None:
    """Raise (nothing changed) if ``cfg`` (a RoILossConfig) needs layers the model's predictor lacks."""
    pred = heads.box_predictor
    have = pred.cls_objectness.out_features if isinstance(pred, SeesawPredictor) else 0
    if _extra_outputs(cfg) != have:
        _check_predictor(heads, f"roi_head.cls_loss: {cfg.cls_loss}")
    if cfg.cosine_classifier:
        _check_predictor(heads, "roi_head.cosine_classifier")


def prepare_classifier(heads: nn.Module, cfg) -> List[str]:
    """Give ``heads.box_predictor`` the layers ``cfg`` (a RoILossConfig) needs, in place; one line per change.

    Seesaw adds ``cls_objectness`` (``nn.Linear(in, 1)``, torchvision's initialisation) to a
    ``FastRCNNPredictor``; another loss removes it. The cosine classifier converts ``cls_score`` (and
    Seesaw's ``cls_objectness``) to a :class:`NormedLinear` and back (weights kept). Nothing changes
    when the predictor already fits.
    """
    check_classifier(heads, cfg)
    lines: List[str] = []
    pred = heads.box_predictor
    extra = _extra_outputs(cfg)
    have = pred.cls_objectness.out_features if isinstance(pred, SeesawPredictor) else 0
    if have and have != extra:
        del pred.cls_objectness
        pred.__class__ = FastRCNNPredictor
        lines.append(
            f"roi_heads.box_predictor.cls_objectness removed (roi_head.cls_loss {cfg.cls_loss} reads no such output)"
        )
    if extra and have != extra:
        layer = pred.cls_score
        pred.__class__ = SeesawPredictor
        pred.cls_objectness = nn.Linear(layer.in_features, extra).to(layer.weight.device, layer.weight.dtype)
        lines.append(
            f"roi_heads.box_predictor.cls_objectness (new, {extra} output(s) roi_head.cls_loss {cfg.cls_loss} reads "
            f"beyond the classes, e.g. Seesaw's object logit; the classifier now returns "
            f"{layer.out_features + extra} logits: background, {layer.out_features - 1} classes, then these)"
        )
    temperature = 20.0 if cfg.cosine_temperature is None else float(cfg.cosine_temperature)
    # MMDetection's cosine classifier is its whole fc_cls: with Seesaw that is the C + 2 outputs, the
    # objectness pair included, so cls_objectness is converted with cls_score (a plain object logit
    # beside a cosine background logit would put the two on different scales).
    for name in ("cls_score", "cls_objectness"):
        layer = getattr(pred, name, None)
        if isinstance(layer, nn.Linear):
            lines.extend(_set_cosine(layer, "roi_heads.box_predictor." + name, cfg.cosine_classifier, temperature))
    return lines


def split_extra_state(state: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """(the stock model's keys, the long-tail classifier's: ``cls_objectness``, the loss statistics)."""
    extra = {k: v for k, v in state.items() if k.startswith(EXTRA_STATE_PREFIXES)}
    return {k: v for k, v in state.items() if k not in extra}, extra


def load_extra_state(model: nn.Module, extra: Dict[str, Tensor], where: str) -> List[str]:
    """Load the keys :func:`split_extra_state` set aside into a patched model; one line per key it has no
    use for (the checkpoint trained another ``roi_head.cls_loss``), and none for the ones loaded."""
    target = getattr(model, "module", model)
    own = target.state_dict()
    fits = {k: v for k, v in extra.items() if k in own and own[k].shape == v.shape}
    if fits:
        target.load_state_dict(fits, strict=False)
    lines = []
    for k, v in extra.items():
        if k in fits:
            continue
        why = (
            f"shape {list(v.shape)}, here {list(own[k].shape)}: another class count"
            if k in own
            else f"roi_head.cls_loss {target.roi_heads.cls_loss!r} has no use for it"
        )
        lines.append(f"{where}: {k} not loaded ({why})")
    for line in lines:
        _LOG.info(line)
    return lines
