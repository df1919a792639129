"""Models the training script builds: every tv_lossfix builder, plus a small CPU demo model.

The checks here run before any data is read: a wrong model name, weights name, an offline
``--weights DEFAULT`` or wrong anchors each end the run in one line.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence
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
from tv_lossfix.builders import is_checkpoint_path, load_checkpoint_state, replace_predictors


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
    losses as the ResNet-50 model, about 100x fewer FLOPs."""
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
    if weights and is_checkpoint_path(weights) and not os.path.isfile(weights):
        raise ModelError(f"--weights: checkpoint not found: {weights}")


# -- anchors ----------------------------------------------------------------------------------------
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
def _tiny_from_checkpoint(path: str, num_classes: int, loss_cfg: Any, stock: bool, kwargs: Dict[str, Any]):
    state = load_checkpoint_state(path)
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise ModelError(f"--weights {path} is not a maskrcnn_tiny checkpoint: it has no {key!r}")
    model = maskrcnn_tiny(state[key].shape[0], **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"--weights {path} does not match maskrcnn_tiny: {str(e).splitlines()[0]}") from None
    replaced = replace_predictors(model, num_classes)
    return (model if stock else tv_lossfix.patch_model(model, loss_cfg)), replaced


def weights_num_classes(name: str, weights: Optional[str]) -> Optional[int]:
    """The class count the pretrained weights or checkpoint were trained with (None: no weights)."""
    if weights is None:
        return None
    if is_checkpoint_path(weights):
        state = load_checkpoint_state(weights)
        w = state.get("roi_heads.box_predictor.cls_score.weight")
        return int(w.shape[0]) if w is not None else None
    member = resolve_weights(name, weights)
    return len(member.meta["categories"]) if member is not None else None


def build_model(
    name: str,
    num_classes: int,
    loss_cfg: Any = None,
    weights: Optional[str] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    rpn_score_thresh: Optional[float] = None,
    stock: bool = False,
    kwargs: Optional[Dict[str, Any]] = None,
) -> tuple:
    """Build ``name`` with tv_lossfix's heads, or torchvision's own when ``stock`` (for A/B runs).

    Returns (model, list of the layers replaced because ``num_classes`` differs from the weights').
    """
    check_model_name(name)
    kwargs = dict(kwargs or {})
    if rpn_score_thresh is not None:
        kwargs["rpn_score_thresh"] = rpn_score_thresh
    if name in EXTRA_MODELS:
        if weights_backbone:
            raise ModelError(f"model {name} has no pretrained backbone: drop --weights-backbone")
        if weights:
            return _tiny_from_checkpoint(weights, num_classes, loss_cfg, stock, kwargs)
        model = EXTRA_MODELS[name](num_classes, **kwargs)
        return (model if stock else tv_lossfix.patch_model(model, loss_cfg)), []
    before = weights_num_classes(name, weights)
    args = dict(
        weights=weights,
        weights_backbone=weights_backbone,
        num_classes=num_classes,
        trainable_backbone_layers=trainable_backbone_layers,
        **kwargs,
    )
    if stock:
        if weights is not None:
            raise ModelError("--stock builds torchvision's own model: it takes no --weights here")
        return getattr(tvdet, name)(**args), []
    model = tv_lossfix.BUILDERS[name](loss_cfg=loss_cfg, **args)
    replaced = []
    if before is not None and before != num_classes:
        replaced.append(f"roi_heads.box_predictor ({before} -> {num_classes} classes)")
        if model.roi_heads.mask_predictor is not None:
            replaced.append("roi_heads.mask_predictor.mask_fcn_logits (mask_predictor.conv5_mask kept)")
    return model, replaced
