"""End-of-run pictures: loss / grad-norm / AP curves from metrics.jsonl, a prediction gallery."""

from __future__ import annotations

import json
import os
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

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
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
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
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
        written.append(_save(fig, os.path.join(out_dir, "eval_curves.png")))
    return written


@torch.no_grad()
def draw_gallery(model, dataset, device, names: List[str], out_path: str, count: int = 8, thresh: Optional[float] = None) -> Optional[str]:
    """A grid of validation predictions (boxes, labels, masks) drawn with torchvision.utils."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid, save_image

    if count <= 0 or len(dataset) == 0:
        return None
    net = getattr(model, "module", model)
    net.eval()
    thresh = float(net.roi_heads.score_thresh) if thresh is None else thresh
    tiles = []
    size = None
    for idx in range(min(count, len(dataset))):
        image, _ = dataset[idx]
        out = net([image.to(device)])[0]
        keep = out["scores"] >= max(thresh, 0.5)  # the confident ones: a readable picture
        canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
        if "masks" in out and keep.any():
            canvas = draw_segmentation_masks(canvas, out["masks"][keep][:, 0].cpu() > 0.5, alpha=0.45)
        if keep.any():
            labels = [f"{names[int(l) - 1] if 0 < int(l) <= len(names) else int(l)} {s:.2f}"
                      for l, s in zip(out["labels"][keep].cpu(), out["scores"][keep].cpu())]
            canvas = draw_bounding_boxes(canvas, out["boxes"][keep].cpu(), labels=labels, colors="yellow", width=1)
        size = size or canvas.shape[-2:]
        if canvas.shape[-2:] != size:
            canvas = torch.nn.functional.interpolate(canvas[None].float(), size=tuple(size))[0].to(torch.uint8)
        tiles.append(canvas.float() / 255)
    save_image(make_grid(tiles, nrow=min(4, len(tiles)), padding=2), out_path)
    return out_path
