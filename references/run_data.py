"""The run's data: dataset files, the checked COCO splits, datasets, samplers and loaders, and the
class counts behind ``model.roi_head.class_weight: auto`` and the rare-class advice."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import distributed
from checks import DataError, check_samples, load_coco_checked
from data import (
    CocoDetection,
    DetectionPresetTrain,
    collate,
    copy_paste_collate,
    image_classes,
    suggest_repeat_threshold,
)
from diagnostics import rare_class_cure
from run_context import Run
from samplers import build_train_batches
from train_config import ConfigError, TrainConfig, auto_fed_image_counts, dump, flatten, shapes_spec
from training_checkpoint import CheckpointError, atomic_write_text


@dataclass
class Data:
    coco_val: Any
    val_set: Any
    val_loader: Any
    label_to_cat: Dict[int, int]
    names: List[str]
    num_classes: int
    gt_per_image: float
    train_set: Any = None
    train_loader: Any = None
    base_sampler: Any = None  # samplers.TrainSampler: the trainer sets its epoch
    train_counts: Optional[List[int]] = None  # training objects per foreground label (training_counts)
    rare_cure: Optional[Dict[str, Any]] = None  # the rare-class levers the warnings print (rare_class_cure)


def dataset_files(cfg: TrainConfig) -> Dict[str, Any]:
    d = cfg.data
    if d.dataset == "shapes":
        from shapes import ensure_shapes

        spec = shapes_spec(d)
        if distributed.is_main():  # one writer; the other ranks wait for the files
            ensure_shapes(d.data_path, spec)
        distributed.barrier()
        return {**ensure_shapes(d.data_path, spec), "label_mode": "contiguous"}
    if d.dataset in ("coco", "coco_kp"):
        prefix = "person_keypoints" if d.dataset == "coco_kp" else "instances"
        root = d.data_path
        return {
            "train_ann": os.path.join(root, "annotations", f"{prefix}_train2017.json"),
            "train_images": os.path.join(root, "train2017"),
            "val_ann": os.path.join(root, "annotations", f"{prefix}_val2017.json"),
            "val_images": os.path.join(root, "val2017"),
            "label_mode": "category_id",  # COCO's 91 ids, as torchvision's pretrained weights
        }
    keys = ("train_ann", "train_images", "val_ann", "val_images")
    return {k: getattr(d, k) for k in keys} | {"label_mode": "contiguous"}


def _num_classes(cfg: TrainConfig, label_map: Dict[int, int]) -> int:
    given, dataset = cfg.model.num_classes, cfg.data.dataset
    # torchvision's get_dataset: 91 for coco, 2 for coco_kp; elsewhere from the categories.
    n = given or {"coco": 91, "coco_kp": 2}.get(dataset) or (max(label_map.values()) + 1)
    if max(label_map.values()) >= n:
        raise ConfigError(
            f"model.num_classes={n} but the data has labels up to {max(label_map.values())} "
            f"(num_classes counts the background: use {max(label_map.values()) + 1})"
        )
    return n


def build_data(run: Run) -> Data:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    cfg, m, d = run.cfg, run.cfg.model, run.cfg.data
    files = dataset_files(cfg)
    masks, kps = _target_kinds(m.name)
    coco_val, label_map, names, report = load_coco_checked(
        files["val_ann"], files["val_images"], "val", d.bad_annotations, masks, files["label_mode"]
    )
    run.writer.say(report.summary())
    run.writer.record({"type": "data", **report.to_dict()})
    num_classes = _num_classes(cfg, label_map)
    run.cfg = run.cfg.replace({"model.num_classes": num_classes})  # what the checkpoints record
    val_set = CocoDetection(coco_val, files["val_images"], label_map, None, d.backend, masks, kps)
    sampler = DistributedSampler(val_set, shuffle=False) if distributed.is_dist() else None
    data = Data(
        coco_val,
        val_set,
        DataLoader(val_set, batch_size=1, sampler=sampler, num_workers=d.workers, collate_fn=collate),
        {v: k for k, v in label_map.items()},
        names,
        num_classes,
        sum(1 for a in coco_val.dataset["annotations"] if not a.get("iscrowd", 0)) / max(len(val_set), 1),
    )
    if not cfg.training.test_only:
        _build_train_data(run, data, files, label_map)
    return data


def _target_kinds(model_name: str):
    """(masks, keypoints): the targets the model trains on besides boxes."""
    return "maskrcnn" in model_name, "keypoint" in model_name


def _build_train_data(run: Run, data: Data, files, label_map) -> None:
    from torch.utils.data import DataLoader

    d, (masks, kps) = run.cfg.data, _target_kinds(run.cfg.model.name)
    coco, train_map, _, report = load_coco_checked(
        files["train_ann"], files["train_images"], "train", d.bad_annotations, masks, files["label_mode"]
    )
    if train_map != label_map:
        raise DataError(f"train and val define different categories: {sorted(train_map)} vs {sorted(label_map)}")
    run.writer.say(report.summary())
    run.writer.record({"type": "data", **report.to_dict()})
    plain = CocoDetection(coco, files["train_images"], label_map, None, d.backend, masks, kps)
    problems = check_samples(plain, data.num_classes, d.check_samples)
    if problems:
        raise DataError("decoded training samples have problems:\n  " + "\n  ".join(problems[:25]))
    try:
        preset = DetectionPresetTrain(d.augmentation, d.lsj_size, kps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data.train_set = CocoDetection(coco, files["train_images"], label_map, preset, d.backend, masks, kps)
    if d.tile_size:
        from tiles import TiledDataset

        data.train_set = TiledDataset(
            CocoDetection(coco, files["train_images"], label_map, None, d.backend, masks, kps),
            d.tile_size,
            d.tile_overlap,
            preset,
        )
        run.writer.say(data.train_set.summary())
    data.base_sampler, batches = build_train_batches(run, data.train_set)
    data.train_loader = DataLoader(
        data.train_set,
        batch_sampler=batches,
        num_workers=d.workers,
        collate_fn=copy_paste_collate if d.use_copypaste else collate,
    )


def training_counts(data: Data) -> List[int]:
    """Objects per foreground label 1..K of the training set as it trains (non-crowd, after the data checks)."""
    if data.train_counts is None:
        label_of = {c: label for label, c in data.label_to_cat.items()}
        ids, counts = set(data.train_set.ids), [0] * (data.num_classes - 1)
        for a in data.train_set.coco.dataset["annotations"]:
            label = label_of.get(a["category_id"])
            if label is not None and a["image_id"] in ids and not a.get("iscrowd", 0):
                counts[label - 1] += 1
        data.train_counts = counts
    return data.train_counts


def _checkpoint_roi_list(ckpt: Optional[Dict[str, Any]], key: str, cast: Callable[[Any], Any]) -> Optional[List[Any]]:
    """The list the checkpoint's roi_head resolved for ``key`` (its config, else its loss_cfg), or None."""
    if not ckpt:
        return None
    roi = flatten(ckpt.get("config")).get("model.roi_head") or {}
    values = roi.get(key, ((ckpt.get("loss_cfg") or {}).get("roi_head") or {}).get(key))
    return [cast(v) for v in values] if isinstance(values, (list, tuple)) else None


def resolve_class_weight(run: Run, data: Data) -> None:
    """model.roi_head.class_weight: auto becomes tv_lossfix.class_weights_from_counts of the training
    counts (on --resume, the checkpoint's list), in a new LossConfig, config.yaml and the checkpoints."""
    m = run.cfg.model
    if m.roi_head.get("class_weight") != "auto":
        return
    if data.train_set is None:
        run.writer.say(
            "model.roi_head.class_weight: auto is not resolved under --test-only: evaluation computes no loss"
        )
        return
    from tv_lossfix import class_weights_from_counts

    method = m.class_weight_method or "effective_number"
    beta = m.class_weight_beta  # None: the library's default (0.999), read by effective_number only
    how = method + (f" (beta {0.999 if beta is None else beta:g})" if method == "effective_number" else "")
    counts = training_counts(data)
    if not any(counts):
        raise DataError("model.roi_head.class_weight: auto: the training annotations hold no object to count")
    fresh = class_weights_from_counts(counts, method, beta)
    weights, saved = fresh, _checkpoint_roi_list(run.resume_ckpt, "class_weight", float)
    if saved is not None:
        if len(saved) != data.num_classes:
            raise CheckpointError(
                f"--resume: the checkpoint's model.roi_head.class_weight has {len(saved)} entries, "
                f"the model {data.num_classes} classes"
            )
        weights = saved
        same = max(abs(a - b) for a, b in zip(saved, fresh)) < 1e-9
        run.writer.say(
            f"model.roi_head.class_weight: auto on --resume keeps the checkpoint's list {_rounded(saved)}"
            + ("" if same else f" (the training data gives {_rounded(fresh)} by {how}: give that list to use it)")
        )
    else:
        run.writer.say(
            f"model.roi_head.class_weight: auto -> {_rounded(fresh)} ({how} of the training objects per class "
            f"{counts}; exact values in config.yaml)"
        )
    # Folded into the list, as auto_scale_lr into lr.
    changes = {"model.roi_head": {**m.roi_head, "class_weight": list(weights)}}
    run.cfg = run.cfg.replace({**changes, "model.class_weight_method": None, "model.class_weight_beta": None})
    roi = dataclasses.replace(run.loss_cfg.roi_head, class_weight=tuple(weights))  # a new, validated config
    run.loss_cfg = run.loss_cfg.replace(roi_head=roi)
    run.writer.record(
        {
            "type": "class_weight",
            "class_weight": list(weights),
            "counts": counts,
            "method": method,
            "beta": beta if method == "effective_number" else None,
            "from": "checkpoint" if saved is not None else "training data",
        }
    )
    if run.out_dir and distributed.is_main():
        atomic_write_text(dump(run.cfg, run.loss_cfg), run.config_path)


def training_image_counts(data: Data) -> List[int]:
    """Training images holding each foreground label 1..K (non-crowd objects): Detectron2's ``image_count``."""
    label_of = {c: label for label, c in data.label_to_cat.items()}
    counts = [0] * (data.num_classes - 1)
    for classes in image_classes(data.train_set.coco.dataset["annotations"], data.train_set.ids):
        for c in classes:
            if c in label_of:
                counts[label_of[c] - 1] += 1
    return counts


def resolve_fed_image_counts(run: Run, data: Data) -> None:
    """model.roi_head.cls_loss: federated without a fed_image_counts list (or with 'auto'): the images of each
    class in the training set (on --resume, the checkpoint's list), in a new LossConfig, config.yaml and the
    checkpoints (model_settings), as class_weight: auto."""
    if not auto_fed_image_counts(run.cfg.model):
        return
    if data.train_set is None:
        run.writer.say(
            "model.roi_head.fed_image_counts: auto is not resolved under --test-only: evaluation computes no loss"
        )
        return
    fresh = training_image_counts(data)
    if not any(fresh):
        raise DataError("model.roi_head.fed_image_counts: auto: the training annotations hold no object to count")
    counts, saved = fresh, _checkpoint_roi_list(run.resume_ckpt, "fed_image_counts", int)
    if saved is not None:
        if len(saved) != data.num_classes - 1:
            raise CheckpointError(
                f"--resume: the checkpoint's model.roi_head.fed_image_counts has {len(saved)} entries, "
                f"the model {data.num_classes - 1} foreground classes"
            )
        counts = saved
        run.writer.say(
            f"model.roi_head.fed_image_counts: auto on --resume keeps the checkpoint's {saved}"
            + ("" if saved == fresh else f" (the training data gives {fresh}: give that list to use it)")
        )
    else:
        run.writer.say(f"model.roi_head.fed_image_counts: auto -> {counts} (training images of each class)")
    run.cfg = run.cfg.replace({"model.roi_head": {**run.cfg.model.roi_head, "fed_image_counts": list(counts)}})
    roi = dataclasses.replace(run.loss_cfg.roi_head, fed_image_counts=tuple(counts))  # a new, validated config
    run.loss_cfg = run.loss_cfg.replace(roi_head=roi)
    run.writer.record(
        {
            "type": "fed_image_counts",
            "fed_image_counts": list(counts),
            "from": "checkpoint" if saved is not None else "training data",
        }
    )
    if run.out_dir and distributed.is_main():
        atomic_write_text(dump(run.cfg, run.loss_cfg), run.config_path)


def _rounded(weights: List[float]) -> List[float]:
    return [round(w, 4) for w in weights]


def rare_cure(run: Run, data: Data, scale_fires: bool = False) -> Optional[Dict[str, Any]]:
    """The rare-class levers with values for the collapse warnings (computed once); ``scale_fires``: the
    input-scale rule fired on the training boxes, so no class_weight list (as in the data report)."""
    if data.rare_cure is None and data.train_set is not None:
        classes = image_classes(data.train_set.coco.dataset["annotations"], data.train_set.ids)
        counts = training_counts(data)
        data.rare_cure = rare_class_cure(
            counts, suggest_repeat_threshold(classes), run.cfg, names=data.names, scale_fires=scale_fires
        )
    return data.rare_cure
