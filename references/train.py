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

import datetime
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import distributed  # noqa: E402
from checkpoint import (  # noqa: E402
    CheckpointError,
    apply_to_optimizer,
    atomic_write_text,
    checkpoint_model_name,
    load_scheduler_state,
    load_training_checkpoint,
    reconcile,
    restore_rng,
    save_training_checkpoint,
)
from checks import DataError, check_samples, load_coco_checked  # noqa: E402
from data import (  # noqa: E402
    SIZE_SETTING_POLICIES,
    CocoDetection,
    DetectionPresetTrain,
    GroupedBatchSampler,
    SeededRandomSampler,
    aspect_ratio_groups,
    collate,
    copy_paste_collate,
)
from diagnostics import collapse_warnings, linear_scaling_lr, lr_warning, per_class_table  # noqa: E402
from engine import NonFiniteError, StepContext, TrainState, evaluate, train_one_epoch  # noqa: E402
from models import (  # noqa: E402
    ModelError,
    build_model,
    check_model_name,
    check_weights_path,
    ensure_weights_file,
    resolve_weights,
    set_anchors,
)
from train_config import ConfigError, dump, resolve  # noqa: E402

# The errors that end a run in one line (no traceback).
USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelError)


class RunLog:
    """Rank-0 output: console lines (through tqdm when a bar is shown), metrics.jsonl, TensorBoard.

    With ``--output-dir ""`` (torchvision's "save nothing") only the console is written.
    """

    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
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
        rec = {"time": round(time.time(), 3), **rec}
        # Append + flush: earlier lines are never rewritten, a crash loses at most this line.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=float) + "\n")
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
    check_weights_path(m["weights"])
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
    if out_dir and distributed.is_main():
        os.makedirs(out_dir, exist_ok=True)
    distributed.barrier()
    run = Run(cfg, loss_cfg, device, info.rank, RunLog(out_dir, distributed.is_main()), out_dir, ckpt)
    if cuda_missing:
        run.say("CUDA is not available: running on the CPU")
    _record_what_runs(run)
    random.seed(t["seed"] + info.rank)
    torch.manual_seed(t["seed"] + info.rank)
    if t["use_deterministic_algorithms"]:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    return run


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
    name = "config.yaml"
    if run.resume_ckpt is not None:  # the run's original config.yaml is never overwritten
        name = f"config.resume-epoch{run.resume_ckpt.get('epoch', 0) + 1}.yaml"
    path = os.path.join(run.out_dir, name)
    atomic_write_text(dump(run.cfg, run.loss_cfg), path)
    m = run.cfg["model"]
    changed = _loss_changes(run.loss_cfg)
    run.say(
        f"tv_lossfix training: {m['name']} ({'stock torchvision' if m['stock'] else 'tv_lossfix heads'}) on "
        f"{run.device}, {distributed.world()} process(es); losses: {changed}; config saved to {path}"
    )


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
    from torch.utils.data.distributed import DistributedSampler

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
    if distributed.is_dist():
        data.base_sampler = DistributedSampler(data.train_set, shuffle=True, seed=t["seed"])
    else:
        data.base_sampler = SeededRandomSampler(len(data.train_set), t["seed"])
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


# -- 3. model and optimisation --------------------------------------------------------------------
def build_model_for(run: Run, data: Data):
    m, t = run.cfg["model"], run.cfg["training"]
    torch.manual_seed(t["seed"])  # same initial weights on every rank
    kwargs = dict(m["kwargs"])
    if run.cfg["data"]["augmentation"] in SIZE_SETTING_POLICIES and not t["test_only"]:
        kwargs["_skip_resize"] = True  # the policy sets the input size; torchvision passes this too
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
    )
    if replaced:
        run.say(f"--weights {m['weights']} with num_classes {data.num_classes}: replaced " + "; ".join(replaced))
    for line in set_anchors(model, m["anchor_sizes"], m["aspect_ratios"]):
        run.say(f"anchors from the config: {line}")
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
    if ckpt.get("rng"):
        restore_rng(ckpt["rng"], run.rank)
    if ckpt.get("config"):
        apply_to_optimizer(optimizer, lr_scheduler, ckpt["config"], run.cfg)
    for line in applied:
        run.say(f"resume: {line}")
    run.say(f"resumed from {t['resume']}: epoch {ckpt['epoch']} done, iteration {state.iteration}")


# -- 4. the loop ------------------------------------------------------------------------------------
def run_evaluation(run: Run, model, data: Data, epoch: int, record: Dict[str, Any], train_stats, state: TrainState):
    res = evaluate(model, data.val_loader, run.device, data.coco_val, data.label_to_cat, run.say, data.names)
    if not distributed.is_main():
        return
    record.update(res)
    run.say(f"per class (score >= {res['score_thresh']:g}):\n" + per_class_table(res["per_class"], res["score_thresh"]))
    judge_after = max(run.cfg["training"]["judge_after_iters"], state.warmup_total)
    warnings = collapse_warnings(
        state.history, record, train_stats, run.cfg, data.gt_per_image, state.iteration, judge_after
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
    clip = t["gradient_clip"]
    run.say(
        f"training {t['epochs'] - state.epoch} epoch(s) x {iters} iterations, batch {t['batch_size']} x "
        f"{distributed.world()}; gradient clipping {'max_norm ' + str(clip['max_norm']) if clip['enabled'] else 'off'}"
    )
    for epoch in range(state.epoch, t["epochs"]):
        if hasattr(data.base_sampler, "set_epoch"):
            data.base_sampler.set_epoch(epoch)
        try:
            stats = train_one_epoch(
                ctx, data.train_loader, epoch, state, t, warmup, run.log.record, run.say, t["iters_per_epoch"]
            )
        except NonFiniteError as e:
            run.say(f"ERROR: {e}")
            run.log.record({"type": "stopped", "epoch": epoch, "iter": state.iteration, "reason": str(e)})
            return 2
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
        )
        distributed.barrier()
    return 0


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

        report = data_report(data.train_set.coco, getattr(model, "module", model), data.names, data.label_to_cat)
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
