"""tv_lossfix: configurable, exact-by-default losses for torchvision's two-stage detectors.

import tv_lossfix
model = tv_lossfix.maskrcnn_resnet50_fpn(weights="DEFAULT", num_classes=3, loss_cfg="loss.yaml")
model = tv_lossfix.patch_model(torchvision_model, loss_cfg={"roi_head": {"cls_pos_weight": 2.0}})
"""

from . import cls_losses, losses
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
from .class_agnostic import make_class_agnostic
from .class_weights import class_weights_from_counts
from .config import PRESETS, LossConfig, LossConfigError, RoILossConfig, RPNLossConfig
from .model_settings import apply_model_settings, model_settings
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
    "apply_model_settings",
    "class_weights_from_counts",
    "cls_losses",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "get_loss_cfg",
    "keypointrcnn_resnet50_fpn",
    "losses",
    "make_class_agnostic",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "model_settings",
    "patch_model",
    "training_stats",
]
