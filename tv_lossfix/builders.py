"""Builders with torchvision's signatures plus ``loss_cfg``.

Each one calls torchvision's builder of the same name and then :func:`patch_model`. Two
fine-tuning steps torchvision leaves to the user are done here:

* ``weights`` with a ``num_classes`` (or ``num_keypoints``) other than the weights' own loads the
  pretrained model and replaces the predictors, as torchvision's fine-tuning tutorial does by hand
  (torchvision's builders raise a ValueError instead);
* ``weights`` may be the path of a local checkpoint: a ``state_dict`` saved from the same
  architecture, or a training checkpoint with it under ``"model"``.

An unknown keyword argument is a TypeError; torchvision's builders silently ignore it.
"""

import inspect
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights
from torchvision.models import detection as tvdet
from torchvision.models.detection.backbone_utils import _validate_trainable_layers
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from ._suggest import did_you_mean
from .checkpoint import CheckpointError, model_state_dict, read_checkpoint
from .config import LossConfig
from .patch import patch_model

__all__ = [
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "keypointrcnn_resnet50_fpn",
    "BUILDERS",
    "is_checkpoint_path",
    "load_checkpoint_state",
    "replace_predictors",
]

# Keywords the transform accepts besides the model class's named parameters.
_TRANSFORM_KWARGS = {
    n for n in inspect.signature(GeneralizedRCNNTransform.__init__).parameters if n not in ("self", "kwargs")
} | {"_skip_resize"}


def _check_kwargs(name: str, model_cls: type, kwargs: Dict[str, Any]) -> None:
    allowed = {
        n
        for n in inspect.signature(model_cls.__init__).parameters
        if n not in ("self", "backbone", "num_classes", "kwargs")
    } | _TRANSFORM_KWARGS
    for key in kwargs:
        if key not in allowed:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}{did_you_mean(key, allowed)}")


def is_checkpoint_path(weights: Any) -> bool:
    """Whether ``weights`` names a local checkpoint file rather than torchvision weights."""
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    return os.path.exists(weights) or os.sep in weights or weights.endswith((".pt", ".pth", ".ckpt"))


def load_checkpoint_state(path: Any) -> Dict[str, torch.Tensor]:
    """The model ``state_dict`` in a file: a bare state_dict or a training checkpoint's ``"model"``."""
    if not os.path.isfile(os.fspath(path)):
        raise FileNotFoundError(f"weights checkpoint not found: {os.fspath(path)}")
    return model_state_dict(read_checkpoint(path, "weights"), path, "weights")


def _shape_of(state: Dict[str, torch.Tensor], key: str, path: Any, name: str) -> Tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{os.fspath(path)} is not a {name} checkpoint: it has no {key!r}")
    return tuple(state[key].shape)


def _match_norm_layers(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    # Pretrained torchvision detectors use FrozenBatchNorm2d (no num_batches_tracked); models built
    # with weights=None use BatchNorm2d. Convert where the checkpoint says the layer was frozen.
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d and f"{name}.weight" in state and f"{name}.num_batches_tracked" not in state:
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, frozen)


def _freeze_backbone(model: nn.Module, trainable_layers: int) -> None:
    # Same layers frozen as torchvision's builders freeze for weights=... (is_trained).
    body = model.backbone.body
    if hasattr(body, "layer4"):  # ResNet
        layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            layers.append("bn1")
        for pname, p in body.named_parameters():
            if not any(pname.startswith(layer) for layer in layers):
                p.requires_grad_(False)
    else:  # MobileNetV3 features
        blocks = list(body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        freeze_before = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        for b in blocks[:freeze_before]:
            b.requires_grad_(False)


def replace_predictors(model: nn.Module, num_classes: Optional[int], num_keypoints: Optional[int] = None) -> List[str]:
    """Replace the layers that depend on the class (keypoint) count; returns what was replaced."""
    heads = model.roi_heads
    replaced: List[str] = []
    old_classes = heads.box_predictor.cls_score.out_features
    if num_classes is not None and num_classes != old_classes:
        heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
        replaced.append(f"roi_heads.box_predictor ({old_classes} -> {num_classes} classes)")
        if heads.mask_predictor is not None:
            # Only the per-class 1x1 logits layer depends on num_classes; the pretrained
            # class-agnostic upsampling (conv5_mask) is kept. Init as MaskRCNNPredictor's.
            old = heads.mask_predictor.mask_fcn_logits
            new = nn.Conv2d(old.in_channels, num_classes, 1)
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(new.bias)
            heads.mask_predictor.mask_fcn_logits = new
            replaced.append("roi_heads.mask_predictor.mask_fcn_logits (mask_predictor.conv5_mask kept)")
    if num_keypoints is not None and heads.keypoint_predictor is not None:
        old = heads.keypoint_predictor.kps_score_lowres
        if num_keypoints != old.out_channels:
            heads.keypoint_predictor = KeypointRCNNPredictor(old.in_channels, num_keypoints)
            replaced.append(f"roi_heads.keypoint_predictor ({old.out_channels} -> {num_keypoints} keypoints)")
    return replaced


def _build(
    name: str,
    model_cls: type,
    max_trainable: int,
    weights: Any,
    progress: bool,
    num_classes: Optional[int],
    weights_backbone: Any,
    trainable_backbone_layers: Optional[int],
    loss_cfg: Any,
    kwargs: Dict[str, Any],
    num_keypoints: Optional[int] = None,
) -> nn.Module:
    _check_kwargs(name, model_cls, kwargs)
    cfg = LossConfig.coerce(loss_cfg)  # fail on a bad config before building anything
    tv_builder: Callable[..., nn.Module] = getattr(tvdet, name)
    extra = {"num_keypoints": None} if model_cls is tvdet.KeypointRCNN else {}

    if is_checkpoint_path(weights):
        state = load_checkpoint_state(weights)
        ckpt_classes = _shape_of(state, "roi_heads.box_predictor.cls_score.weight", weights, name)[0]
        if extra:
            extra["num_keypoints"] = _shape_of(
                state, "roi_heads.keypoint_predictor.kps_score_lowres.weight", weights, name
            )[1]
        model = tv_builder(
            weights=None, progress=progress, num_classes=ckpt_classes, weights_backbone=None, **extra, **kwargs
        )
        _match_norm_layers(model, state)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{os.fspath(weights)} does not match {name}: {e}") from None
        _freeze_backbone(model, _validate_trainable_layers(True, trainable_backbone_layers, max_trainable, 3))
        replace_predictors(model, num_classes, num_keypoints)
    elif weights is not None:
        # torchvision loads the weights at their own class count; the predictors are replaced after.
        model = tv_builder(
            weights=weights,
            progress=progress,
            num_classes=None,
            weights_backbone=weights_backbone,
            trainable_backbone_layers=trainable_backbone_layers,
            **extra,
            **kwargs,
        )
        replace_predictors(model, num_classes, num_keypoints)
    else:
        if extra:
            extra["num_keypoints"] = num_keypoints
        model = tv_builder(
            weights=None,
            progress=progress,
            num_classes=num_classes,
            weights_backbone=weights_backbone,
            trainable_backbone_layers=trainable_backbone_layers,
            **extra,
            **kwargs,
        )
    return patch_model(model, cfg)


_ARGS_DOC = """
    Args:
        weights: pretrained weights, as for torchvision (an enum member, ``"DEFAULT"`` or a name),
            or the path of a local checkpoint of the same architecture. Default: None.
        progress: show a download progress bar. Default: True.
        num_classes: number of classes including background. With ``weights``, a different value
            keeps the pretrained body and replaces the box predictor{mask}.
        weights_backbone: pretrained backbone weights, as for torchvision. Default: {wb}.
        trainable_backbone_layers: backbone stages left trainable (0 to {maxl}); with pretrained
            weights or a checkpoint the default is 3, otherwise all.{kp}
        loss_cfg: a :class:`tv_lossfix.LossConfig`, dict, preset name (``"torchvision"``,
            ``"mmdetection"``, ``"positive"``) or YAML path. Default: torchvision's losses.
        **kwargs: the parameters of ``torchvision.models.detection.{cls}`` (``min_size``,
            ``box_score_thresh``, ``rpn_batch_size_per_image``...). Unknown names raise TypeError.

    Returns:
        A ``torchvision.models.detection.{cls}`` whose ``rpn`` and ``roi_heads`` are tv_lossfix's.
"""


def _doc(summary: str, cls: str, wb: str, maxl: int, mask: bool = False, kp: bool = False) -> str:
    kp_doc = (
        "\n        num_keypoints: keypoints per instance; with ``weights``, a different value replaces"
        "\n            the keypoint predictor. Default: 17 (COCO)."
        if kp
        else ""
    )
    return (
        summary
        + "\n"
        + _ARGS_DOC.format(mask=" and the mask logits layer" if mask else "", wb=wb, maxl=maxl, kp=kp_doc, cls=cls)
    )


def maskrcnn_resnet50_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = ResNet50_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    **kwargs: Any,
) -> tvdet.MaskRCNN:
    return _build(
        "maskrcnn_resnet50_fpn",
        tvdet.MaskRCNN,
        5,
        weights,
        progress,
        num_classes,
        weights_backbone,
        trainable_backbone_layers,
        loss_cfg,
        kwargs,
    )


def maskrcnn_resnet50_fpn_v2(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    **kwargs: Any,
) -> tvdet.MaskRCNN:
    return _build(
        "maskrcnn_resnet50_fpn_v2",
        tvdet.MaskRCNN,
        5,
        weights,
        progress,
        num_classes,
        weights_backbone,
        trainable_backbone_layers,
        loss_cfg,
        kwargs,
    )


def fasterrcnn_resnet50_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = ResNet50_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    **kwargs: Any,
) -> tvdet.FasterRCNN:
    return _build(
        "fasterrcnn_resnet50_fpn",
        tvdet.FasterRCNN,
        5,
        weights,
        progress,
        num_classes,
        weights_backbone,
        trainable_backbone_layers,
        loss_cfg,
        kwargs,
    )


def fasterrcnn_resnet50_fpn_v2(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    **kwargs: Any,
) -> tvdet.FasterRCNN:
    return _build(
        "fasterrcnn_resnet50_fpn_v2",
        tvdet.FasterRCNN,
        5,
        weights,
        progress,
        num_classes,
        weights_backbone,
        trainable_backbone_layers,
        loss_cfg,
        kwargs,
    )


def fasterrcnn_mobilenet_v3_large_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    **kwargs: Any,
) -> tvdet.FasterRCNN:
    return _build(
        "fasterrcnn_mobilenet_v3_large_fpn",
        tvdet.FasterRCNN,
        6,
        weights,
        progress,
        num_classes,
        weights_backbone,
        trainable_backbone_layers,
        loss_cfg,
        kwargs,
    )


def fasterrcnn_mobilenet_v3_large_320_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Any = MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    **kwargs: Any,
) -> tvdet.FasterRCNN:
    return _build(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        tvdet.FasterRCNN,
        6,
        weights,
        progress,
        num_classes,
        weights_backbone,
        trainable_backbone_layers,
        loss_cfg,
        kwargs,
    )


def keypointrcnn_resnet50_fpn(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    num_keypoints: Optional[int] = None,
    weights_backbone: Any = ResNet50_Weights.IMAGENET1K_V1,
    trainable_backbone_layers: Optional[int] = None,
    loss_cfg: Any = None,
    **kwargs: Any,
) -> tvdet.KeypointRCNN:
    return _build(
        "keypointrcnn_resnet50_fpn",
        tvdet.KeypointRCNN,
        5,
        weights,
        progress,
        num_classes,
        weights_backbone,
        trainable_backbone_layers,
        loss_cfg,
        kwargs,
        num_keypoints=num_keypoints,
    )


maskrcnn_resnet50_fpn.__doc__ = _doc(
    "Mask R-CNN, ResNet-50-FPN backbone, with configurable losses.",
    "MaskRCNN",
    "``ResNet50_Weights.IMAGENET1K_V1``",
    5,
    mask=True,
)
maskrcnn_resnet50_fpn_v2.__doc__ = _doc(
    "Mask R-CNN v2 (improved recipe, arXiv:2111.11429), with configurable losses.", "MaskRCNN", "None", 5, mask=True
)
fasterrcnn_resnet50_fpn.__doc__ = _doc(
    "Faster R-CNN, ResNet-50-FPN backbone, with configurable losses.",
    "FasterRCNN",
    "``ResNet50_Weights.IMAGENET1K_V1``",
    5,
)
fasterrcnn_resnet50_fpn_v2.__doc__ = _doc(
    "Faster R-CNN v2 (improved recipe), with configurable losses.", "FasterRCNN", "None", 5
)
fasterrcnn_mobilenet_v3_large_fpn.__doc__ = _doc(
    "Faster R-CNN, MobileNetV3-Large FPN, with configurable losses.",
    "FasterRCNN",
    "``MobileNet_V3_Large_Weights.IMAGENET1K_V1``",
    6,
)
fasterrcnn_mobilenet_v3_large_320_fpn.__doc__ = _doc(
    "Faster R-CNN, MobileNetV3-Large FPN tuned for 320px mobile inputs, with configurable losses.",
    "FasterRCNN",
    "``MobileNet_V3_Large_Weights.IMAGENET1K_V1``",
    6,
)
keypointrcnn_resnet50_fpn.__doc__ = _doc(
    "Keypoint R-CNN, ResNet-50-FPN backbone, with configurable losses.",
    "KeypointRCNN",
    "``ResNet50_Weights.IMAGENET1K_V1``",
    5,
    kp=True,
)

BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (
        maskrcnn_resnet50_fpn,
        maskrcnn_resnet50_fpn_v2,
        fasterrcnn_resnet50_fpn,
        fasterrcnn_resnet50_fpn_v2,
        fasterrcnn_mobilenet_v3_large_fpn,
        fasterrcnn_mobilenet_v3_large_320_fpn,
        keypointrcnn_resnet50_fpn,
    )
}
