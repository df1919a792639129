r"""Train or evaluate a torchvision two-stage detector with tv_lossfix's configurable losses.

Command line compatible with torchvision's references/detection/train.py, plus a YAML config,
gradient clipping, a NaN policy, data checks and collapse diagnostics.

    # the embedded demo (CPU, ~5 min):
    torchrun --standalone --nproc_per_node=1 references/train.py --config references/configs/shapes.yaml
    # 8 GPUs, your config, flags override it:
    torchrun --nproc_per_node=8 references/train.py --config my.yaml --lr 0.02 --amp
    # COCO, as torchvision's reference:
    torchrun --nproc_per_node=8 references/train.py --dataset coco --data-path /data/coco --model maskrcnn_resnet50_fpn

Outputs in --output-dir: config.yaml (resolved), metrics.jsonl, checkpoint.pth + model_<epoch>.pth
(atomic writes), TensorBoard events (if installed), training_curves.png, eval_curves.png, gallery.png.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from tv_lossfix import LossConfigError  # noqa: E402
from tv_lossfix.builders import is_checkpoint_path, read_weights_checkpoint  # noqa: E402
from tv_lossfix.model_settings import anchors_per_location, apply_model_settings, model_settings  # noqa: E402

import distributed  # noqa: E402
from checkpoint import (  # noqa: E402
    CheckpointError,
    apply_to_optimizer,
    atomic_write_text,
    checkpoint_model_name,
    load_scheduler_state,
    load_training_checkpoint,
    reconcile,
    remove_stale_temp_files,
    restore_rng,
    save_training_checkpoint,
)
from checks import DataError, check_samples, load_coco_checked  # noqa: E402
from data import (  # noqa: E402
    SIZE_SETTING_POLICIES,
    CocoDetection,
    DetectionPresetTrain,
    GroupedBatchSampler,
    RepeatFactorSampler,
    SeededRandomSampler,
    aspect_ratio_groups,
    collate,
    copy_paste_collate,
    image_classes,
    repeat_factors,
    suggest_repeat_threshold,
)
from diagnostics import collapse_warnings, linear_scaling_lr, lr_warning, per_class_table, rare_class_cure  # noqa: E402
from engine import (  # noqa: E402
    NonFiniteError,
    Preempted,
    StepContext,
    StopRequest,
    TrainState,
    evaluate,
    ignore_stop_signals,
    skip_batches,
    train_one_epoch,
)
from models import (  # noqa: E402
    ModelError,
    build_model,
    check_class_agnostic,
    check_model_name,
    check_weights_model,
    check_weights_path,
    ensure_weights_file,
    resolve_weights,
    set_anchors,
)
from train_config import ConfigError, dump, resolve  # noqa: E402

# The errors that end a run in one line (no traceback); LossConfigError can come from building the
# model (a class_weight of another length than the model's classes).
USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelError, LossConfigError)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (recursively): metrics.jsonl stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if hasattr(value, "item") and not isinstance(value, float):  # 0-d tensors, numpy scalars
        return json_safe(value.item())
    value = float(value)
    return value if math.isfinite(value) else None


class RunLog:
    """Rank-0 output: console lines (through tqdm when a bar is shown), metrics.jsonl, TensorBoard.

    With ``--output-dir ""`` (torchvision's "save nothing") only the console is written. Every
    metrics.jsonl record carries this run's id (``run``: start time and process id), so that the
    records of a run that was killed and resumed can be told apart (see ``start_record``).
    """

    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
        self.tb = None
        if enabled and out_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def say(self, msg: str) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm

            tqdm.write(msg)
        except ImportError:
            print(msg, flush=True)
        sys.stdout.flush()

    def record(self, rec: Dict[str, Any]) -> None:
        if not self.enabled or self.path is None:
            return
        rec = json_safe({"time": round(time.time(), 3), "run": self.run_id, **rec})
        # Append + flush: earlier lines are never rewritten, a crash loses at most this line.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        if self.tb is not None:
            step = rec.get("iter", rec.get("epoch", 0))
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iter", "epoch", "time"):
                    self.tb.add_scalar(f"{rec.get('type', 'misc')}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class Run:
    """What the steps of ``main`` share."""

    cfg: Dict[str, Any]
    loss_cfg: Any
    device: torch.device
    rank: int
    log: RunLog
    out_dir: str
    resume_ckpt: Optional[Dict[str, Any]] = None
    t_start: float = field(default_factory=time.time)
    in_epoch: Optional[Dict[str, Any]] = None  # where a mid-epoch --resume checkpoint stopped

    @property
    def say(self):
        return self.log.say


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
    base_sampler: Any = None
    train_counts: Optional[List[int]] = None  # training objects per foreground label (training_counts)
    rare_cure: Optional[Dict[str, Any]] = None  # the rare-class levers the warnings print (rare_class_cure)


# -- 1. configuration and checks that need no data ----------------------------------------------------
def _check_device(name: str) -> None:
    try:
        torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device: use cuda, cuda:N or cpu") from None


def _check_output_dir(out_dir: str) -> None:
    if not out_dir:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--output-dir {out_dir!r} is a file, not a folder")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--output-dir {out_dir!r}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--output-dir {out_dir!r}: {parent} is not writable")


def check_before_data(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Every check that needs no data; returns the --resume checkpoint (read once, here)."""
    m, t, d = cfg["model"], cfg["training"], cfg["data"]
    check_model_name(m["name"])
    if "keypoint" in m["name"] and d["dataset"] == "coco":
        raise ConfigError("--model keypointrcnn_* trains on keypoints: use --dataset coco_kp (as torchvision says)")
    if "keypoint" not in m["name"] and d["dataset"] == "coco_kp":
        raise ConfigError(f"--dataset coco_kp is for keypoint models; {m['name']} uses --dataset coco")
    _check_device(t["device"])
    _check_output_dir(t["output_dir"])
    check_class_weight_length(cfg)
    check_class_agnostic(m["name"], m["stock"], m["class_agnostic_bbox"], m["class_agnostic_mask"])
    check_weights_path(m["weights"])
    check_weights_model(m["name"], m["weights"])  # another model's checkpoint fails here, not after the data
    # A bad name fails here, listing the valid ones; weights not yet downloaded are fetched now, so
    # that a machine without network fails here, in one line, and not after the data pass.
    ensure_weights_file(resolve_weights(m["name"], m["weights"]))
    ensure_weights_file(resolve_weights(m["name"], m["weights_backbone"], "--weights-backbone"), "--weights-backbone")
    if not t["resume"]:
        return None
    ckpt = load_training_checkpoint(t["resume"])
    saved = checkpoint_model_name(ckpt)
    if saved is not None and saved != m["name"]:
        raise CheckpointError(f"--resume {t['resume']} holds a {saved} model, not --model {m['name']}")
    return ckpt


def setup(argv: Optional[List[str]]) -> Optional[Run]:
    cfg, loss_cfg, print_only = resolve(argv)
    if print_only:
        print(dump(cfg, loss_cfg), end="")
        return None
    ckpt = check_before_data(cfg)
    t = cfg["training"]
    if t["num_threads"]:
        torch.set_num_threads(t["num_threads"])
    # torchvision's default is --device cuda; without a GPU we say so and use the CPU.
    cuda_missing = t["device"].startswith("cuda") and not torch.cuda.is_available()
    device = torch.device("cpu" if cuda_missing else t["device"])
    info = distributed.detect(cfg["distributed"]["world_size"])
    distributed.init(info, device.type, cfg["distributed"]["backend"], cfg["distributed"]["dist_url"])
    if device.type == "cuda" and info.launcher != "none":
        device = torch.device("cuda", info.local_rank)
    out_dir = t["output_dir"]
    stale = _prepare_output_dir(out_dir) if out_dir and distributed.is_main() else []
    distributed.barrier()
    run = Run(cfg, loss_cfg, device, info.rank, RunLog(out_dir, distributed.is_main()), out_dir, ckpt)
    run.log.record(start_record(t["resume"], ckpt))
    if stale:
        run.say(f"removed {len(stale)} temp file(s) an interrupted run left in {out_dir}: {', '.join(stale)}")
    if cuda_missing:
        run.say("CUDA is not available: running on the CPU")
    _record_what_runs(run)
    random.seed(t["seed"] + info.rank)
    torch.manual_seed(t["seed"] + info.rank)
    if t["use_deterministic_algorithms"]:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    return run


def _prepare_output_dir(out_dir: str) -> List[str]:
    """Create --output-dir; remove the temp files of atomic writes a killed run left (their names)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output-dir {out_dir!r}: cannot create it: {e.strerror or e}") from None
    return remove_stale_temp_files(out_dir)


def start_record(resume_path: str, ckpt: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The first metrics.jsonl record of a run. After a resume, the earlier runs' records from past
    the checkpoint (a larger ``iter``, or an epoch after ``epoch``) were superseded."""
    if ckpt is None:
        return {"type": "run", "resumed_from": None, "epoch": None, "iter": 0}
    state = ckpt.get("state") if isinstance(ckpt.get("state"), dict) else {}
    return {"type": "run", "resumed_from": resume_path, "epoch": ckpt.get("epoch"), "iter": state.get("iteration")}


def _record_what_runs(run: Run) -> None:
    """The saved config records what actually runs (device, amp, world size), not what was asked."""
    t = run.cfg["training"]
    t["device"] = str(run.device)
    if t["amp"] and run.device.type != "cuda":
        run.say("--amp needs CUDA (float16 autocast + GradScaler): training in float32 on the CPU")
        t["amp"] = False
    run.cfg["distributed"]["world_size"] = distributed.world()
    if t["auto_scale_lr"]:
        images = t["batch_size"] * distributed.world()
        scaled = t["lr"] * images / 16
        run.say(
            f"training.auto_scale_lr: lr {t['lr']:g} is for 16 images per step; {images} per step here -> lr {scaled:g}"
        )
        t["lr"] = scaled
        t["auto_scale_lr"] = False  # folded into lr: a resumed run must not scale it twice


def save_config(run: Run) -> None:
    if not run.out_dir or not distributed.is_main():
        return
    path = _config_path(run)
    atomic_write_text(dump(run.cfg, run.loss_cfg), path)
    m = run.cfg["model"]
    changed = _loss_changes(run.loss_cfg)
    run.say(
        f"tv_lossfix training: {m['name']} ({'stock torchvision' if m['stock'] else 'tv_lossfix heads'}) on "
        f"{run.device}, {distributed.world()} process(es); losses: {changed}; config saved to {path}"
    )


def _config_path(run: Run) -> str:
    name = "config.yaml"
    if run.resume_ckpt is not None:  # the run's original config.yaml is never overwritten
        name = f"config.resume-epoch{run.resume_ckpt.get('epoch', 0) + 1}.yaml"
        pos = run.resume_ckpt.get("in_epoch")
        if isinstance(pos, dict):
            name = f"config.resume-epoch{pos['epoch']}-iter{pos['iteration']}.yaml"
    return os.path.join(run.out_dir, name)


def _loss_changes(loss_cfg) -> str:
    default = type(loss_cfg)().to_dict()
    now = loss_cfg.to_dict()
    diffs = [f"{sec}.{k}={v}" for sec in ("rpn_head", "roi_head") for k, v in now[sec].items() if default[sec][k] != v]
    if now["sync_avg_factor"]:
        diffs.append("sync_avg_factor=True")
    return ", ".join(diffs) if diffs else "torchvision's defaults"


# -- 2. data --------------------------------------------------------------------------------------
def dataset_files(cfg: Dict[str, Any]) -> Dict[str, Any]:
    d = cfg["data"]
    if d["dataset"] == "shapes":
        from shapes import ShapesSpec, ensure_shapes

        spec = ShapesSpec(**d["shapes"])
        if distributed.is_main():  # one writer; the other ranks wait for the files
            ensure_shapes(d["data_path"], spec)
        distributed.barrier()
        return {**ensure_shapes(d["data_path"], spec), "label_mode": "contiguous"}
    if d["dataset"] in ("coco", "coco_kp"):
        prefix = "person_keypoints" if d["dataset"] == "coco_kp" else "instances"
        root = d["data_path"]
        return {
            "train_ann": os.path.join(root, "annotations", f"{prefix}_train2017.json"),
            "train_images": os.path.join(root, "train2017"),
            "val_ann": os.path.join(root, "annotations", f"{prefix}_val2017.json"),
            "val_images": os.path.join(root, "val2017"),
            "label_mode": "category_id",  # COCO's 91 ids, as torchvision's pretrained weights
        }
    return {k: d[k] for k in ("train_ann", "train_images", "val_ann", "val_images")} | {"label_mode": "contiguous"}


def _num_classes(cfg: Dict[str, Any], label_map: Dict[int, int]) -> int:
    given, dataset = cfg["model"]["num_classes"], cfg["data"]["dataset"]
    # torchvision's get_dataset: 91 for coco, 2 for coco_kp; elsewhere from the categories.
    n = given or {"coco": 91, "coco_kp": 2}.get(dataset) or (max(label_map.values()) + 1)
    if max(label_map.values()) >= n:
        raise ConfigError(
            f"model.num_classes={n} but the data has labels up to {max(label_map.values())} "
            f"(num_classes counts the background: use {max(label_map.values()) + 1})"
        )
    cfg["model"]["num_classes"] = n
    return n


def build_data(run: Run) -> Data:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    cfg, m, d = run.cfg, run.cfg["model"], run.cfg["data"]
    files = dataset_files(cfg)
    masks, kps = "maskrcnn" in m["name"], "keypoint" in m["name"]
    coco_val, label_map, names, report = load_coco_checked(
        files["val_ann"], files["val_images"], "val", d["bad_annotations"], masks, files["label_mode"]
    )
    run.say(report.summary())
    run.log.record({"type": "data", **report.to_dict()})
    num_classes = _num_classes(cfg, label_map)
    val_set = CocoDetection(coco_val, files["val_images"], label_map, None, d["backend"], masks, kps)
    sampler = DistributedSampler(val_set, shuffle=False) if distributed.is_dist() else None
    data = Data(
        coco_val,
        val_set,
        DataLoader(val_set, batch_size=1, sampler=sampler, num_workers=d["workers"], collate_fn=collate),
        {v: k for k, v in label_map.items()},
        names,
        num_classes,
        sum(1 for a in coco_val.dataset["annotations"] if not a.get("iscrowd", 0)) / max(len(val_set), 1),
    )
    if not cfg["training"]["test_only"]:
        _build_train_data(run, data, files, label_map, masks, kps)
    return data


def _build_train_data(run: Run, data: Data, files, label_map, masks: bool, kps: bool) -> None:
    from torch.utils.data import BatchSampler, DataLoader

    d, t = run.cfg["data"], run.cfg["training"]
    coco, train_map, _, report = load_coco_checked(
        files["train_ann"], files["train_images"], "train", d["bad_annotations"], masks, files["label_mode"]
    )
    if train_map != label_map:
        raise DataError(f"train and val define different categories: {sorted(train_map)} vs {sorted(label_map)}")
    run.say(report.summary())
    run.log.record({"type": "data", **report.to_dict()})
    plain = CocoDetection(coco, files["train_images"], label_map, None, d["backend"], masks, kps)
    problems = check_samples(plain, data.num_classes, d["check_samples"])
    if problems:
        raise DataError("decoded training samples have problems:\n  " + "\n  ".join(problems[:25]))
    try:
        preset = DetectionPresetTrain(d["augmentation"], d["lsj_size"], kps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data.train_set = CocoDetection(coco, files["train_images"], label_map, preset, d["backend"], masks, kps)
    data.base_sampler = _base_sampler(run, data.train_set)
    if d["aspect_ratio_group_factor"] >= 0:
        groups = aspect_ratio_groups(data.train_set.aspect_ratios(), d["aspect_ratio_group_factor"])
        batches = GroupedBatchSampler(data.base_sampler, groups, t["batch_size"])
    else:
        batches = BatchSampler(data.base_sampler, t["batch_size"], drop_last=True)
    if d["use_copypaste"] and not masks:
        raise ConfigError("--use-copypaste pastes instance masks: it needs a Mask R-CNN model")
    data.train_loader = DataLoader(
        data.train_set,
        batch_sampler=batches,
        num_workers=d["workers"],
        collate_fn=copy_paste_collate if d["use_copypaste"] else collate,
    )


def _base_sampler(run: Run, train_set):
    """The per-image order each epoch: repeat-factor sampling, else a seeded shuffle (split by rank)."""
    from torch.utils.data.distributed import DistributedSampler

    seed = run.cfg["training"]["seed"]
    if run.cfg["data"]["repeat_factor_threshold"] is not None:
        return _repeat_factor_sampler(run, train_set, seed)
    if distributed.is_dist():
        return DistributedSampler(train_set, shuffle=True, seed=seed)
    return SeededRandomSampler(len(train_set), seed)


def _repeat_factor_sampler(run: Run, train_set, seed: int) -> RepeatFactorSampler:
    d, coco = run.cfg["data"], train_set.coco
    classes = image_classes(coco.dataset["annotations"], train_set.ids)
    factors, per_class = repeat_factors(classes, d["repeat_factor_threshold"], d["repeat_sqrt"])
    sampler = RepeatFactorSampler(factors, seed, distributed.rank(), distributed.world())
    names = {c: coco.cats[c].get("name", str(c)) if c in coco.cats else str(c) for c in per_class}
    ranked = sorted(per_class, key=lambda c: -per_class[c])
    repeated = [c for c in ranked if per_class[c] > 1]
    shown = ", ".join(f"{names[c]} x{per_class[c]:.2f}" for c in repeated[:5]) or "no class is rare enough to repeat"
    shown += f" (+{len(repeated) - 5} more)" if len(repeated) > 5 else ""
    rule = "sqrt(t / f)" if d["repeat_sqrt"] else "t / f"
    run.say(
        f"repeat-factor sampling, data.repeat_factor_threshold {d['repeat_factor_threshold']:g} ({rule}): "
        f"{shown}; {sampler.expected:.1f} images per epoch expected (epoch 0 draws {sampler.epoch_total}) "
        f"vs {len(train_set)} in the dataset"
    )
    run.log.record(
        {
            "type": "repeat_factors",
            "threshold": d["repeat_factor_threshold"],
            "sqrt": d["repeat_sqrt"],
            "class_factors": {names[c]: per_class[c] for c in ranked},
            "images": len(train_set),
            "expected_images_per_epoch": sampler.expected,
            "epoch0_images": sampler.epoch_total,
            "epoch0_images_per_rank": len(sampler),
        }
    )
    return sampler


# -- rare classes: class_weight: auto, and the cure the warnings print ------------------------------
def _known_num_classes(cfg: Dict[str, Any]) -> tuple:
    """(the model's class count, where it comes from) before any data is read; (None, "") if unknown."""
    m, d = cfg["model"], cfg["data"]
    if m["num_classes"]:
        return m["num_classes"], "model.num_classes (--num-classes)"
    if d["dataset"] in ("coco", "coco_kp"):
        return {"coco": 91, "coco_kp": 2}[d["dataset"]], f"--dataset {d['dataset']}"
    if d["dataset"] == "shapes":
        from shapes import ShapesSpec

        try:
            return ShapesSpec(**d["shapes"]).num_classes + 1, "data.shapes.num_classes"
        except (TypeError, ValueError):  # refused in one line when the data is built
            return None, ""
    path = d["val_ann"] or d["train_ann"]  # coco_json: contiguous labels 1..K over the categories
    try:
        with open(path, encoding="utf-8") as f:
            cats = json.load(f).get("categories")
    except (OSError, TypeError, ValueError, AttributeError):  # the data checks say what is wrong with it
        return None, ""
    return (len(cats) + 1, f"the {len(cats)} categories of {path}") if isinstance(cats, list) and cats else (None, "")


def check_class_weight_length(cfg: Dict[str, Any]) -> None:
    """A model.roi_head.class_weight list of the wrong length fails before any data is read."""
    weights = (cfg["model"]["roi_head"] or {}).get("class_weight")
    if not isinstance(weights, (list, tuple)):
        return
    n, source = _known_num_classes(cfg)
    if n is not None and len(weights) != n:
        raise ConfigError(
            f"model.roi_head.class_weight has {len(weights)} entries but the model has {n} classes "
            f"({source}, background included): give one weight per class, background first"
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


def _checkpoint_class_weight(ckpt: Optional[Dict[str, Any]]) -> Optional[List[float]]:
    if not ckpt:
        return None
    roi = ((ckpt.get("config") or {}).get("model") or {}).get("roi_head") or {}
    weights = roi.get("class_weight", ((ckpt.get("loss_cfg") or {}).get("roi_head") or {}).get("class_weight"))
    return [float(w) for w in weights] if isinstance(weights, (list, tuple)) else None


def resolve_class_weight(run: Run, data: Data) -> None:
    """model.roi_head.class_weight: auto becomes tv_lossfix.class_weights_from_counts of the training
    counts (on --resume, the checkpoint's list), in a new LossConfig, config.yaml and the checkpoints."""
    m = run.cfg["model"]
    if m["roi_head"].get("class_weight") != "auto":
        return
    if data.train_set is None:
        run.say("model.roi_head.class_weight: auto is not resolved under --test-only: evaluation computes no loss")
        return
    from tv_lossfix import class_weights_from_counts

    method = m["class_weight_method"] or "effective_number"
    beta = m["class_weight_beta"]  # None: the library's default (0.999), read by effective_number only
    how = method + (f" (beta {0.999 if beta is None else beta:g})" if method == "effective_number" else "")
    counts = training_counts(data)
    if not any(counts):
        raise DataError("model.roi_head.class_weight: auto: the training annotations hold no object to count")
    fresh = class_weights_from_counts(counts, method, beta)
    weights, saved = fresh, _checkpoint_class_weight(run.resume_ckpt)
    if saved is not None:
        if len(saved) != data.num_classes:
            raise CheckpointError(
                f"--resume: the checkpoint's model.roi_head.class_weight has {len(saved)} entries, "
                f"the model {data.num_classes} classes"
            )
        weights = saved
        same = max(abs(a - b) for a, b in zip(saved, fresh)) < 1e-9
        run.say(
            f"model.roi_head.class_weight: auto on --resume keeps the checkpoint's list {_rounded(saved)}"
            + ("" if same else f" (the training data gives {_rounded(fresh)} by {how}: give that list to use it)")
        )
    else:
        run.say(
            f"model.roi_head.class_weight: auto -> {_rounded(fresh)} ({how} of the training objects per class "
            f"{counts}; exact values in config.yaml)"
        )
    m["roi_head"]["class_weight"] = list(weights)
    m["class_weight_method"] = m["class_weight_beta"] = None  # folded into the list, as auto_scale_lr into lr
    roi = dataclasses.replace(run.loss_cfg.roi_head, class_weight=tuple(weights))  # a new, validated config
    run.loss_cfg = run.loss_cfg.replace(roi_head=roi)
    run.log.record(
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
        atomic_write_text(dump(run.cfg, run.loss_cfg), _config_path(run))


def _rounded(weights: List[float]) -> List[float]:
    return [round(w, 4) for w in weights]


def _cure(run: Run, data: Data) -> Optional[Dict[str, Any]]:
    """The rare-class levers with values for the collapse warnings (computed once)."""
    if data.rare_cure is None and data.train_set is not None:
        classes = image_classes(data.train_set.coco.dataset["annotations"], data.train_set.ids)
        data.rare_cure = rare_class_cure(training_counts(data), suggest_repeat_threshold(classes), run.cfg)
    return data.rare_cure


# -- 3. model and optimisation --------------------------------------------------------------------
def build_model_for(run: Run, data: Data):
    m, t = run.cfg["model"], run.cfg["training"]
    torch.manual_seed(t["seed"])  # same initial weights on every rank
    kwargs = dict(m["kwargs"])
    # The policy sets the input size (torchvision passes this too); given always, so that a checkpoint
    # trained with another policy does not bring its own.
    kwargs["_skip_resize"] = run.cfg["data"]["augmentation"] in SIZE_SETTING_POLICIES and not t["test_only"]
    notes: List[str] = []
    model, replaced = build_model(
        m["name"],
        data.num_classes,
        run.loss_cfg,
        m["weights"],
        m["weights_backbone"],
        m["trainable_backbone_layers"],
        m["rpn_score_thresh"],
        m["stock"],
        kwargs,
        notes,
        m["class_agnostic_bbox"],
        m["class_agnostic_mask"],
    )
    for line in notes:
        if not line.startswith("_skip_resize:"):
            run.say(f"--weights {m['weights']}: {line}")
    if m["weights"] and is_checkpoint_path(m["weights"]):
        _compare_class_names(run, read_weights_checkpoint(m["weights"])[1], data.names, f"--weights {m['weights']}")
    if replaced:
        why = f"--weights {m['weights']} with num_classes {data.num_classes}" if m["weights"] else "class-agnostic"
        run.say(f"{why}: replaced " + "; ".join(replaced))
    _config_anchors(run, model)
    if run.resume_ckpt is not None:
        _restore_model_settings(run, model, run.resume_ckpt)
        _compare_class_names(run, run.resume_ckpt.get("model_settings") or {}, data.names, f"--resume {t['resume']}")
    model.to(run.device)
    if t["sync_bn"]:
        if run.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm); on CPU drop it")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if distributed.is_dist():
        ids = [run.device.index] if run.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    random.seed(t["seed"] + 1000 * run.rank)
    torch.manual_seed(t["seed"] + 1000 * run.rank)
    return model, net


def _config_anchors(run: Run, model) -> None:
    """model.anchor_sizes / aspect_ratios over the model built. Over a checkpoint's RPN head they are named
    against its anchors; a different count per location re-initialises the head to fine-tune, and is
    refused where the head must stay as trained (--test-only)."""
    m = run.cfg["model"]
    given = {"anchor_sizes": m["anchor_sizes"], "aspect_ratios": m["aspect_ratios"]}
    if m["weights"] and is_checkpoint_path(m["weights"]) and any(v is not None for v in given.values()):
        same_count = _anchor_count(model, given) == anchors_per_location(model)
        if same_count or run.cfg["training"]["test_only"]:
            try:
                lines = apply_model_settings(model, {}, given)
            except CheckpointError as e:
                raise CheckpointError(f"--weights {m['weights']} with model.{e}") from None
            for line in lines:
                run.say(f"--weights {m['weights']}: {line}")
            return
    for line in set_anchors(model, m["anchor_sizes"], m["aspect_ratios"]):
        run.say(f"anchors from the config: {line}")


def _restore_model_settings(run: Run, model, ckpt: Dict[str, Any]) -> None:
    """--resume (and --test-only --resume): the settings the checkpoint's model had beyond its weights.
    This run's config wins where it gives a value (model.kwargs, --rpn-score-thresh, model.anchor_sizes)."""
    settings = ckpt.get("model_settings")
    if not isinstance(settings, dict):
        return
    m, where = run.cfg["model"], f"--resume {run.cfg['training']['resume']}"
    settings = {k: v for k, v in settings.items() if k != "_skip_resize"}  # set by --data-augmentation
    given = {**m["kwargs"], "rpn_score_thresh": m["rpn_score_thresh"]}
    given.update(anchor_sizes=m["anchor_sizes"], aspect_ratios=m["aspect_ratios"])
    lines = []
    if m["anchor_sizes"] is None and m["aspect_ratios"] is None and "anchor_sizes" in settings:
        # The RPN head gets the trained anchor count before the checkpoint's weights are loaded into it.
        before = model_settings(model)
        set_anchors(model, settings["anchor_sizes"], settings["aspect_ratios"])
        if [before["anchor_sizes"], before["aspect_ratios"]] != [settings["anchor_sizes"], settings["aspect_ratios"]]:
            lines.append(
                f"anchors from the checkpoint: sizes {settings['anchor_sizes']}, "
                f"aspect ratios {settings['aspect_ratios']}"
            )
    try:
        lines += apply_model_settings(model, settings, given)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: model.{e}") from None
    for line in lines:
        run.say(f"{where}: {line}")


def _compare_class_names(run: Run, settings: Dict[str, Any], names: List[str], where: str) -> None:
    """A checkpoint trained on other classes than the data's (same count, or --weights would replace the
    predictors) is said: the labels of this run are the data's."""
    saved = settings.get("class_names")
    if saved is not None and list(saved) != list(names) and len(saved) == len(names):
        run.say(f"{where}: the checkpoint was trained on classes {list(saved)}; the data's are {list(names)}")


def _anchor_count(model, given: Dict[str, Any]) -> int:
    gen = model.rpn.anchor_generator
    sizes = given["anchor_sizes"] or gen.sizes
    ratios = given["aspect_ratios"] or gen.aspect_ratios
    return len(sizes[0]) * len(ratios[0])


def param_groups(model: torch.nn.Module, weight_decay: float, norm_weight_decay: Optional[float]):
    if norm_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_types = (
        torch.nn.modules.batchnorm._BatchNorm,
        torch.nn.GroupNorm,
        torch.nn.LayerNorm,
        torch.nn.modules.instancenorm._InstanceNorm,
        torch.nn.LocalResponseNorm,
    )
    norm, other = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (norm if isinstance(module, norm_types) else other).append(p)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


def _iters_per_epoch(loader, t: Dict[str, Any]) -> int:
    """An epoch's iterations: the loader's length, capped by --iters-per-epoch."""
    return len(loader) if t["iters_per_epoch"] is None else min(len(loader), t["iters_per_epoch"])


def build_optimization(run: Run, net, iters_per_epoch: int):
    t = run.cfg["training"]
    groups = param_groups(net, t["weight_decay"], t["norm_weight_decay"])
    if t["opt"].startswith("sgd"):
        optimizer = torch.optim.SGD(
            groups, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"], nesterov="nesterov" in t["opt"]
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=t["lr"], weight_decay=t["weight_decay"])
    if t["lr_scheduler"] == "multisteplr":
        lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=t["lr_steps"], gamma=t["lr_gamma"])
    else:
        lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t["epochs"])
    warmup_total = min(t["warmup_iters"], max(iters_per_epoch - 1, 0))  # torchvision: first epoch only
    warmup = None
    if warmup_total > 0:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=t["warmup_factor"], total_iters=warmup_total)
    return optimizer, lr_scheduler, warmup, TrainState(epoch=t["start_epoch"], warmup_total=warmup_total)


def resume(run: Run, net, optimizer, lr_scheduler, warmup, scaler, state: TrainState) -> None:
    """Restore a checkpoint; every setting that differs from it is applied (said how) or refused."""
    ckpt, t = run.resume_ckpt, run.cfg["training"]
    applied, refused = reconcile(ckpt.get("config"), run.cfg)
    refused += _mid_epoch_refusals(ckpt, run.cfg)
    if t["start_epoch"] not in (0, ckpt["epoch"] + 1):
        refused.append(
            f"training.start_epoch: {t['start_epoch']} refused: the checkpoint continues at epoch {ckpt['epoch'] + 1}"
        )
    if refused:
        raise CheckpointError(
            f"--resume {t['resume']}: settings that differ from the checkpoint cannot take effect:\n  "
            + "\n  ".join(refused)
        )
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"--resume: {t['resume']} was saved from another model: {str(e).splitlines()[0]}"
        ) from None
    optimizer.load_state_dict(ckpt["optimizer"])
    load_scheduler_state(lr_scheduler, ckpt["lr_scheduler"])
    if warmup is not None and ckpt.get("warmup") is not None:
        warmup.load_state_dict(ckpt["warmup"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if isinstance(ckpt.get("state"), dict):
        state.load_state_dict(ckpt["state"])
    state.epoch = ckpt["epoch"] + 1
    if isinstance(ckpt.get("in_epoch"), dict):  # stopped mid-epoch: train_loop continues at its iteration
        run.in_epoch = ckpt["in_epoch"]
    if ckpt.get("rng"):
        restore_rng(ckpt["rng"], run.rank)
    if ckpt.get("config"):
        apply_to_optimizer(optimizer, lr_scheduler, ckpt["config"], run.cfg)
    for line in applied:
        run.say(f"resume: {line}")
    where = f"epoch {ckpt['epoch']} done"
    if run.in_epoch is not None:
        where = f"epoch {run.in_epoch['epoch']} continues after its iteration {run.in_epoch['iteration']}"
    run.say(f"resumed from {t['resume']}: {where}, iteration {state.iteration} in all")


# A mid-epoch checkpoint continues the epoch's batch order; these settings make another order.
_MID_EPOCH_FIXED = (
    ("training", "batch_size"),
    ("distributed", "world_size"),
    ("data", "aspect_ratio_group_factor"),
    ("data", "repeat_factor_threshold"),
    ("data", "repeat_sqrt"),
)


def _mid_epoch_refusals(ckpt: Dict[str, Any], cfg: Dict[str, Any]) -> List[str]:
    pos, saved = ckpt.get("in_epoch"), ckpt.get("config") or {}
    if not isinstance(pos, dict):
        return []
    out = []
    for sec, key in _MID_EPOCH_FIXED:
        old, new = saved.get(sec, {}).get(key), cfg.get(sec, {}).get(key)
        if key in saved.get(sec, {}) and old != new:
            out.append(
                f"{sec}.{key}: {old!r} -> {new!r} refused: the checkpoint stopped at iteration {pos['iteration']} "
                f"of epoch {pos['epoch']}, whose remaining batches follow from it ("
                + (f"resume from model_{pos['epoch'] - 1}.pth" if pos["epoch"] else "start the run again")
                + " to change it at an epoch boundary)"
            )
    return out


# -- 4. the loop ------------------------------------------------------------------------------------
def run_evaluation(run: Run, model, data: Data, epoch: int, record: Dict[str, Any], train_stats, state: TrainState):
    res = evaluate(model, data.val_loader, run.device, data.coco_val, data.label_to_cat, run.say, data.names)
    if not distributed.is_main():
        return
    record.update(res)
    run.say(f"per class (score >= {res['score_thresh']:g}):\n" + per_class_table(res["per_class"], res["score_thresh"]))
    judge_after = max(run.cfg["training"]["judge_after_iters"], state.warmup_total)
    warnings = collapse_warnings(
        state.history, record, train_stats, run.cfg, data.gt_per_image, state.iteration, judge_after, _cure(run, data)
    )
    for w in warnings:
        run.say(("WARNING: " if not w.startswith("  ") else "") + w)
    record["warnings"] = warnings
    run.say(
        f"epoch {epoch}: bbox AP {res.get('bbox_AP', 0):.4f}"
        + (f", segm AP {res['segm_AP']:.4f}" if "segm_AP" in res else "")
        + f", {res['dets_per_image']:.2f} detections/image (gt {data.gt_per_image:.2f}), "
        f"max score {res['max_score']:.3f}"
    )
    state.history.append(record)


def train_loop(run: Run, model, net, data: Data, ctx: StepContext, lr_scheduler, warmup, state: TrainState) -> int:
    t = run.cfg["training"]
    iters = _iters_per_epoch(data.train_loader, t)
    # Under repeat-factor sampling each epoch's length follows its own draw (this is epoch 0's).
    about = "~" if isinstance(data.base_sampler, RepeatFactorSampler) and iters == len(data.train_loader) else ""
    clip = t["gradient_clip"]
    run.say(
        f"training {t['epochs'] - state.epoch} epoch(s) x {about}{iters} iterations, batch {t['batch_size']} x "
        f"{distributed.world()}; gradient clipping {'max_norm ' + str(clip['max_norm']) if clip['enabled'] else 'off'}"
    )
    # SIGINT / SIGTERM / SIGUSR1 stop at the next iteration boundary with a checkpoint (handlers restored after).
    with StopRequest() as stop:
        ctx.stop = stop
        for loader in (data.train_loader, data.val_loader):
            loader.worker_init_fn = functools.partial(ignore_stop_signals, then=loader.worker_init_fn)
        for epoch in range(state.epoch, t["epochs"]):
            try:
                stats = _train_epoch(run, net, data, ctx, epoch, lr_scheduler, warmup, state)
            except NonFiniteError as e:
                run.say(f"ERROR: {e}")
                run.log.record({"type": "stopped", "epoch": epoch, "iter": state.iteration, "reason": str(e)})
                return 2
            except Preempted as p:
                return _preempted(run, p, state)
            _end_epoch(run, model, net, data, ctx, epoch, stats, lr_scheduler, warmup, state)
            signum = stop.agreed()  # a signal during evaluation or the save: stop here, the epoch is saved
            if signum:
                return _preempted(run, Preempted(signum, epoch + 1, 0, _iters_per_epoch(data.train_loader, t)), state)
    return 0


def _train_epoch(run: Run, net, data: Data, ctx: StepContext, epoch: int, lr_scheduler, warmup, state: TrainState):
    """One epoch through engine.train_one_epoch; a mid-epoch resume continues where its checkpoint stopped."""
    t = run.cfg["training"]
    if hasattr(data.base_sampler, "set_epoch"):
        data.base_sampler.set_epoch(epoch)
    loader, start, meter_state = data.train_loader, 0, None
    pos = run.in_epoch
    if pos is not None and pos["epoch"] == epoch:
        run.in_epoch = None
        start, meter_state = int(pos["iteration"]), pos.get("meter")
        loader = iter(skip_batches(data.train_loader, start))
        if run.resume_ckpt.get("rng"):
            # Creating the iterator drew its seed from the torch RNG, as the interrupted run's did at the
            # start of the epoch: the saved states now continue from exactly where they were saved.
            restore_rng(run.resume_ckpt["rng"], run.rank)

    def after_iteration(done: int, n_iters: int, meter, stop: bool) -> None:
        every = t["checkpoint_every_iters"]
        if stop or (every and state.iteration % every == 0):
            in_epoch = {"epoch": epoch, "iteration": done, "meter": meter.state_dict()}
            _save(run, net, data, ctx, epoch - 1, lr_scheduler, warmup, state, in_epoch)
        if stop:
            raise Preempted(ctx.stop.agreed(), epoch, done, n_iters)

    return train_one_epoch(
        ctx,
        loader,
        epoch,
        state,
        t,
        warmup,
        run.log.record,
        run.say,
        t["iters_per_epoch"],
        start,
        meter_state,
        after_iteration,
    )


def _save(run: Run, net, data: Data, ctx: StepContext, epoch: int, lr_scheduler, warmup, state, in_epoch=None):
    save_training_checkpoint(
        run.out_dir,
        epoch,
        net,
        ctx.optimizer,
        lr_scheduler,
        warmup,
        ctx.scaler,
        state,
        run.cfg,
        run.loss_cfg,
        run.device,
        data.names,
        in_epoch,
    )
    distributed.barrier()


def _preempted(run: Run, p: Preempted, state: TrainState) -> int:
    """The one line a stopped run ends with, and its exit code (128 + the signal, as shells report)."""
    name = signal.Signals(p.signum).name
    where = f"epoch {p.epoch}, iteration {p.iteration}/{p.n_iters} of the epoch ({state.iteration} in all)"
    if p.iteration == 0:
        where = f"the end of epoch {p.epoch - 1} ({state.iteration} iterations in all)"
    path = os.path.abspath(os.path.join(run.out_dir, "checkpoint.pth")) if run.out_dir else None
    if path:
        run.say(f"stopped by {name} at {where}: saved {path}; to resume, run the same command with --resume {path}")
    else:
        run.say(f"stopped by {name} at {where}: nothing saved (--output-dir '')")
    run.log.record({"type": "stopped", "epoch": p.epoch, "iter": state.iteration, "reason": name, "checkpoint": path})
    return 128 + p.signum


def _end_epoch(run: Run, model, net, data: Data, ctx: StepContext, epoch: int, stats, lr_scheduler, warmup, state):
    """After an epoch's steps: the scheduler step, the evaluation (when due), the epoch checkpoint."""
    t = run.cfg["training"]
    lr_scheduler.step()
    record = {
        "type": "eval",
        "epoch": epoch,
        "train_loss": stats.get("loss"),
        "img_per_s": stats["img_per_s"],
        "skipped_steps": state.skipped,
        "amp_overflows": state.amp_overflows,
    }
    if (epoch + 1) % t["eval_every"] == 0 or epoch + 1 == t["epochs"]:
        run_evaluation(run, model, data, epoch, record, stats, state)
    run.log.record(record)
    state.epoch = epoch + 1
    _save(run, net, data, ctx, epoch, lr_scheduler, warmup, state)


def finish(run: Run, model, data: Data, state: TrainState) -> None:
    if not distributed.is_main():
        return
    if run.out_dir and run.cfg["training"]["plots"]:
        from visualize import draw_gallery, plot_curves

        written = plot_curves(run.log.path, run.out_dir)
        g = draw_gallery(
            model,
            data.val_set,
            run.device,
            data.names,
            os.path.join(run.out_dir, "gallery.png"),
            run.cfg["training"]["gallery_images"],
            data.label_to_cat,
        )
        written += [g] if g else []
        run.say("wrote " + ", ".join(written))
    total = str(datetime.timedelta(seconds=int(time.time() - run.t_start)))
    last = state.history[-1] if state.history else {}
    run.say(
        f"done in {total}: bbox AP {last.get('bbox_AP', float('nan')):.4f}"
        + (f", segm AP {last['segm_AP']:.4f}" if "segm_AP" in last else "")
        + f", {last.get('dets_per_image', float('nan')):.2f} detections/image"
    )


def _before_step_one(run: Run, data: Data, model) -> None:
    """The data / anchor report and the lr check, before the first step."""
    t = run.cfg["training"]
    images = t["batch_size"] * distributed.world()
    warning = lr_warning(t["lr"], images, t["warmup_iters"])
    if warning:
        run.say("WARNING: " + warning)
    run.log.record(
        {
            "type": "lr_check",
            "lr": t["lr"],
            "images_per_step": images,
            "linear_scaling_lr": linear_scaling_lr(images),
            "warning": warning,
        }
    )
    if run.cfg["data"]["report"] and distributed.is_main():
        from analyze_data import data_report

        net = getattr(model, "module", model)
        report = data_report(data.train_set.coco, net, data.names, data.label_to_cat, cfg=run.cfg)
        run.say(report.text())
        run.log.record({"type": "data_report", **report.to_dict()})


def evaluate_only(run: Run, model, net, data: Data) -> int:
    if run.cfg["model"]["weights"] is None and run.resume_ckpt is None:
        run.say("--test-only without --weights or --resume evaluates a randomly initialised model")
    if run.resume_ckpt is not None:
        try:
            net.load_state_dict(run.resume_ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(
                f"--resume: {run.cfg['training']['resume']} does not fit --model "
                f"{run.cfg['model']['name']}: {str(e).splitlines()[0]}"
            ) from None
    torch.backends.cudnn.deterministic = True  # as torchvision's --test-only
    res = evaluate(model, data.val_loader, run.device, data.coco_val, data.label_to_cat, run.say, data.names)
    if distributed.is_main():
        run.say(per_class_table(res["per_class"], res["score_thresh"]))
        run.log.record({"type": "eval", "epoch": run.cfg["training"]["start_epoch"], **res})
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    run = setup(argv)
    if run is None:  # --print-config
        return 0
    try:
        save_config(run)
        data = build_data(run)
        resolve_class_weight(run, data)
        model, net = build_model_for(run, data)
        if run.cfg["training"]["test_only"]:
            return evaluate_only(run, model, net, data)
        t = run.cfg["training"]
        optimizer, lr_scheduler, warmup, state = build_optimization(run, net, _iters_per_epoch(data.train_loader, t))
        scaler = torch.amp.GradScaler("cuda") if t["amp"] and run.device.type == "cuda" else None
        if run.resume_ckpt is not None:
            resume(run, net, optimizer, lr_scheduler, warmup, scaler, state)
        _before_step_one(run, data, model)
        clip = t["gradient_clip"]
        ctx = StepContext(
            model,
            optimizer,
            run.device,
            scaler,
            clip["max_norm"] if clip["enabled"] else float("inf"),
            clip["norm_type"],
        )
        code = train_loop(run, model, net, data, ctx, lr_scheduler, warmup, state)
        if code == 0:
            finish(run, model, data, state)
        return code
    finally:
        run.log.close()
        distributed.cleanup()


def error_line(e: BaseException) -> str:
    """A user error's message. One raised in a DataLoader worker arrives wrapped in the worker's
    traceback (torch's ExceptionWrapper): the original message is what follows its "Type: " line."""
    msg = str(e)
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        found = re.search(rf"^(?:[\w.]+\.)?{type(e).__name__}: ", msg, re.M)
        if found:
            msg = msg[found.end() :].rstrip()
    return msg


def cli(argv: Optional[List[str]] = None) -> int:
    """``main`` as a command: a user error ends the run in one line on stderr, exit code 1."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which stops with a checkpoint itself)
        print("interrupted (SIGINT) before training began or after it ended: nothing more saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
