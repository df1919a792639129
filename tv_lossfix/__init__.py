"""tv_lossfix: configurable, exact-by-default losses for torchvision's two-stage detectors.

import tv_lossfix
model = tv_lossfix.maskrcnn_resnet50_fpn(weights="DEFAULT", num_classes=3, loss_cfg="loss.yaml")
model = tv_lossfix.patch_model(torchvision_model, loss_cfg={"roi_head": {"cls_pos_weight": 2.0}})
"""

from . import losses
from .builders import (
    BUILDERS,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    keypointrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from .config import PRESETS, LossConfig, LossConfigError, RoILossConfig, RPNLossConfig
from .patch import get_loss_cfg, patch_model, training_stats
from .roi_heads import LossFixRoIHeads
from .rpn import LossFixRPN

__version__ = "0.1.0"

__all__ = [
    "BUILDERS",
    "LossConfig",
    "LossConfigError",
    "LossFixRPN",
    "LossFixRoIHeads",
    "PRESETS",
    "RPNLossConfig",
    "RoILossConfig",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "get_loss_cfg",
    "keypointrcnn_resnet50_fpn",
    "losses",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "patch_model",
    "training_stats",
]
