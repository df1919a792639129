"""Models the training script builds: every tv_lossfix builder, plus a small CPU demo model."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional

from torch import nn
from torchvision.models import detection as tvdet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

import tv_lossfix


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def maskrcnn_tiny(num_classes: int, image_size: int = 128, **kwargs: Any) -> tvdet.MaskRCNN:
    """A stock torchvision ``MaskRCNN`` scaled for CPU: 4-stage conv backbone (stride 4..32)
    with a 64-channel FPN, a 256-d box head and a 2-conv mask head. Same heads, sampling and
    losses as the ResNet-50 model, about 100x fewer FLOPs."""
    body = nn.Sequential(OrderedDict([
        ("stem", _stage(3, 32)), ("c2", _stage(32, 32)), ("c3", _stage(32, 64)), ("c4", _stage(64, 128)),
    ]))
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
) -> nn.Module:
    """Build ``name`` with tv_lossfix's heads, or torchvision's own when ``stock`` (for A/B runs)."""
    kwargs = dict(kwargs or {})
    if rpn_score_thresh is not None:
        kwargs["rpn_score_thresh"] = rpn_score_thresh
    if name in EXTRA_MODELS:
        if weights or weights_backbone:
            raise ValueError(f"model {name} has no pretrained weights: drop --weights/--weights-backbone")
        model = EXTRA_MODELS[name](num_classes, **kwargs)
        return model if stock else tv_lossfix.patch_model(model, loss_cfg)
    if name not in tv_lossfix.BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    args = dict(weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                trainable_backbone_layers=trainable_backbone_layers, **kwargs)
    if stock:
        if weights is not None:
            raise ValueError("model.stock builds torchvision's own model: it takes no --weights here")
        return getattr(tvdet, name)(**args)
    return tv_lossfix.BUILDERS[name](loss_cfg=loss_cfg, **args)
