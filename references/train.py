r"""Train or evaluate a torchvision two-stage detector with tv_lossfix's configurable losses.

Command line compatible with torchvision's references/detection/train.py, plus a YAML config,
gradient clipping, a NaN policy, data checks and collapse diagnostics.

    # the embedded demo (CPU, ~10 min):
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
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import dist  # noqa: E402
from checks import DataError, check_samples, load_coco_checked  # noqa: E402
from data import (  # noqa: E402
    CocoDetection,
    GroupedBatchSampler,
    SeededRandomSampler,
    aspect_ratio_groups,
    collate,
    copy_paste_collate,
    train_transforms,
)
from diagnostics import collapse_warnings  # noqa: E402
from engine import NonFiniteError, evaluate, train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402
from train_config import ConfigError, dump, resolve  # noqa: E402

CHECKPOINT_FORMAT = "tv_lossfix-train-1"


class CheckpointError(ValueError):
    """A --resume checkpoint that cannot be used."""


# -- output ---------------------------------------------------------------------------------------
class RunLog:
    """Rank-0 output: console lines (through tqdm when a bar is shown), metrics.jsonl, TensorBoard."""

    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if enabled:
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
        if not self.enabled:
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


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"--resume: cannot read {path} (truncated, or not a tv_lossfix training checkpoint: torchvision's "
            f"reference checkpoints hold an argparse.Namespace, which safe loading refuses): {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = " It looks like a bare model state_dict: start from it with --weights PATH." if isinstance(ckpt, dict) and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else ""
        raise CheckpointError(f"--resume: {path} is not a tv_lossfix training checkpoint (found {keys}).{hint}")
    return ckpt


# -- setup ----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def dataset_files(cfg: Dict[str, Any]) -> Dict[str, Any]:
    d = cfg["data"]
    if d["dataset"] == "shapes":
        from shapes import ShapesSpec, ensure_shapes

        spec = ShapesSpec(**d["shapes"])
        if dist.is_main():  # one writer; the other ranks wait for the files
            paths = ensure_shapes(d["data_path"], spec)
        dist.barrier()
        paths = ensure_shapes(d["data_path"], spec)
        return {**paths, "label_mode": "contiguous"}
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


def param_groups(model: torch.nn.Module, weight_decay: float, norm_weight_decay: Optional[float]):
    if norm_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm,
                  torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)
    norm, other = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (norm if isinstance(module, norm_types) else other).append(p)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


def main(argv: Optional[List[str]] = None) -> int:
    t_start = time.time()
    cfg, loss_cfg = resolve(argv)
    t, d, m = cfg["training"], cfg["data"], cfg["model"]
    if t["num_threads"]:
        torch.set_num_threads(t["num_threads"])
    # torchvision's default is --device cuda; without a GPU we say so and use the CPU.
    cuda_missing = t["device"].startswith("cuda") and not torch.cuda.is_available()
    device = torch.device("cpu" if cuda_missing else t["device"])
    rank, world, local_rank = dist.init(device.type, cfg["distributed"]["backend"], cfg["distributed"]["dist_url"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    out_dir = t["output_dir"]
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    log = RunLog(out_dir, dist.is_main())
    say = log.say
    if cuda_missing:
        say("CUDA is not available: running on the CPU")
    seed_everything(t["seed"] + rank)
    if t["use_deterministic_algorithms"]:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    if dist.is_main():
        atomic_write_text(dump(cfg, loss_cfg), os.path.join(out_dir, "config.yaml"))
    say(f"tv_lossfix training: {m['name']} ({'stock torchvision' if m['stock'] else 'tv_lossfix heads'}) on "
        f"{device}, {world} process(es); config saved to {os.path.join(out_dir, 'config.yaml')}")

    # -- data -----------------------------------------------------------------------------------
    files = dataset_files(cfg)
    need_masks = "maskrcnn" in m["name"]
    need_kps = "keypoint" in m["name"]
    policy = d["bad_annotations"]
    coco_val, label_map, names, val_report = load_coco_checked(
        files["val_ann"], files["val_images"], "val", policy, need_masks, files["label_mode"])
    say(val_report.summary())
    log.record({"type": "data", **val_report.to_dict()})
    num_classes = m["num_classes"] or (max(label_map.values()) + 1)
    if max(label_map.values()) >= num_classes:
        raise ConfigError(f"model.num_classes={num_classes} but the data has labels up to {max(label_map.values())} "
                          f"(num_classes counts the background: use {max(label_map.values()) + 1})")
    val_set = CocoDetection(coco_val, files["val_images"], label_map, None, d["backend"], need_masks, need_kps)
    label_to_cat = {v: k for k, v in label_map.items()}
    gt_per_image = sum(1 for a in coco_val.dataset["annotations"] if not a.get("iscrowd", 0)) / max(len(val_set), 1)

    train_set = None
    if not t["test_only"]:
        coco_train, train_map, _, train_report = load_coco_checked(
            files["train_ann"], files["train_images"], "train", policy, need_masks, files["label_mode"])
        if train_map != label_map:
            raise DataError(f"train and val define different categories: {sorted(train_map)} vs {sorted(label_map)}")
        say(train_report.summary())
        log.record({"type": "data", **train_report.to_dict()})
        plain = CocoDetection(coco_train, files["train_images"], label_map, None, d["backend"], need_masks, need_kps)
        problems = check_samples(plain, num_classes, d["check_samples"])
        if problems:
            raise DataError("decoded training samples have problems:\n  " + "\n  ".join(problems[:25]))
        train_set = CocoDetection(coco_train, files["train_images"], label_map, train_transforms(d["augmentation"]),
                                  d["backend"], need_masks, need_kps)

    # -- model ----------------------------------------------------------------------------------
    torch.manual_seed(t["seed"])  # same initial weights on every rank
    model = build_model(m["name"], num_classes, loss_cfg, m["weights"], m["weights_backbone"],
                        m["trainable_backbone_layers"], m["rpn_score_thresh"], m["stock"], m["kwargs"])
    model.to(device)
    if t["sync_bn"]:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm); on CPU drop it")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if dist.is_dist():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    seed_everything(t["seed"] + 1000 * rank)

    # -- loaders --------------------------------------------------------------------------------
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    val_sampler = DistributedSampler(val_set, shuffle=False) if dist.is_dist() else None
    val_loader = DataLoader(val_set, batch_size=1, sampler=val_sampler, num_workers=d["workers"], collate_fn=collate)

    scaler = None
    if t["amp"]:
        if device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        else:
            say("--amp needs CUDA (float16 autocast + GradScaler): training in float32 on the CPU")

    if t["test_only"]:
        if m["weights"] is None and not t["resume"]:
            say("--test-only without --weights or --resume evaluates a randomly initialised model")
        if t["resume"]:
            net.load_state_dict(load_checkpoint(t["resume"])["model"])
        res = evaluate(model, val_loader, device, coco_val, label_to_cat, say)
        if dist.is_main():
            log.record({"type": "eval", "epoch": t["start_epoch"], **res})
        log.close()
        dist.cleanup()
        return 0

    if dist.is_dist():
        base_sampler = DistributedSampler(train_set, shuffle=True, seed=t["seed"])
    else:
        base_sampler = SeededRandomSampler(len(train_set), t["seed"])
    if d["aspect_ratio_group_factor"] >= 0:
        groups = aspect_ratio_groups(train_set.aspect_ratios(), d["aspect_ratio_group_factor"])
        batch_sampler = GroupedBatchSampler(base_sampler, groups, t["batch_size"])
    else:
        batch_sampler = torch.utils.data.BatchSampler(base_sampler, t["batch_size"], drop_last=True)
    if d["use_copypaste"] and not need_masks:
        raise ConfigError("--use-copypaste pastes instance masks: it needs a Mask R-CNN model")
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, num_workers=d["workers"],
                              collate_fn=copy_paste_collate if d["use_copypaste"] else collate)

    # -- optimisation ---------------------------------------------------------------------------
    groups_ = param_groups(net, t["weight_decay"], t["norm_weight_decay"])
    if t["opt"] == "sgd":
        optimizer = torch.optim.SGD(groups_, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(groups_, lr=t["lr"], weight_decay=t["weight_decay"])
    if t["lr_scheduler"] == "multisteplr":
        lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=t["lr_steps"], gamma=t["lr_gamma"])
    else:
        lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t["epochs"])
    iters_per_epoch = len(train_loader) if t["iters_per_epoch"] is None else min(len(train_loader), t["iters_per_epoch"])
    warmup_total = min(t["warmup_iters"], max(iters_per_epoch - 1, 0))  # torchvision: first epoch only
    warmup = None
    if warmup_total > 0:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=t["warmup_factor"], total_iters=warmup_total)

    state = {"iteration": 0, "skipped": 0, "consecutive_skips": 0, "amp_overflows": 0, "warmup_total": warmup_total}
    history: List[Dict[str, Any]] = []
    start_epoch = t["start_epoch"]
    if t["resume"]:
        ckpt = load_checkpoint(t["resume"])
        try:
            net.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"--resume: {t['resume']} was saved from another model: {str(e).splitlines()[0]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if warmup is not None and ckpt.get("warmup") is not None:
            warmup.load_state_dict(ckpt["warmup"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state.update({k: ckpt["state"][k] for k in ("iteration", "skipped", "amp_overflows") if k in ckpt["state"]})
        history = list(ckpt.get("history", []))
        start_epoch = ckpt["epoch"] + 1
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"][rank] if rank < len(rng["torch"]) else rng["torch"][0])
        random.setstate(_py_state(rng["python"]))
        if torch.cuda.is_available() and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][rank] if rank < len(rng["cuda"]) else rng["cuda"][0])
        say(f"resumed from {t['resume']}: epoch {ckpt['epoch']} done, iteration {state['iteration']}")

    say(f"training {t['epochs'] - start_epoch} epoch(s) x {iters_per_epoch} iterations, batch {t['batch_size']} x {world}; "
        f"gradient clipping {'max_norm ' + str(t['gradient_clip']['max_norm']) if t['gradient_clip']['enabled'] else 'off'}; "
        f"losses: {loss_cfg if not m['stock'] else 'stock torchvision'}")
    for epoch in range(start_epoch, t["epochs"]):
        if hasattr(base_sampler, "set_epoch"):
            base_sampler.set_epoch(epoch)
        try:
            train_stats = train_one_epoch(model, optimizer, train_loader, device, epoch, state, cfg, scaler, warmup,
                                          log.record, say, t["iters_per_epoch"])
        except NonFiniteError as e:
            say(f"ERROR: {e}")
            log.record({"type": "stopped", "epoch": epoch, "iter": state["iteration"], "reason": str(e)})
            log.close()
            dist.cleanup()
            return 2
        lr_scheduler.step()
        record = {"type": "eval", "epoch": epoch, "train_loss": train_stats.get("loss"), "img_per_s": train_stats["img_per_s"],
                  "skipped_steps": state["skipped"], "amp_overflows": state["amp_overflows"]}
        if (epoch + 1) % t["eval_every"] == 0 or epoch + 1 == t["epochs"]:
            res = evaluate(model, val_loader, device, coco_val, label_to_cat, say)
            if dist.is_main():
                record.update(res)
                warnings_ = collapse_warnings(history, record, train_stats, cfg, gt_per_image)
                for w in warnings_:
                    say(("WARNING: " if not w.startswith("  ") else "") + w)
                record["warnings"] = warnings_
                say(f"epoch {epoch}: bbox AP {res.get('bbox_AP', 0):.4f}" +
                    (f", segm AP {res['segm_AP']:.4f}" if "segm_AP" in res else "") +
                    f", {res['dets_per_image']:.2f} detections/image (gt {gt_per_image:.2f}), "
                    f"max score {res['max_score']:.3f}, {train_stats['img_per_s']:.1f} img/s")
                history.append(record)
        if dist.is_main():
            log.record(record)
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "warmup": warmup.state_dict() if warmup is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else {},
                "epoch": epoch,
                "state": {k: state[k] for k in ("iteration", "skipped", "amp_overflows")},
                "config": json.loads(json.dumps(cfg)),
                "loss_cfg": loss_cfg.to_dict(),
                "history": [{k: v for k, v in h.items() if isinstance(v, (int, float, str)) or v is None} for h in history],
            }
        rng_all = dist.all_gather(torch.get_rng_state())
        cuda_all = dist.all_gather(torch.cuda.get_rng_state(device)) if device.type == "cuda" else []
        if dist.is_main():
            ckpt["rng"] = {"torch": rng_all, "cuda": cuda_all, "python": list(_py_state_to_list(random.getstate()))}
            atomic_save(ckpt, os.path.join(out_dir, f"model_{epoch}.pth"))
            atomic_save(ckpt, os.path.join(out_dir, "checkpoint.pth"))
        dist.barrier()

    if dist.is_main():
        if t["plots"]:
            from visualize import draw_gallery, plot_curves

            written = plot_curves(log.path, out_dir)
            g = draw_gallery(model, val_set, device, names, os.path.join(out_dir, "gallery.png"), t["gallery_images"])
            written += [g] if g else []
            say("wrote " + ", ".join(written))
        total = str(datetime.timedelta(seconds=int(time.time() - t_start)))
        last = history[-1] if history else {}
        say(f"done in {total}: bbox AP {last.get('bbox_AP', float('nan')):.4f}"
            + (f", segm AP {last['segm_AP']:.4f}" if "segm_AP" in last else "")
            + f", {last.get('dets_per_image', float('nan')):.2f} detections/image")
    log.close()
    dist.cleanup()
    return 0


def _py_state_to_list(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state(saved):
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
