"""Why did detections collapse? Turns evaluation and training numbers into named causes."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import numpy as np


def score_summary(max_scores: List[float], kept_counts: List[int], all_scores: List[float], thresh: float) -> Dict[str, Any]:
    """Detections per image above ``thresh`` and the score distribution of one evaluation."""
    n = max(len(kept_counts), 1)
    scores = np.asarray(all_scores, dtype=np.float64)
    q = np.quantile(scores, [0.5, 0.9, 0.99]).tolist() if scores.size else [0.0, 0.0, 0.0]
    return {
        "dets_per_image": float(sum(kept_counts) / n),
        "images_without_dets": float(sum(1 for c in kept_counts if c == 0) / n),
        "score_p50": q[0],
        "score_p90": q[1],
        "score_p99": q[2],
        "max_score_mean": float(np.mean(max_scores)) if max_scores else 0.0,
        "max_score": float(max(max_scores)) if max_scores else 0.0,
        "score_thresh": thresh,
        "score_hist": np.histogram(scores, bins=10, range=(0.0, 1.0))[0].tolist(),
    }


def collapse_warnings(
    history: List[Dict[str, Any]],
    current: Dict[str, Any],
    train: Dict[str, float],
    cfg: Dict[str, Any],
    gt_per_image: float,
) -> List[str]:
    """Warnings for the current evaluation, each followed by the likely causes with their numbers.

    ``history``: earlier evaluation records; ``current``: this one (score_summary + AP);
    ``train``: the last epoch's means of losses, grad_norm and the heads' training statistics.
    """
    dets = current["dets_per_image"]
    best = max((h["dets_per_image"] for h in history), default=None)
    if dets == 0:
        head = f"detections collapsed: 0 detections per image above score {current['score_thresh']:g} (ground truth: {gt_per_image:.2f} per image)"
    elif best is not None and best > 0 and dets < 0.5 * (min(best, gt_per_image) if gt_per_image > 0 else best):
        # An untrained model over-detects (~100 boxes/image); falling from there towards the
        # ground-truth count is learning, not collapse. Falling below half of it is a drop.
        head = f"detections per image dropped sharply: {dets:.2f} now vs {best:.2f} at best ({gt_per_image:.2f} objects per image)"
    elif gt_per_image > 0 and dets < 0.1 * gt_per_image and len(history) >= 2:
        head = f"very few detections: {dets:.2f} per image vs {gt_per_image:.2f} ground-truth objects"
    else:
        return []
    causes = []
    thresh = current["score_thresh"]
    if current["max_score"] < thresh:
        causes.append(
            f"every score is under box_score_thresh={thresh:g} (highest {current['max_score']:.3f}): the classifier is "
            f"under-confident; raise model.roi_head.cls_pos_weight (2-3) or class_weight for rare classes, train longer, "
            f"or lower model.kwargs.box_score_thresh to inspect")
    pos = train.get("roi/pos_per_image")
    if pos is not None and pos < 4:
        causes.append(
            f"few positive RoIs per image ({pos:.1f} sampled): the classifier sees mostly background; "
            f"model.roi_head.cls_pos_weight > 1 or bbox_avg_factor: positive compensate, check boxes/labels")
    fg = train.get("roi/fg_prob")
    if fg is not None and fg < 0.3:
        causes.append(f"mean probability of the true class on positive RoIs is {fg:.2f}: foreground is being "
                      f"out-voted by background; raise model.roi_head.cls_pos_weight")
    rpn_pos = train.get("rpn/pos_per_image")
    if rpn_pos is not None and rpn_pos < 2:
        causes.append(f"the RPN samples {rpn_pos:.1f} positive anchors per image: objects are smaller or shaped "
                      f"unlike the anchors (tiny objects?), or boxes are wrong; check anchor sizes and box format")
    gn, gmax = train.get("grad_norm"), train.get("grad_norm_max")
    clip = cfg["training"]["gradient_clip"]
    if gn is not None and gmax is not None and gmax > 10 * max(gn, 1e-12):
        causes.append(f"gradient spikes: max grad_norm {gmax:.1f} vs mean {gn:.2f}" +
                      ("" if clip["enabled"] else "; enable --clip-grad-norm 35 (training.gradient_clip)"))
    elif gn is not None and not clip["enabled"] and gn > 100:
        causes.append(f"large gradients (mean grad_norm {gn:.1f}) with no clipping: --clip-grad-norm 35")
    skipped = train.get("skipped_steps", 0)
    if skipped:
        causes.append(f"{int(skipped)} steps were skipped for non-finite loss/gradients: lower --lr, add --clip-grad-norm")
    lr, bs, world = cfg["training"]["lr"], cfg["training"]["batch_size"], train.get("world_size", 1)
    ref_lr = 0.02 * bs * world / 16
    if lr > 2 * ref_lr:
        causes.append(f"lr {lr:g} is {lr / ref_lr:.1f}x the linear-scaling rule for {bs * world} images per step "
                      f"(0.02 x {bs * world}/16 = {ref_lr:g}): lower --lr or add --clip-grad-norm")
    if len(history) >= 1 and train.get("loss") is not None and history[-1].get("train_loss") is not None:
        prev = history[-1]["train_loss"]
        if math.isfinite(prev) and train["loss"] > 1.5 * prev:
            causes.append(f"training loss rose from {prev:.3f} to {train['loss']:.3f}: divergence; lower --lr, clip gradients")
    if not causes:
        causes.append("no loss-side cause stands out: check the data report (empty images, dropped annotations) "
                      "and the score distribution in metrics.jsonl")
    return [head] + [f"  likely cause: {c}" for c in causes]
