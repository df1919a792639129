"""The training config's rules: every value checked, derived values filled in, and every rule across keys
run in one step (:func:`validate`) before any data is read. A key's own range and the mode that reads it
are declared on its :func:`config_schema.setting`; the rules here involve more than one key."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Dict, Optional, Sequence, Tuple

from tv_lossfix import LossConfig, LossConfigError
from tv_lossfix._suggest import did_you_mean

from config_schema import (
    OPTIONS,
    TORCHVISION_COCO_PATH,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainingConfig,
    check_value,
    defaults_tree,
    from_tree,
    get_path,
    key_named,
    set_path,
)


def defaults() -> TrainConfig:
    """The default config, validated."""
    return finalize(defaults_tree())[0]


def finalize(
    tree: Dict[str, Any], source: str = "config", reads: Optional[Sequence[str]] = None
) -> Tuple[TrainConfig, LossConfig]:
    """A nested dict of values (defaults < YAML < flags) -> the frozen, validated config and its loss config."""
    tree = copy.deepcopy(tree)
    for o in OPTIONS:
        set_path(tree, o.path, check_value(o, get_path(tree, o.path), source))
    _fill_derived(tree, source)
    cfg = from_tree(TrainConfig, tree)
    return cfg, validate(cfg, source, reads)


def _fill_derived(tree: Dict[str, Any], source: str) -> None:
    """Values that follow from others, set before the config is frozen: --clip-grad-norm over the YAML
    section, the per-dataset defaults of --bad-annotations and --data-path."""
    t, d = tree["training"], tree["data"]
    if t["clip_grad_norm"] is not None:  # (a negative one fails its range in validate)
        t["gradient_clip"]["enabled"] = t["clip_grad_norm"] > 0
        if t["clip_grad_norm"] > 0:
            t["gradient_clip"]["max_norm"] = t["clip_grad_norm"]
    if d["bad_annotations"] is None:
        d["bad_annotations"] = "drop" if d["dataset"] in ("coco", "coco_kp") else "stop"
    if d["data_path"] is None:
        d["data_path"] = "data" if d["dataset"] == "shapes" else TORCHVISION_COCO_PATH
    d["tile_overlap"] = check_tile_keys(d["tile_size"], d["tile_overlap"], d["tile_whole_image"], source)


# -- every rule across fields, before any data is read -----------------------------------------------
def validate(cfg: TrainConfig, source: str = "config", reads: Optional[Sequence[str]] = None) -> LossConfig:
    """Check every rule that involves more than one field; returns the loss config the model keys give."""
    _check_ranges(cfg, source)
    _check_only_with(cfg, source)
    _check_training(cfg.training, source)
    _check_repeat_factors(cfg.data, source)
    _check_data(cfg, source, reads)
    _check_model_and_data(cfg)
    _check_anchors(cfg.model, source)
    _check_tiles_for_model(cfg, source)
    _check_class_weight_keys(cfg.model, source)
    loss_cfg = _loss_config(cfg.model, source)
    _check_stock(cfg.model, loss_cfg, source)
    _check_class_weight_length(cfg)
    return loss_cfg


def _check_only_with(cfg: TrainConfig, source: str) -> None:
    """A key that one mode alone reads (Opt.only_with), set under another mode, cannot take effect."""
    for o in OPTIONS:
        if o.only_with is None:
            continue
        read, why = o.only_with
        v = cfg.get(o.path)
        if v != o.default and v != o.off and not read(cfg):
            raise ConfigError(f"{key_named(o, source)} = {v!r} has no effect: {why}")


def _check_ranges(cfg: TrainConfig, source: str) -> None:
    """A numeric value out of its key's range (Opt.range) fails, naming the key and its flag."""
    for o in OPTIONS:
        v = cfg.get(o.path)
        if o.range is not None and v is not None and not o.range[0](v):
            raise ConfigError(f"{key_named(o, source)} must be {o.range[1]}, got {v!r}")


def _check_training(t: TrainingConfig, source: str) -> None:
    if t.start_epoch >= t.epochs and not t.test_only and not t.resume:
        raise ConfigError(
            f"{source}: training.start_epoch (--start-epoch) {t.start_epoch} is not below training.epochs "
            f"(--epochs) {t.epochs}: no epoch would be trained"
        )
    try:
        import torch

        torch.device(t.device)
    except RuntimeError:
        raise ConfigError(f"--device {t.device!r} is not a torch device: use cuda, cuda:N or cpu") from None


def _check_repeat_factors(d: DataConfig, source: str) -> None:
    t = d.repeat_factor_threshold
    if t is None and not d.repeat_sqrt:
        raise ConfigError(
            f"{source}: data.repeat_sqrt false (--no-repeat-sqrt) has no effect without "
            f"data.repeat_factor_threshold (--repeat-factor-threshold T)"
        )


def _check_data(cfg: TrainConfig, source: str, reads: Optional[Sequence[str]]) -> None:
    d = cfg.data
    if d.dataset == "coco_json":
        keys = ("train_ann", "train_images", "val_ann", "val_images")
        missing = [f"--{k.replace('_', '-')}" for k in keys if not getattr(d, k)]
        if cfg.training.test_only:
            missing = [m for m in missing if m.startswith("--val")]
        if reads is not None:
            missing = [m for m in missing if m[2:].replace("-", "_") in reads]
        if missing:
            raise ConfigError(f"--dataset coco_json needs {', '.join(missing)} (data.train_ann ...)")
    if d.backend == "tv_tensor" and not d.use_v2:
        raise ConfigError("--backend tv_tensor needs --use-v2 (as in torchvision's script)")
    if d.use_copypaste and d.augmentation != "lsj":
        raise ConfigError(
            f"--use-copypaste works with --data-augmentation lsj only (as in torchvision), got {d.augmentation!r}"
        )
    if d.shapes:
        shapes_spec(d, source)  # a misspelt knob first: the more precise error
        if d.dataset != "shapes":
            raise ConfigError(
                f"{source}: data.shapes sets the embedded demo's data: it has no effect with --dataset {d.dataset}"
            )
    files = [
        f"--{k.replace('_', '-')}" for k in ("train_ann", "train_images", "val_ann", "val_images") if getattr(d, k)
    ]
    if files and d.dataset != "coco_json":
        raise ConfigError(
            f"{', '.join(files)} (data.{files[0][2:].replace('-', '_')} ...) are read with --dataset coco_json only; "
            f"--dataset {d.dataset} finds its files "
            + ("under --data-path" if d.dataset != "shapes" else "itself (data.shapes)")
        )


def shapes_spec(d: DataConfig, source: str = "config"):
    """``data.shapes`` as a references/shapes.py ShapesSpec; an unknown or bad knob is a ConfigError."""
    from shapes import ShapesSpec

    known = {f.name for f in dataclasses.fields(ShapesSpec)}
    for k in d.shapes:
        if k not in known:
            raise ConfigError(f"{source}: unknown key 'data.shapes.{k}'{did_you_mean(k, known, 'data.shapes.')}")
    try:
        return ShapesSpec(**d.shapes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: data.{e}") from None


def _check_model_and_data(cfg: TrainConfig) -> None:
    m, d = cfg.model, cfg.data
    if "keypoint" in m.name and d.dataset == "coco":
        raise ConfigError("--model keypointrcnn_* trains on keypoints: use --dataset coco_kp (as torchvision says)")
    if "keypoint" not in m.name and d.dataset == "coco_kp":
        raise ConfigError(f"--dataset coco_kp is for keypoint models; {m.name} uses --dataset coco")
    if d.use_copypaste and "maskrcnn" not in m.name:
        raise ConfigError("--use-copypaste pastes instance masks: it needs a Mask R-CNN model")
    check_class_agnostic(m.name, m.stock, m.class_agnostic_bbox, m.class_agnostic_mask)
    if m.weights and m.weights_backbone:  # torchvision's builders drop the backbone weights silently
        raise ConfigError(
            f"--weights-backbone {m.weights_backbone} has no effect with --weights {m.weights}, which holds the "
            f"backbone too: drop one"
        )
    top = 6 if "mobilenet" in m.name else 5  # torchvision's backbones: MobileNetV3 has 6 stages, ResNet 5
    if m.trainable_backbone_layers is not None and not 0 <= m.trainable_backbone_layers <= top:
        raise ConfigError(
            f"--trainable-backbone-layers (model.trainable_backbone_layers) must be in 0..{top} for {m.name}, "
            f"got {m.trainable_backbone_layers}"
        )
    if m.trainable_backbone_layers is not None and (m.name == "maskrcnn_tiny" or not (m.weights or m.weights_backbone)):
        why = (
            "maskrcnn_tiny trains its whole backbone"
            if m.name == "maskrcnn_tiny"
            else "without --weights or --weights-backbone every layer trains (torchvision falls back to 5)"
        )
        raise ConfigError(f"--trainable-backbone-layers {m.trainable_backbone_layers} has no effect: {why}")


def check_class_agnostic(name: str, stock: bool, bbox: bool, mask: bool) -> None:
    """The class-agnostic keys need tv_lossfix's heads, and a mask branch for ``mask`` (models.build_model
    applies this rule too)."""
    if (bbox or mask) and stock:
        raise ConfigError(
            "model.class_agnostic_bbox / class_agnostic_mask need tv_lossfix's heads (torchvision's own pick the "
            "box and mask outputs by class): drop --stock"
        )
    if mask and "maskrcnn" not in name:
        raise ConfigError(f"model.class_agnostic_mask: --model {name} has no mask branch: drop it")


def _check_anchors(m: ModelConfig, source: str) -> None:
    for name in ("anchor_sizes", "aspect_ratios"):
        v = getattr(m, name)
        ok = v is None or (
            isinstance(v, list)
            and v
            and all(
                isinstance(row, list)
                and row
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in row)
                for row in v
            )
        )
        if not ok:
            raise ConfigError(
                f"{source}: model.{name} must be a list of non-empty lists of positive numbers "
                f"(one list per feature map), got {v!r}"
            )


def check_tile_keys(tile_size: Optional[int], overlap: Optional[int], whole_image: bool, source: str) -> Optional[int]:
    """The tile keys' rules, before any data is read; returns the overlap to use (its default filled in)."""
    from tiles import MIN_TILE, OVERLAP_FRACTION

    if tile_size is None:
        if overlap is not None:
            raise ConfigError(f"{source}: data.tile_overlap (--tile-overlap) has no effect without data.tile_size")
        if not whole_image:
            raise ConfigError(f"{source}: data.tile_whole_image false has no effect without data.tile_size")
        return None
    if tile_size < MIN_TILE:
        raise ConfigError(f"{source}: data.tile_size (--tile-size) must be >= {MIN_TILE} px, got {tile_size}")
    if overlap is None:
        return int(round(OVERLAP_FRACTION * tile_size))
    if overlap < 0:
        raise ConfigError(f"{source}: data.tile_overlap (--tile-overlap) must be >= 0, got {overlap}")
    if overlap >= tile_size:
        raise ConfigError(
            f"{source}: data.tile_overlap ({overlap}) must be smaller than data.tile_size ({tile_size}): "
            f"the tiles would not advance"
        )
    return overlap


def _check_tiles_for_model(cfg: TrainConfig, source: str) -> None:
    """Tiles clip boxes and masks: they are for box and mask models. (model.kwargs min_size / max_size,
    the input scale the data report advises, are range-checked with the other builder keywords in
    models.check_model_kwargs.)"""
    if cfg.data.tile_size and "keypoint" in cfg.model.name:
        raise ConfigError(
            f"{source}: data.tile_size: tiles clip boxes and masks, not keypoints: drop it for {cfg.model.name}"
        )


def auto_class_weight(m: ModelConfig) -> bool:
    """``model.roi_head.class_weight: auto``: train.py resolves it from the training data."""
    return m.roi_head.get("class_weight") == "auto"


def auto_fed_image_counts(m: ModelConfig) -> bool:
    """``model.roi_head.cls_loss: federated`` with ``fed_image_counts: auto`` or none given: train.py counts
    the training images of each class (Detectron2 reads them from the dataset's metadata)."""
    roi = m.roi_head or {}
    return roi.get("cls_loss") == "federated" and roi.get("fed_image_counts") in (None, "auto")


def _check_class_weight_keys(m: ModelConfig, source: str) -> None:
    """model.class_weight_method / _beta shape ``class_weight: auto`` only: refused anywhere else."""
    if not auto_class_weight(m):
        for key in ("class_weight_method", "class_weight_beta"):
            if getattr(m, key) is not None:
                raise ConfigError(
                    f"{source}: model.{key} ({getattr(m, key)!r}) applies only with model.roi_head.class_weight: "
                    f"auto (set it, or drop model.{key})"
                )
    beta = m.class_weight_beta
    if beta is not None and m.class_weight_method == "inverse_sqrt":
        raise ConfigError(
            f"{source}: model.class_weight_beta is the effective_number parameter: drop it for inverse_sqrt"
        )


def _loss_config(m: ModelConfig, source: str) -> LossConfig:
    """The library reads the loss keys of ``model:`` exactly as LossConfig.from_yaml does."""
    keys = {k: v for k, v in dataclasses.asdict(m).items() if v is not None}
    if auto_class_weight(m):  # resolved later from the training data; the library refuses the marker
        keys["roi_head"] = {k: v for k, v in m.roi_head.items() if k != "class_weight"}
    if auto_fed_image_counts(m):  # the same for the federated loss's image counts
        keys["roi_head"] = {k: v for k, v in keys["roi_head"].items() if k != "fed_image_counts"}
    try:
        return LossConfig.from_dict({"model": keys})
    except LossConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_stock(m: ModelConfig, loss_cfg: LossConfig, source: str) -> None:
    """--stock builds torchvision's own heads: a loss or sampling setting could not take effect there."""
    if not m.stock or (loss_cfg.is_default() and not auto_class_weight(m)):
        return
    keys = [f"model.{k}" for k in loss_cfg.changed_keys()]
    keys += ["model.roi_head.class_weight"] if auto_class_weight(m) else []
    raise ConfigError(
        f"{source}: --stock builds torchvision's own heads, which cannot apply {', '.join(keys)}: "
        f"drop --stock or those settings"
    )


def known_num_classes(cfg: TrainConfig) -> Tuple[Optional[int], str]:
    """(the model's class count, where it comes from) before any data is read; (None, "") if unknown.
    For coco_json this reads the categories of the annotation file (contiguous labels 1..K)."""
    m, d = cfg.model, cfg.data
    if m.num_classes:
        return m.num_classes, "model.num_classes (--num-classes)"
    if d.dataset in ("coco", "coco_kp"):
        return {"coco": 91, "coco_kp": 2}[d.dataset], f"--dataset {d.dataset}"
    if d.dataset == "shapes":
        return shapes_spec(d).num_classes + 1, "data.shapes.num_classes"
    path = d.val_ann or d.train_ann
    try:
        with open(path, encoding="utf-8") as f:
            cats = json.load(f).get("categories")
    except (OSError, TypeError, ValueError, AttributeError):  # the data checks say what is wrong with it
        return None, ""
    return (len(cats) + 1, f"the {len(cats)} categories of {path}") if isinstance(cats, list) and cats else (None, "")


def _check_class_weight_length(cfg: TrainConfig) -> None:
    """A model.roi_head.class_weight list of the wrong length fails before any data is read."""
    weights = cfg.model.roi_head.get("class_weight")
    if not isinstance(weights, (list, tuple)):
        return
    n, source = known_num_classes(cfg)
    if n is not None and len(weights) != n:
        raise ConfigError(
            f"model.roi_head.class_weight has {len(weights)} entries but the model has {n} classes "
            f"({source}, background included): give one weight per class, background first"
        )
