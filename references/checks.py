"""Data checks run before the first step: every problem names the image / annotation at fault.

The known causes of "zero detections" / NaN that come from data: degenerate
boxes, boxes outside the image, COCO xywh boxes written as xyxy, unknown category ids, label 0
(background) used for an object, missing image files, masks that are not 0/1, 0-255 images.
Policy ``stop`` (default) raises with the list; ``drop`` drops the faulty annotations (and
images whose file is missing) and says how many.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from PIL import Image

POLICIES = ("stop", "drop")
_TOL = 1.0  # px a box may overhang the image (annotation tools round); clipped by the loader


class DataError(ValueError):
    """The dataset has problems that the ``stop`` policy refuses to train on."""


@dataclass
class DataReport:
    split: str
    images: int = 0
    annotations: int = 0
    negatives: int = 0  # images without (non-crowd) annotations: kept as negatives
    crowd: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> annotations dropped
    dropped_images: int = 0
    problems: List[str] = field(default_factory=list)

    def summary(self) -> str:
        s = (
            f"{self.split}: {self.images} images, {self.annotations} annotations, "
            f"{self.negatives} images without annotations (kept as negatives), {self.crowd} crowd"
        )
        if self.dropped or self.dropped_images:
            s += (
                f"; dropped {sum(self.dropped.values())} annotations ({dict(self.dropped)}) "
                f"and {self.dropped_images} images"
            )
        return s

    def to_dict(self) -> Dict[str, Any]:
        return {
            "split": self.split,
            "images": self.images,
            "annotations": self.annotations,
            "negatives": self.negatives,
            "crowd": self.crowd,
            "dropped": dict(self.dropped),
            "dropped_images": self.dropped_images,
        }


def _bbox_problem(bbox: Any, w: int, h: int) -> Optional[Tuple[str, str]]:
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
    ):
        return "bad_bbox", f"bbox {bbox!r} is not 4 finite numbers [x, y, width, height]"
    x, y, bw, bh = bbox
    if bw <= 0 or bh <= 0:
        return "degenerate", f"degenerate box [x, y, w, h] = {bbox}: width and height must be > 0"
    if x < -_TOL or y < -_TOL or x + bw > w + _TOL or y + bh > h + _TOL:
        # [x1, y1, x2, y2] saved where COCO wants [x, y, w, h]: as xyxy the box would fit.
        if bw > x and bh > y and bw <= w + _TOL and bh <= h + _TOL:
            return "xyxy_as_xywh", (
                f"box {bbox} extends past the {w}x{h} image but fits as [x1, y1, x2, y2]: "
                f"COCO boxes are [x, y, width, height] (convert with w = x2 - x1, h = y2 - y1)"
            )
        return "out_of_image", f"box [x, y, w, h] = {bbox} extends outside the {w}x{h} image"
    return None


def _box_vs_polygon_problem(bbox: Any, seg: Any) -> Optional[Tuple[str, str]]:
    # With a polygon the box's format is checkable even when both readings fit in the image.
    if not isinstance(seg, list) or not seg or not all(isinstance(p, list) and len(p) >= 6 for p in seg):
        return None
    xs = [v for p in seg for v in p[0::2]]
    ys = [v for p in seg for v in p[1::2]]
    extent = (min(xs), min(ys), max(xs), max(ys))
    x, y, w, h = bbox
    as_xywh = (x, y, x + w, y + h)
    off = lambda a: max(abs(u - v) for u, v in zip(a, extent))  # noqa: E731
    if off(as_xywh) > 2.0 and off((x, y, w, h)) <= 2.0:
        return "xyxy_as_xywh", (
            f"box {bbox} matches its segmentation only as [x1, y1, x2, y2]: COCO boxes are "
            f"[x, y, width, height] (convert with w = x2 - x1, h = y2 - y1)"
        )
    return None


def _segmentation_problem(seg: Any, w: int, h: int) -> Optional[Tuple[str, str]]:
    if seg is None or seg == [] or seg == {}:
        return "no_mask", "has no segmentation, and the model trains masks"
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                return "bad_mask", "segmentation polygon needs >= 3 (x, y) points as a flat list"
        return None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            return "bad_mask", f"RLE size {seg['size']} differs from the image's [height, width] = [{h}, {w}]"
        return None
    return "bad_mask", f"segmentation is neither polygons nor RLE: {str(seg)[:60]}"


def _read_json(ann_file: str, image_dir: str, split: str) -> Dict[str, Any]:
    if not os.path.isfile(ann_file):
        raise DataError(f"{split}: annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{split}: {ann_file} is not valid JSON: {e}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{split}: {ann_file} has no {key!r} list: not a COCO instances file")
    if not os.path.isdir(image_dir):
        raise DataError(f"{split}: image folder not found: {image_dir}")
    return data


def _label_map(data: Dict[str, Any], ann_file: str, split: str, label_mode: str):
    """(category id -> name, category id -> label): contiguous 1..K, or COCO's ids themselves."""
    categories = {}
    for c in data["categories"]:
        if "id" not in c:
            raise DataError(f"{split}: {ann_file}: category {c!r} has no 'id'")
        categories[c["id"]] = c.get("name", str(c["id"]))
    if not categories:
        raise DataError(f"{split}: {ann_file} defines no categories")
    if label_mode != "category_id":
        return categories, {cid: i + 1 for i, cid in enumerate(sorted(categories))}
    if 0 in categories:
        raise DataError(
            f"{split}: category id 0 ({categories[0]!r}) would be label 0, which is the background; "
            f"renumber categories from 1 or use contiguous labels (--dataset coco_json)"
        )
    return categories, {cid: cid for cid in categories}


def _check_images(data, ann_file: str, image_dir: str, split: str, check_files: bool, problems: List[str]):
    """Images by id, and the ids of those whose file is missing, unreadable or of another size."""
    images, bad = {}, set()
    for img in data["images"]:
        iid, w, h = img.get("id"), img.get("width"), img.get("height")
        if iid in images:
            raise DataError(f"{split}: image id {iid} appears twice in {ann_file}")
        if not isinstance(w, int) or not isinstance(h, int) or w <= 0 or h <= 0:
            raise DataError(f"{split}: image {iid} ({img.get('file_name')}) has no valid width/height: {w}x{h}")
        images[iid] = img
        if not check_files:
            continue
        path = os.path.join(image_dir, img.get("file_name", ""))
        try:
            with Image.open(path) as im:  # header only: cheap even for large sets
                size = im.size
        except FileNotFoundError:
            problems.append(f"image {iid}: file not found: {path}")
            bad.add(iid)
            continue
        except Exception as e:
            problems.append(f"image {iid}: cannot read {path}: {e}")
            bad.add(iid)
            continue
        if size != (w, h):
            problems.append(f"image {iid}: {path} is {size[0]}x{size[1]} but the JSON says {w}x{h}")
            bad.add(iid)
    return images, bad


def _annotation_problem(a, img, categories, need_masks: bool) -> Optional[Tuple[str, str]]:
    if a.get("category_id") not in categories:
        ids = sorted(categories)[:20]
        return "unknown_category", f"category_id {a.get('category_id')} is not in 'categories' (ids: {ids})"
    issue = _bbox_problem(a.get("bbox"), img["width"], img["height"])
    if issue is None:
        issue = _box_vs_polygon_problem(a["bbox"], a.get("segmentation"))
    if issue is None and need_masks and not a.get("iscrowd", 0):
        issue = _segmentation_problem(a.get("segmentation"), img["width"], img["height"])
    return issue


def _check_annotations(data, images, bad_images, categories, need_masks, report: "DataReport", problems):
    """The annotations to keep, and the ids of the images that keep a non-crowd one."""
    kept, with_anns = [], set()
    for a in data["annotations"]:
        aid, iid = a.get("id"), a.get("image_id")
        where = f"annotation {aid} (image {iid})"
        if iid not in images:
            problems.append(f"{where}: image_id {iid} is not in 'images'")
            report.dropped["unknown_image"] += 1
            continue
        if iid in bad_images:
            continue
        issue = _annotation_problem(a, images[iid], categories, need_masks)
        if issue is not None:
            problems.append(f"{where}: {issue[1]}")
            report.dropped[issue[0]] += 1
            continue
        if a.get("iscrowd", 0):
            report.crowd += 1
        else:
            with_anns.add(iid)
        kept.append(a)
    return kept, with_anns


def load_coco_checked(
    ann_file: str,
    image_dir: str,
    split: str,
    policy: str = "stop",
    need_masks: bool = True,
    label_mode: str = "contiguous",
    check_image_files: bool = True,
):
    """Read, check and clean a COCO JSON. Returns (COCO, label_map, category names, DataReport).

    ``label_mode``: "contiguous" maps the sorted category ids to labels 1..K; "category_id" uses
    the ids themselves (COCO's 91-class convention, to match pretrained COCO weights).
    """
    from pycocotools.coco import COCO

    if policy not in POLICIES:
        raise ValueError(f"data.bad_annotations must be one of {POLICIES}, got {policy!r}")
    data = _read_json(ann_file, image_dir, split)
    categories, label_map = _label_map(data, ann_file, split, label_mode)
    report = DataReport(split)
    problems: List[str] = []
    images, bad_images = _check_images(data, ann_file, image_dir, split, check_image_files, problems)
    kept, with_anns = _check_annotations(data, images, bad_images, categories, need_masks, report, problems)
    if problems and policy == "stop":
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise DataError(
            f"{split} data ({ann_file}) has {len(problems)} problem(s):\n  {shown}{more}\n"
            f"Fix them, or pass --bad-annotations drop (data.bad_annotations: drop) to train without them."
        )
    report.problems = problems
    report.dropped_images = len(bad_images)
    data = dict(data, images=[i for k, i in images.items() if k not in bad_images], annotations=kept)
    report.images = len(data["images"])
    report.annotations = sum(1 for a in kept if not a.get("iscrowd", 0))
    report.negatives = report.images - len(with_anns)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    names = [categories[cid] for cid in sorted(categories, key=lambda c: label_map[c])]
    return coco, label_map, names, report


def check_samples(dataset, num_classes: int, count: int = 16) -> List[str]:
    """Check decoded samples (what the model will see) of the first ``count`` images.

    Catches what the JSON cannot show: 0-255 or uint8 images, masks that are not 0/1 or not
    the image's size, labels out of range. Returns the problems (empty when all is well).
    """
    problems = []
    for idx in range(min(count, len(dataset))):
        image, t = dataset[idx]
        iid = int(t["image_id"]) if "image_id" in t else idx
        where = f"image {iid}"
        if not torch.is_floating_point(image):
            problems.append(f"{where}: image tensor is {image.dtype}; the model expects float in [0, 1]")
        elif image.numel() and image.max() > 1.0 + 1e-3:
            problems.append(f"{where}: image values reach {float(image.max()):.1f}; scale 0-255 images to [0, 1]")
        labels = t["labels"]
        if labels.numel() and (labels.min() < 1 or labels.max() >= num_classes):
            problems.append(
                f"{where}: labels {labels.tolist()} outside 1..{num_classes - 1} "
                f"(0 is background; num_classes includes it)"
            )
        boxes = t["boxes"]
        if boxes.numel() and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            problems.append(f"{where}: degenerate boxes (x2 <= x1 or y2 <= y1) after loading")
        if "masks" in t and t["masks"].numel():
            m = t["masks"]
            if tuple(m.shape[-2:]) != tuple(image.shape[-2:]):
                problems.append(f"{where}: masks are {tuple(m.shape[-2:])} but the image is {tuple(image.shape[-2:])}")
            vals = torch.unique(m)
            if not all(v in (0, 1) for v in vals.tolist()):
                problems.append(f"{where}: masks hold values {vals[:6].tolist()}, expected 0/1")
    return problems
