"""One training epoch and one evaluation."""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as tdist

import dist
import tv_lossfix
from diagnostics import score_summary


class NonFiniteError(RuntimeError):
    """Training stopped because a loss or the gradient norm was not finite."""


def _to(device, images, targets):
    images = [i.to(device, non_blocking=True) for i in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    device: torch.device,
    epoch: int,
    state: Dict[str, int],
    cfg: Dict[str, Any],
    scaler: Optional[torch.amp.GradScaler],
    warmup: Optional[torch.optim.lr_scheduler.LRScheduler],
    log: Callable[[Dict[str, Any]], None],
    say: Callable[[str], None],
    max_iters: Optional[int] = None,
) -> Dict[str, float]:
    """Train for one epoch. Returns the epoch's means (losses, grad_norm, head statistics).

    Per step: forward (autocast under --amp) -> backward -> GradScaler.unscale_ -> global-norm
    clipping -> one host read of losses + grad norm (as torchvision's reference reads the loss)
    -> the step, unless something is non-finite: then ``nan_policy`` stops or skips, and the
    bad values never reach the weights.
    """
    t = cfg["training"]
    clip = t["gradient_clip"]
    max_norm = clip["max_norm"] if clip["enabled"] else math.inf
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    n_iters = len(loader) if max_iters is None else min(len(loader), max_iters)
    bar = None
    if dist.is_main():
        try:
            from tqdm import tqdm

            bar = tqdm(total=n_iters, desc=f"epoch {epoch}", disable=None, dynamic_ncols=True, leave=False)
        except ImportError:
            bar = None

    sums: Dict[str, float] = defaultdict(float)
    count = 0
    grad_max = 0.0
    window_imgs, window_t0 = 0, time.perf_counter()
    total_imgs = 0
    epoch_t0 = time.perf_counter()
    stat_sums: Dict[str, torch.Tensor] = {}
    stats_window = 0
    for i, (images, targets) in enumerate(loader):
        if i >= n_iters:
            break
        images, targets = _to(device, images, targets)
        with torch.autocast(device.type, enabled=scaler is not None and device.type == "cuda"):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip and measure true gradients, not scaled ones
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=clip["norm_type"])

        keys = list(loss_dict)
        vec = torch.stack([loss_dict[k].detach().float() for k in keys] + [loss.detach().float(), grad_norm.float()])
        bad = (~torch.isfinite(vec)).any().float().reshape(1)
        if dist.is_dist():  # average for logging; any rank's non-finite value stops every rank
            packed = torch.cat([torch.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0), bad])
            tdist.all_reduce(packed)
            n = vec.numel()
            # One host read: the rank means, the any-rank flag, and this rank's own values.
            both = torch.cat([packed[:n] / dist.world(), packed[n:], vec]).tolist()
            any_bad = both[n] > 0
            shown = [v if math.isfinite(l) else l for v, l in zip(both[:n], both[n + 1 :])]
        else:
            shown = vec.tolist()  # the step's one host sync
            any_bad = not all(math.isfinite(v) for v in shown)
        values = dict(zip(keys + ["loss", "grad_norm"], shown))
        it = state["iteration"]

        amp_overflow = scaler is not None and not math.isfinite(values["grad_norm"]) and all(
            math.isfinite(values[k]) for k in keys
        )
        if any_bad and not amp_overflow:
            culprits = [k for k in keys + ["grad_norm"] if not math.isfinite(values[k])] or ["a loss term on another rank"]
            msg = (f"non-finite {', '.join(culprits)} at epoch {epoch}, iteration {it} "
                   f"(losses: {', '.join(f'{k}={values[k]:.4g}' for k in keys)}; grad_norm={values['grad_norm']:.4g})")
            optimizer.zero_grad(set_to_none=True)
            log({"type": "nonfinite", "epoch": epoch, "iter": it, "terms": culprits, **values})
            if t["nan_policy"] == "stop":
                raise NonFiniteError(msg + ". Stopped before the step (--nan-policy stop); checkpoints on disk are intact. "
                                           "Try --clip-grad-norm 35, a lower --lr, or --nan-policy skip.")
            state["skipped"] += 1
            state["consecutive_skips"] += 1
            if scaler is not None:
                scaler.update()  # lower the loss scale as for an overflow
            say(f"skipped step: {msg}")
            if state["consecutive_skips"] >= t["max_consecutive_skips"]:
                raise NonFiniteError(f"{state['consecutive_skips']} consecutive steps skipped (--max-consecutive-skips); last: {msg}")
            state["iteration"] += 1
            if bar is not None:
                bar.update(1)
            continue

        if scaler is not None:
            scaler.step(optimizer)  # skips the step itself on an AMP overflow
            scaler.update()
            if amp_overflow:
                state["amp_overflows"] += 1
        else:
            optimizer.step()
        state["consecutive_skips"] = 0
        if warmup is not None and state["iteration"] < state["warmup_total"]:
            warmup.step()

        for k, v in values.items():
            if math.isfinite(v):
                sums[k] += v
        if math.isfinite(values["grad_norm"]):
            grad_max = max(grad_max, values["grad_norm"])
        count += 1
        window_imgs += len(images) * dist.world()
        total_imgs += len(images) * dist.world()
        state["iteration"] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)

        if (i + 1) % t["print_freq"] == 0 or i + 1 == n_iters:
            # The heads' statistics, sampled at the print points (the epoch mean is over these).
            stats = tv_lossfix.training_stats(model)
            for k, v in stats.items():
                stat_sums[k] = stat_sums[k] + v if k in stat_sums else v.clone()
            stats_window += 1 if stats else 0
            now = time.perf_counter()
            speed = window_imgs / max(now - window_t0, 1e-9)
            eta = (now - epoch_t0) / (i + 1) * (n_iters - i - 1)
            lr = optimizer.param_groups[0]["lr"]
            names = list(stats)
            head_stats = dict(zip(names, torch.stack([stats[k] for k in names]).tolist())) if stats else {}
            log({"type": "train", "epoch": epoch, "iter": state["iteration"], "lr": lr, **values,
                 "img_per_s": speed, **head_stats})
            say(f"epoch {epoch} [{i + 1:>{len(str(n_iters))}}/{n_iters}] eta {_fmt_eta(eta)} lr {lr:.5f} "
                f"loss {values['loss']:.4f} (" + " ".join(f"{k.replace('loss_', '')} {values[k]:.4f}" for k in keys)
                + f") grad_norm {values['grad_norm']:.3f} {speed:.1f} img/s")
            window_imgs, window_t0 = 0, now
    if bar is not None:
        bar.close()

    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["grad_norm_max"] = grad_max
    out["steps"] = count
    out["skipped_steps"] = state["skipped"]
    out["world_size"] = dist.world()
    out["epoch_time"] = time.perf_counter() - epoch_t0
    out["img_per_s"] = total_imgs / max(out["epoch_time"], 1e-9)
    if stat_sums and stats_window:
        names = list(stat_sums)
        out.update(dict(zip(names, (torch.stack([stat_sums[k] for k in names]) / stats_window).tolist())))
    return out


def _encode_masks(masks: torch.Tensor) -> List[Dict[str, Any]]:
    from pycocotools import mask as mask_utils

    binary = (masks[:, 0] > 0.5).to(torch.uint8).cpu().numpy()
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, coco_gt, label_to_cat: Dict[int, int], say=print) -> Dict[str, Any]:
    """COCO AP (bbox, segm, keypoints as the model predicts them) plus score statistics.

    Detections are made with the score threshold lowered to 0 and filtered at the model's
    ``box_score_thresh`` afterwards: the kept set is the same (NMS is per class and keeps the
    higher score), and the scores under the threshold show how close a collapsed model is.
    """
    from pycocotools.cocoeval import COCOeval

    net = getattr(model, "module", model)
    thresh = float(net.roi_heads.score_thresh)
    net.roi_heads.score_thresh = 0.0
    model.eval()
    results: Dict[str, List[Dict[str, Any]]] = {"bbox": [], "segm": [], "keypoints": []}
    per_image: Dict[int, tuple] = {}
    try:
        for images, targets in loader:
            images = [i.to(device) for i in images]
            outputs = net(images)
            for out, tgt in zip(outputs, targets):
                image_id = int(tgt["image_id"])
                scores = out["scores"].cpu()
                keep = scores >= thresh
                per_image[image_id] = (float(scores.max()) if scores.numel() else 0.0, int(keep.sum()), scores[:100].tolist())
                if not keep.any():
                    continue
                boxes = out["boxes"][keep].cpu()
                xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
                cats = [label_to_cat[int(lab)] for lab in out["labels"][keep].cpu()]
                kept_scores = scores[keep].tolist()
                for b, c, s in zip(xywh, cats, kept_scores):
                    results["bbox"].append({"image_id": image_id, "category_id": c, "bbox": [round(v, 2) for v in b], "score": s})
                if "masks" in out:
                    for rle, c, s in zip(_encode_masks(out["masks"][keep]), cats, kept_scores):
                        results["segm"].append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
                if "keypoints" in out:
                    for kp, c, s in zip(out["keypoints"][keep].cpu(), cats, kept_scores):
                        results["keypoints"].append({"image_id": image_id, "category_id": c, "keypoints": kp.flatten().tolist(), "score": s})
    finally:
        net.roi_heads.score_thresh = thresh

    # Gather to rank 0; a DistributedSampler may repeat images to even out the ranks.
    gathered = dist.all_gather((results, per_image))
    if not dist.is_main():
        return {}
    merged: Dict[str, List] = {k: [] for k in results}
    seen: Dict[int, tuple] = {}
    for res, img in gathered:
        fresh = set(img) - set(seen)
        seen.update({k: img[k] for k in fresh})
        for k in merged:
            merged[k].extend(r for r in res[k] if r["image_id"] in fresh)

    summary: Dict[str, Any] = {}
    iou_types = ["bbox"]
    if hasattr(net.roi_heads, "has_mask") and net.roi_heads.has_mask():
        iou_types.append("segm")
    if hasattr(net.roi_heads, "has_keypoint") and net.roi_heads.has_keypoint():
        iou_types.append("keypoints")
    img_ids = sorted(seen)
    for iou in iou_types:
        if not merged[iou]:
            summary[f"{iou}_AP"] = 0.0
            summary[f"{iou}_AP50"] = 0.0
            say(f"{iou}: no detections above score {thresh:g}: AP 0")
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            dt = coco_gt.loadRes(merged[iou])
            ev = COCOeval(coco_gt, dt, iou)
            ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
        with contextlib.redirect_stdout(buf):
            ev.summarize()
        say(f"IoU metric: {iou}\n" + "\n".join(line for line in buf.getvalue().splitlines() if line.startswith(" Average")))
        summary[f"{iou}_AP"] = float(ev.stats[0])
        summary[f"{iou}_AP50"] = float(ev.stats[1])
    maxes = [seen[i][0] for i in img_ids]
    kept = [seen[i][1] for i in img_ids]
    all_scores = [s for i in img_ids for s in seen[i][2]]
    summary.update(score_summary(maxes, kept, all_scores, thresh))
    summary["images"] = len(img_ids)
    return summary
