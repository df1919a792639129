"""End-of-run pictures: loss / grad-norm / AP curves (overall and per class) from metrics.jsonl, and a
gallery of ground truth beside predictions for the images that show the failure."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, List, Optional

import torch


def read_metrics(path: str) -> List[Dict]:
    out = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a crash: skip it, keep the rest
    return out


def current_records(records: List[Dict]) -> List[Dict]:
    """The records a resumed run has not superseded: at each ``run`` record of a --resume (train.py's
    start_record: the checkpoint's ``epoch`` and ``iter``), the earlier runs' train records past that
    iteration and eval records past that epoch are dropped (the resumed run writes them again)."""
    kept: List[Dict] = []
    for r in records:
        if r.get("type") == "run" and r.get("resumed_from") is not None:
            it, ep = r.get("iter"), r.get("epoch")
            kept = [
                k
                for k in kept
                if not (k.get("type") == "train" and it is not None and k.get("iter", 0) > it)
                and not (k.get("type") == "eval" and ep is not None and k.get("epoch", -1) > ep)
            ]
        kept.append(r)
    return kept


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(metrics_path: str, out_dir: str) -> List[str]:
    """Write training_curves.png (loss terms, grad norm) and eval_curves.png (AP, detections)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = current_records(read_metrics(metrics_path))
    train = [r for r in records if r.get("type") == "train"]
    # An epoch that --eval-every skipped has an "eval" record with its training summary only.
    evals = [r for r in records if r.get("type") == "eval" and "dets_per_image" in r]
    written = []
    if train:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        its = [r["iter"] for r in train]
        for k in sorted({k for r in train for k in r if k.startswith("loss_")}):
            axes[0].plot(its, [r.get(k, float("nan")) for r in train], label=k)
        axes[0].plot(its, [r["loss"] for r in train], "k", lw=1.5, label="loss")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("iteration")
        axes[0].legend(fontsize=8)
        axes[0].set_title("loss terms")
        axes[1].plot(its, [r["grad_norm"] for r in train])
        axes[1].set_yscale("log")
        axes[1].set_xlabel("iteration")
        axes[1].set_title("grad_norm (before clipping)")
        written.append(_save(fig, os.path.join(out_dir, "training_curves.png")))
    if evals:
        per_class = any(r.get("per_class") for r in evals)
        fig, axes = plt.subplots(1, 3 if per_class else 2, figsize=(18 if per_class else 12, 4))
        ep = [r["epoch"] for r in evals]
        for k in ("bbox_AP", "segm_AP", "keypoints_AP", "bbox_AP50"):
            if any(k in r for r in evals):
                axes[0].plot(ep, [r.get(k, float("nan")) for r in evals], marker="o", label=k)
        axes[0].set_xlabel("epoch")
        axes[0].legend()
        axes[0].set_title("COCO AP")
        axes[1].plot(ep, [r["dets_per_image"] for r in evals], marker="o", label="detections / image")
        axes[1].set_ylabel("detections / image (score >= threshold)")
        twin = axes[1].twinx()
        twin.plot(ep, [r.get("max_score_mean", float("nan")) for r in evals], "C1", marker="x", label="mean max score")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("mean of each image's max score")
        axes[1].set_xlabel("epoch")
        axes[1].legend(loc="upper left")
        twin.legend(loc="upper right")
        axes[1].set_title("collapse watch")
        if per_class:
            classes = sorted({c for r in evals for c in (r.get("per_class") or {})})
            for c in classes:
                pc = [(r.get("per_class") or {}).get(c, {}) for r in evals]
                axes[2].plot(ep, [p.get("bbox_AP50", float("nan")) for p in pc], marker="o", label=f"{c} AP50")
                axes[2].plot(ep, [p.get("recall", float("nan")) for p in pc], ls="--", alpha=0.6, label=f"{c} recall")
            axes[2].set_xlabel("epoch")
            axes[2].set_ylim(-0.02, 1.02)
            axes[2].legend(fontsize=7, ncol=2)
            axes[2].set_title("per class: bbox AP50 and recall at the score threshold")
        written.append(_save(fig, os.path.join(out_dir, "eval_curves.png")))
    return written


def _colors(n: int) -> List[str]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return ["#%02x%02x%02x" % tuple(int(255 * c) for c in cmap(i % 10)[:3]) for i in range(n + 1)]


def _draw(image, boxes, labels, masks, names, colors, scores=None, min_side: int = 256):
    """One panel: masks then boxes, coloured by class, with short labels. Small images are drawn
    upscaled (to ``min_side``) so that the labels' fixed-size font does not cover the objects."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    scale = max(1, -(-min_side // max(image.shape[-2:])))
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if scale > 1:
        canvas = torch.nn.functional.interpolate(canvas[None].float(), scale_factor=scale, mode="nearest")[0]
        canvas = canvas.to(torch.uint8)
        boxes = boxes * scale
        if masks is not None and len(masks):
            masks = torch.nn.functional.interpolate(masks[None].float(), scale_factor=scale, mode="nearest")[0] > 0
    if len(boxes) == 0:
        return canvas
    cols = [colors[int(lab) % len(colors)] for lab in labels]
    if masks is not None and len(masks):
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.4, colors=cols)
    text = [names[int(lab) - 1] if 0 < int(lab) <= len(names) else str(int(lab)) for lab in labels]
    if scores is not None:
        text = [f"{t} {s:.2f}" for t, s in zip(text, scores.tolist())]
    return draw_bounding_boxes(canvas, boxes, labels=text, colors=cols, width=2)


def _miss_score(gt, out, thresh: float, rarity: Dict[int, float]) -> float:
    """How badly an image is missed: the rarity of each ground-truth object no detection finds."""
    from diagnostics import matched_gt

    if len(gt["labels"]) == 0:
        return 0.0
    keep = out["scores"] >= thresh
    missed = 0.0
    for lab in gt["labels"].unique().tolist():
        g = gt["boxes"][gt["labels"] == lab].numpy().astype("float64")
        sel = keep & (out["labels"] == lab)
        hit = matched_gt(g, out["boxes"][sel].numpy().astype("float64"), out["scores"][sel].numpy())
        missed += float((~hit).sum()) * rarity.get(lab, 1.0)
    return missed


@torch.no_grad()
def draw_gallery(
    model,
    dataset,
    device,
    names: List[str],
    out_path: str,
    count: int = 8,
    label_to_cat: Optional[Dict[int, int]] = None,
    candidates: int = 64,
) -> Optional[str]:
    """Ground truth (left of each pair) beside predictions (right; boxes and masks, coloured by class)
    for the images that show the failure: those whose missed objects are rarest first, not simply
    the first ``count``."""
    from torchvision.utils import make_grid, save_image

    if count <= 0 or len(dataset) == 0:
        return None
    net = getattr(model, "module", model)
    net.eval()
    thresh = float(net.roi_heads.score_thresh)
    items = []
    for idx in range(min(candidates, len(dataset))):
        image, gt = dataset[idx]
        out = {k: v.cpu() for k, v in net([image.to(device)])[0].items()}
        items.append((image, gt, out))
    freq = Counter(int(lab) for _, gt, _ in items for lab in gt["labels"])
    rarity = {lab: 1.0 / n for lab, n in freq.items()}
    order = sorted(range(len(items)), key=lambda i: -_miss_score(items[i][1], items[i][2], thresh, rarity))
    colors = _colors(len(names))
    tiles, size = [], None
    for i in order[:count]:
        image, gt, out = items[i]
        keep = out["scores"] >= max(thresh, 0.5)  # the confident ones: a readable picture
        gt_masks = gt["masks"].bool() if "masks" in gt else None
        pred_masks = out["masks"][keep][:, 0] > 0.5 if "masks" in out else None
        pair = [
            _draw(image, gt["boxes"], gt["labels"], gt_masks, names, colors),
            _draw(image, out["boxes"][keep], out["labels"][keep], pred_masks, names, colors, out["scores"][keep]),
        ]
        for canvas in pair:
            size = size or canvas.shape[-2:]
            if canvas.shape[-2:] != size:
                canvas = torch.nn.functional.interpolate(canvas[None].float(), size=tuple(size))[0].to(torch.uint8)
            tiles.append(canvas.float() / 255)
    # Two columns per image: ground truth, then the prediction.
    save_image(make_grid(tiles, nrow=min(4, len(tiles)), padding=2), out_path)
    return out_path
