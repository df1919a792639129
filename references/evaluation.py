"""COCO evaluation: the model's detections over the validation set, COCO AP per IoU type (pycocotools),
per-class numbers and score statistics (torchvision keeps this in its references' coco_eval / engine).

``evaluate`` runs the whole pass; ``_predict`` / ``_gather`` / ``summarize_detections`` are its parts,
for a loop that predicts batch by batch itself (references/lightning/module.py).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, List, Optional

import numpy as np
import torch

import distributed
from diagnostics import per_class_summary, score_summary
from preemption import worker_batches
from writers import ConsoleWriter


def _encode_masks(masks: torch.Tensor) -> List[Dict[str, Any]]:
    from pycocotools import mask as mask_utils

    binary = (masks[:, 0] > 0.5).to(torch.uint8).cpu().numpy()
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _coco_results(
    out: Dict[str, torch.Tensor],
    image_id: int,
    keep: torch.Tensor,
    label_to_cat: Dict[int, int],
    results: Dict[str, List[Dict[str, Any]]],
) -> None:
    boxes = out["boxes"][keep].cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    cats = [label_to_cat[int(lab)] for lab in out["labels"][keep].cpu()]
    scores = out["scores"][keep].cpu().tolist()
    for b, c, s in zip(xywh, cats, scores):
        results["bbox"].append({"image_id": image_id, "category_id": c, "bbox": [round(v, 2) for v in b], "score": s})
    if "masks" in out:
        for rle, c, s in zip(_encode_masks(out["masks"][keep]), cats, scores):
            results["segm"].append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
    if "keypoints" in out:
        for kp, c, s in zip(out["keypoints"][keep].cpu(), cats, scores):
            results["keypoints"].append(
                {"image_id": image_id, "category_id": c, "keypoints": kp.flatten().tolist(), "score": s}
            )


@torch.no_grad()
def _predict(net, loader, device, label_to_cat, thresh: float):
    """Run the model over this rank's share of the validation set, at score threshold 0."""
    results: Dict[str, List[Dict[str, Any]]] = {"bbox": [], "segm": [], "keypoints": []}
    per_image: Dict[int, tuple] = {}
    saved = float(net.roi_heads.score_thresh)
    net.roi_heads.score_thresh = 0.0
    net.eval()
    try:
        with worker_batches(loader) as batches:
            for images, targets in batches:
                outputs = net([i.to(device) for i in images])
                for out, tgt in zip(outputs, targets):
                    image_id = int(tgt["image_id"])
                    scores = out["scores"].cpu()
                    keep = scores >= thresh
                    per_image[image_id] = (
                        float(scores.max()) if scores.numel() else 0.0,
                        int(keep.sum()),
                        scores[:100].tolist(),
                    )
                    if keep.any():
                        _coco_results(out, image_id, keep, label_to_cat, results)
    finally:
        net.roi_heads.score_thresh = saved
    return results, per_image


def _gather(results, per_image):
    """Merge every rank's detections on rank 0; a DistributedSampler may repeat images."""
    merged: Dict[str, List] = {k: [] for k in results}
    seen: Dict[int, tuple] = {}
    for res, img in distributed.all_gather((results, per_image)):
        fresh = set(img) - set(seen)
        seen.update({k: img[k] for k in fresh})
        for k in merged:
            merged[k].extend(r for r in res[k] if r["image_id"] in fresh)
    return merged, seen


def _iou_types(net) -> List[str]:
    types = ["bbox"]
    if hasattr(net.roi_heads, "has_mask") and net.roi_heads.has_mask():
        types.append("segm")
    if hasattr(net.roi_heads, "has_keypoint") and net.roi_heads.has_keypoint():
        types.append("keypoints")
    return types


def _coco_eval(coco_gt, dets: List[Dict[str, Any]], iou: str, img_ids: List[int], writer):
    from pycocotools.cocoeval import COCOeval

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # pycocotools prints progress lines
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    writer.say(
        f"IoU metric: {iou}\n" + "\n".join(line for line in buf.getvalue().splitlines() if line.startswith(" Average"))
    )
    return ev


def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    coco_gt,
    label_to_cat: Dict[int, int],
    writer=None,
    class_names: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """COCO AP (bbox, segm, keypoints as the model predicts them), per-class numbers and score statistics.

    Detections are made with the score threshold lowered to 0 and filtered at the model's
    ``box_score_thresh`` afterwards: the kept set is the same (NMS is per class and keeps the
    higher score), and the scores under the threshold show how close a collapsed model is.
    pycocotools' summary lines go to ``writer.say`` (writers.EventWriter; default: the console).
    """
    net = getattr(model, "module", model)
    thresh = float(net.roi_heads.score_thresh)
    merged, seen = _gather(*_predict(net, loader, device, label_to_cat, thresh))
    if not distributed.is_main():
        return {}
    return summarize_detections(net, merged, seen, coco_gt, label_to_cat, thresh, writer, class_names)


def summarize_detections(
    net: torch.nn.Module,
    merged: Dict[str, List[Dict[str, Any]]],
    seen: Dict[int, tuple],
    coco_gt,
    label_to_cat: Dict[int, int],
    thresh: float,
    writer=None,
    class_names: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """:func:`evaluate`'s numbers from gathered detections (``_predict`` then ``_gather``); a loop that
    predicts batch by batch itself (Lightning's validation_step) calls this at the end."""
    writer = writer if writer is not None else ConsoleWriter()
    summary: Dict[str, Any] = {}
    img_ids = sorted(seen)
    evals = {}
    for iou in _iou_types(net):
        if not merged[iou]:
            summary[f"{iou}_AP"] = summary[f"{iou}_AP50"] = 0.0
            writer.say(f"{iou}: no detections above score {thresh:g}: AP 0")
            continue
        evals[iou] = _coco_eval(coco_gt, merged[iou], iou, img_ids, writer)
        summary[f"{iou}_AP"] = float(evals[iou].stats[0])
        summary[f"{iou}_AP50"] = float(evals[iou].stats[1])
    maxes = [seen[i][0] for i in img_ids]
    kept = [seen[i][1] for i in img_ids]
    all_scores = [s for i in img_ids for s in seen[i][2]]
    summary.update(score_summary(maxes, kept, all_scores, thresh))
    summary["images"] = len(img_ids)
    summary["per_class"] = per_class_summary(coco_gt, img_ids, merged["bbox"], evals, label_to_cat, class_names)
    return summary
