"""Class-agnostic box regression and masks: one box delta / one mask shared by every class.

MMDetection's ``reg_class_agnostic`` / ``class_agnostic`` and Detectron2's ``CLS_AGNOSTIC_BBOX_REG``
/ ``CLS_AGNOSTIC_MASK``. A rare class then trains the box and mask layers with the samples of
every class instead of its own few. :class:`tv_lossfix.LossFixRoIHeads` tells such predictors from
their output shapes, trains the single slot and returns detections in torchvision's format.
"""

from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

__all__ = [
    "BOX_OUTPUTS",
    "MASK_CHANNELS",
    "is_class_agnostic",
    "state_class_agnostic",
    "contradicted_flag",
    "make_class_agnostic",
    "make_heads_class_agnostic",
    "new_mask_logits",
]

# Outputs per class of each predictor: a class-agnostic one has exactly these, shared by every class.
BOX_OUTPUTS = 4  # box_predictor.bbox_pred: (dx, dy, dw, dh) per class
MASK_CHANNELS = 1  # mask_predictor.mask_fcn_logits: one mask logit channel per class

_STATE_KEYS = {
    "classes": "roi_heads.box_predictor.cls_score.weight",
    "bbox": "roi_heads.box_predictor.bbox_pred.weight",
    "mask": "roi_heads.mask_predictor.mask_fcn_logits.weight",
}


def is_class_agnostic(outputs: int, num_classes: int, per_class: int) -> bool:
    """The one class-agnostic shape rule: a predictor with ``outputs`` values is class-agnostic when it has
    ``per_class`` of them (:data:`BOX_OUTPUTS` for the box regression, :data:`MASK_CHANNELS` for the mask
    logits) for a classifier over more than one class (background alone: both layouts are the same)."""
    return outputs == per_class and num_classes > 1


def state_class_agnostic(state: Dict[str, Tensor]) -> Tuple[bool, bool]:
    """(box regression, mask logits) of a model ``state_dict`` that are class-agnostic; a layer it lacks is not."""
    cls = state.get(_STATE_KEYS["classes"])
    if cls is None:
        return False, False
    box, mask = state.get(_STATE_KEYS["bbox"]), state.get(_STATE_KEYS["mask"])
    return (
        box is not None and is_class_agnostic(box.shape[0], cls.shape[0], BOX_OUTPUTS),
        mask is not None and is_class_agnostic(mask.shape[0], cls.shape[0], MASK_CHANNELS),
    )


def new_mask_logits(in_channels: int, num_channels: int) -> nn.Conv2d:
    """A new 1x1 mask logits layer: Kaiming-normal weights, as torchvision's ``MaskRCNNPredictor``, and a
    zero bias (MaskRCNNPredictor keeps Conv2d's random one, which only offsets a new layer's logits)."""
    layer = nn.Conv2d(in_channels, num_channels, 1)
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


def _heads(model: nn.Module) -> nn.Module:
    from .roi_heads import LossFixRoIHeads  # here: roi_heads imports the shape rule above

    target = getattr(model, "module", model)  # DDP / DataParallel
    heads = getattr(target, "roi_heads", None)
    if not isinstance(heads, LossFixRoIHeads):
        raise TypeError(
            "make_class_agnostic needs tv_lossfix's heads (torchvision's RoIHeads only handles class-specific "
            f"predictors): call tv_lossfix.patch_model(model) first; got {type(heads).__name__} as model.roi_heads"
        )
    return heads


def _bbox_layer(heads: nn.Module) -> nn.Linear:
    pred = heads.box_predictor
    old, cls_score = getattr(pred, "bbox_pred", None), getattr(pred, "cls_score", None)
    if not isinstance(old, nn.Linear) or not isinstance(cls_score, nn.Linear):
        raise TypeError(
            f"make_class_agnostic(bbox=True): roi_heads.box_predictor is a {type(pred).__name__} without "
            "torchvision's cls_score / bbox_pred Linear layers; make its box output 4 values yourself"
        )
    return old


def _mask_layer(heads: nn.Module) -> nn.Conv2d:
    pred = heads.mask_predictor
    if pred is None:
        raise TypeError("make_class_agnostic(mask=True): the model has no mask branch: pass mask=False")
    old = getattr(pred, "mask_fcn_logits", None)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(
            f"make_class_agnostic(mask=True): roi_heads.mask_predictor is a {type(pred).__name__} without "
            "torchvision's mask_fcn_logits layer; make its output 1 channel yourself"
        )
    return old


def _agnostic_bbox(heads: nn.Module, old: nn.Linear) -> Optional[str]:
    if is_class_agnostic(old.out_features, heads.box_predictor.cls_score.out_features, BOX_OUTPUTS):
        return None  # already class-agnostic: kept
    # torchvision's FastRCNNPredictor keeps nn.Linear's own initialisation.
    heads.box_predictor.bbox_pred = nn.Linear(old.in_features, BOX_OUTPUTS).to(old.weight.device, old.weight.dtype)
    return (
        f"roi_heads.box_predictor.bbox_pred ({old.out_features} -> {BOX_OUTPUTS} outputs: class-agnostic, "
        "one box for every class)"
    )


def _agnostic_mask(heads: nn.Module, old: nn.Conv2d) -> Optional[str]:
    # A 1-channel layer is kept even for one class: it is already the layout asked for.
    if old.out_channels == MASK_CHANNELS:
        return None  # already class-agnostic: kept
    layer = new_mask_logits(old.in_channels, MASK_CHANNELS).to(old.weight.device, old.weight.dtype)
    heads.mask_predictor.mask_fcn_logits = layer
    return (
        f"roi_heads.mask_predictor.mask_fcn_logits ({old.out_channels} -> 1 channel: class-agnostic; "
        "mask_predictor.conv5_mask kept)"
    )


def make_heads_class_agnostic(heads: nn.Module, bbox: bool, mask: bool) -> List[str]:
    """:func:`make_class_agnostic` on a ``RoIHeads`` of any class (the builders use it before patching)."""
    # Every check before any change: a refused call leaves the model as it was.
    bbox_layer = _bbox_layer(heads) if bbox else None
    mask_layer = _mask_layer(heads) if mask else None
    lines = [
        _agnostic_bbox(heads, bbox_layer) if bbox_layer is not None else None,
        _agnostic_mask(heads, mask_layer) if mask_layer is not None else None,
    ]
    return [line for line in lines if line is not None]


def contradicted_flag(found: Tuple[bool, bool], asked: Tuple[bool, bool]) -> Optional[str]:
    """``"class_agnostic_bbox"`` / ``"class_agnostic_mask"``: the first layer a checkpoint has
    class-agnostic (``found``, from :func:`state_class_agnostic`) that the caller did not ask for
    (``asked``); None when the checkpoint loads as asked."""
    for flag, have, want in zip(("class_agnostic_bbox", "class_agnostic_mask"), found, asked):
        if have and not want:
            return flag
    return None


def make_class_agnostic(model: nn.Module, bbox: bool = True, mask: bool = True) -> List[str]:
    """Make the box regression and/or the mask logits of a patched model class-agnostic, in place.

    ``bbox``: ``roi_heads.box_predictor.bbox_pred`` becomes a 4-output layer (one delta per RoI,
    used for whatever class it is scored as). ``mask``: ``roi_heads.mask_predictor.mask_fcn_logits``
    becomes a 1-channel layer; the upsampling ``conv5_mask`` before it is kept. The new layers are
    initialised as torchvision's predictors initialise theirs; every other weight is untouched, so
    this is how a model loaded from a class-specific checkpoint is fine-tuned class-agnostic.
    A layer that is already class-agnostic is kept as it is (and not listed).

    Args:
        model: a Faster / Mask R-CNN patched by :func:`tv_lossfix.patch_model` (or built by a
            tv_lossfix builder), possibly wrapped by ``DistributedDataParallel``.
        bbox: make the box regression class-agnostic.
        mask: make the mask logits class-agnostic; a model without a mask branch (Faster R-CNN)
            raises TypeError: pass ``mask=False``.

    Returns:
        One line per re-initialised layer, naming it and its old and new output count.
    """
    return make_heads_class_agnostic(_heads(model), bbox, mask)
