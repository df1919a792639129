"""Data checks run before the first step: every problem names the image / annotation at fault.

The known causes of "zero detections" / NaN that come from data: degenerate
boxes, boxes outside the image, COCO xywh boxes written as xyxy, unknown category ids, label 0
(background) used for an object, missing image files, masks that are not 0/1, 0-255 images.
Policy ``stop`` (default) raises with the list; ``drop`` drops the faulty annotations (and
images whose file is missing) and says how many. Some problems no policy can fix and always stop:
an annotation id used twice (pycocotools indexes annotations by id, so evaluation would read one
annotation twice and lose the other), a ``file_name`` outside the image folder, a width/height
that is not a positive integer, a split left without images, and ``drop`` leaving no object.
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
# Pillow modes of 16-bit grey (a 16-bit PNG opens as I;16, or as "I" in older Pillow): convert("RGB")
# would clip every value above 255, so the loader scales them to 8 bits (value >> 8) instead.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# EXIF orientations that swap width and height (rotated by 90 or 270 degrees).
_EXIF_ORIENTATION = 0x0112
_EXIF_SWAPS = {
    5: "transposed",
    6: "rotated 90 degrees clockwise",
    7: "transversed",
    8: "rotated 90 degrees counter-clockwise",
}


def pixel_format(mode: str, fmt: Optional[str]) -> str:
    """How the loader decodes a Pillow image mode: "8bit", "16bit" (scaled to 8 bits) or "unknown"."""
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and fmt == "PNG"):
        return "16bit"
    if mode in ("I", "F") or mode.startswith("I;"):  # 32-bit int / float: no known range
        return "unknown"
    return "8bit"


class DataError(ValueError):
    """The dataset has problems that the ``stop`` policy refuses to train on."""


@dataclass
class AnnotationReport:
    """What the checks found in one split's annotation file and did about it (data_report.DataReport is
    the data and anchor report)."""

    split: str
    images: int = 0
    annotations: int = 0
    negatives: int = 0  # images without (non-crowd) annotations: kept as negatives
    crowd: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> annotations dropped
    dropped_images: int = 0
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # lines said after the summary (conversions, warnings)

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
        return "\n".join([s, *self.notes])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "split": self.split,
            "images": self.images,
            "annotations": self.annotations,
            "negatives": self.negatives,
            "crowd": self.crowd,
            "dropped": dict(self.dropped),
            "dropped_images": self.dropped_images,
            "notes": list(self.notes),
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


def _numbers(values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _polygons_ok(seg: Any) -> bool:
    return isinstance(seg, list) and bool(seg) and all(isinstance(p, list) and len(p) >= 6 and _numbers(p) for p in seg)


def _segmentation_extent(seg: Any, w: int, h: int) -> Optional[Tuple[float, float, float, float]]:
    """(x1, y1, x2, y2) of a checked segmentation: its polygons' points, or the RLE's pixels (toBbox)."""
    if _polygons_ok(seg):
        xs = [v for p in seg for v in p[0::2]]
        ys = [v for p in seg for v in p[1::2]]
        return min(xs), min(ys), max(xs), max(ys)
    if isinstance(seg, dict) and _rle_problem(seg, w, h) is None:
        from pycocotools import mask as mask_utils

        rle = _merged_rle(seg, h, w)
        if not mask_utils.area(rle):
            return None
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        return x, y, x + bw, y + bh
    return None


def _box_vs_segmentation_problem(bbox: Any, seg: Any, w: int, h: int) -> Optional[Tuple[str, str]]:
    # With a polygon or an RLE the box's format is checkable even when both readings fit in the image.
    extent = _segmentation_extent(seg, w, h)
    if extent is None:
        return None
    x, y, bw, bh = bbox
    as_xywh = (x, y, x + bw, y + bh)
    off = lambda a: max(abs(u - v) for u, v in zip(a, extent))  # noqa: E731
    if off(as_xywh) > 2.0 and off((x, y, bw, bh)) <= 2.0:
        return "xyxy_as_xywh", (
            f"box {bbox} matches its segmentation only as [x1, y1, x2, y2]: COCO boxes are "
            f"[x, y, width, height] (convert with w = x2 - x1, h = y2 - y1)"
        )
    return None


def rle_string_counts(text: str) -> Optional[List[int]]:
    """The run lengths of a compressed COCO RLE string (None: not one). Each count is 5-bit groups
    (character - 48), low group first, bit 0x20 set while more follow, 0x10 of the last the sign;
    from the fourth count on (index 3, pycocotools' ``m > 2``), the value is a difference to the count two
    before it."""
    counts: List[int] = []
    i = 0
    while i < len(text):
        value, shift, more = 0, 0, True
        while more:
            if i >= len(text):
                return None  # the last count is cut off
            c = ord(text[i]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            shift += 5
            i += 1
            if not more and c & 0x10:
                value -= 1 << shift
        counts.append(value + counts[-2] if len(counts) > 2 else value)
    return counts


def _rle_problem(seg: Any, w: int, h: int) -> Optional[Tuple[str, str]]:
    """An RLE whose size or run lengths do not describe an h x w mask: pycocotools would decode garbage."""
    if not isinstance(seg, dict):
        return None
    size, counts = seg.get("size"), seg.get("counts")
    if "counts" not in seg or "size" not in seg:
        return "bad_mask", f"RLE segmentation needs 'size' and 'counts', has {sorted(seg)}"
    if not isinstance(size, list) or len(size) != 2 or list(size) != [h, w]:
        return "bad_mask", f"RLE size {size!r} differs from the image's [height, width] = [{h}, {w}]"
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
        if runs is None:
            return "bad_mask", f"RLE counts string {counts[:20]!r}... is not a compressed COCO RLE"
        what = "compressed RLE counts"
    elif isinstance(counts, list):
        # pycocotools reads the list as uint32: 10.0 is 10 (accepted, as there), 10.5 would be cut to 10.
        whole = lambda c: isinstance(c, int) or (isinstance(c, float) and c.is_integer())  # noqa: E731
        odd = next((c for c in counts if isinstance(c, bool) or not whole(c)), None)
        if odd is not None:
            return "bad_mask", f"RLE counts hold {odd!r}: uncompressed counts are whole run lengths"
        runs, what = [int(c) for c in counts], "RLE counts"
    else:
        return "bad_mask", (
            f"RLE counts is a {type(counts).__name__}: COCO's are a list of run lengths or a compressed string"
        )
    if any(c < 0 for c in runs):
        return "bad_mask", f"{what} hold a negative run length ({min(runs)})"
    total = sum(runs)
    if total != h * w:
        return "bad_mask", f"{what} sum to {total} pixels, not height x width = {h} x {w} = {h * w}"
    return None


def _segmentation_problem(seg: Any, w: int, h: int) -> Optional[Tuple[str, str]]:
    if seg is None or seg == [] or seg == {}:
        return "no_mask", "has no segmentation, and the model trains masks"
    if isinstance(seg, list):
        for poly in seg:
            if isinstance(poly, list) and poly and all(isinstance(p, (list, tuple)) for p in poly):
                return (
                    "bad_mask",
                    "segmentation polygon is a list of [x, y] pairs: COCO's is flat [x1, y1, x2, y2, ...]",
                )
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not _numbers(poly):
                return "bad_mask", "segmentation polygon needs >= 3 (x, y) points as a flat list of numbers"
        return None
    if isinstance(seg, dict):
        return _rle_problem(seg, w, h)
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


def _image_entry_problem(img: Dict[str, Any]) -> Optional[str]:
    """What no policy can fix in an ``images`` entry: its size, or a file name outside the folder."""
    iid, w, h, name = img.get("id"), img.get("width"), img.get("height"), img.get("file_name")
    if not isinstance(iid, int) or isinstance(iid, bool):
        return (
            f"image {iid!r} ({name}): its id is a {type(iid).__name__}; COCO image ids are integers "
            f"(pycocotools and the evaluation key images by them): renumber the images and their annotations' image_id"
        )
    for key, v in (("width", w), ("height", h)):
        if isinstance(v, str):
            return f"image {iid} ({name}): {key} {v!r} is a string; COCO's width and height are integers"
    if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in (w, h)):
        return f"image {iid} ({name}) has no valid width/height: {w}x{h}"
    if not isinstance(name, str) or not name:
        return f"image {iid}: file_name {name!r} is not a file name"
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return (
            f"image {iid}: file_name {name!r} points outside the image folder "
            f"(absolute paths and '..' are refused; subfolders inside it are fine)"
        )
    return None


def _size_mismatch(iid: Any, path: str, size: Tuple[int, int], w: int, h: int) -> str:
    msg = f"image {iid}: {path} is {size[0]}x{size[1]} but the JSON says {w}x{h}"
    try:
        with Image.open(path) as im:  # EXIF only now: for a PNG, getexif() decodes the whole file
            orientation = im.getexif().get(_EXIF_ORIENTATION)
    except Exception:
        orientation = None
    if orientation not in (None, 1):
        how = _EXIF_SWAPS.get(orientation, "mirrored or turned 180 degrees")
        msg += (
            f"; its EXIF orientation tag is {orientation} ({how}), which the tool that wrote the JSON may have "
            f"applied: this loader decodes the stored pixels without it (as torchvision's does), so save the "
            f"image rotated (PIL.ImageOps.exif_transpose) or fix the JSON"
        )
    return msg


def _image_file_problem(img: Dict[str, Any], path: str) -> Tuple[Optional[str], Optional[str]]:
    """(problem, pixel format) of an image file, from its header only: cheap even for large sets."""
    iid = img["id"]
    try:
        with Image.open(path) as im:
            size, mode, fmt = im.size, im.mode, im.format
    except FileNotFoundError:
        return f"image {iid}: file not found: {path}", None
    except Exception as e:
        return f"image {iid}: cannot read {path}: {e}", None
    if size != (img["width"], img["height"]):
        return _size_mismatch(iid, path, size, img["width"], img["height"]), None
    kind = pixel_format(mode, fmt)
    if kind == "unknown":
        return (
            f"image {iid}: {path} has Pillow mode {mode} pixels (32-bit integer or float), whose range "
            f"the loader cannot know: save it as 8-bit (or 16-bit PNG)"
        ), None
    return None, kind


def _check_images(data, ann_file: str, image_dir: str, split: str, check_files: bool, report, problems: List[str]):
    """Images by id, and the ids of those whose file is missing, unreadable or of another size."""
    images, bad, sixteen = {}, set(), []
    for img in data["images"]:
        iid = img.get("id")
        if iid in images:
            raise DataError(f"{split}: image id {iid} appears twice in {ann_file}")
        fatal = _image_entry_problem(img)
        if fatal is not None:
            raise DataError(f"{split}: {ann_file}: {fatal}")
        images[iid] = img
        if not check_files:
            continue
        problem, kind = _image_file_problem(img, os.path.join(image_dir, img["file_name"]))
        if problem is not None:
            problems.append(problem)
            bad.add(iid)
        elif kind == "16bit":
            sixteen.append(iid)
    if sixteen:
        which = f"image {sixteen[0]}" if len(sixteen) == 1 else f"{len(sixteen)} images ({_ids(sixteen)})"
        report.notes.append(f"{split}: {which}: 16-bit grey scaled to 8 bits (value >> 8: 65535 -> 255)")
    return images, bad


def _ids(ids: List[Any], shown: int = 8) -> str:
    return ", ".join(str(i) for i in ids[:shown]) + (f", ... {len(ids) - shown} more" if len(ids) > shown else "")


def _check_annotation_ids(data, ann_file: str, split: str) -> None:
    """Every annotation has its own id, whatever the policy: pycocotools indexes them by id."""
    seen: Dict[Any, Any] = {}
    found = []
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{split}: {ann_file}: annotation #{i} is not a mapping: {str(a)[:60]}")
        aid, iid = a.get("id"), a.get("image_id")
        if not isinstance(aid, (int, str)) or isinstance(aid, bool):
            found.append(f"annotation #{i} (image {iid}) has no integer 'id' (got {aid!r})")
        elif aid in seen:
            where = f"both in image {iid}" if seen[aid] == iid else f"images {seen[aid]} and {iid}"
            found.append(f"annotation id {aid} appears twice ({where})")
        else:
            seen[aid] = iid
    if found:
        more = f"; ... {len(found) - 5} more" if len(found) > 5 else ""
        raise DataError(
            f"{split}: {ann_file}: " + "; ".join(found[:5]) + more + ". pycocotools keys annotations by id, so "
            "evaluation would read one annotation twice and lose the other: give every annotation its own id "
            "(--bad-annotations drop cannot fix this)"
        )


def _check_not_empty(report: "AnnotationReport", split: str) -> None:
    """A split without images fails; one without objects is an error when dropping emptied it, else said."""
    dropped = sum(report.dropped.values())
    if report.images == 0:
        why = f" ({report.dropped_images} dropped by --bad-annotations drop)" if report.dropped_images else ""
        raise DataError(f"{split}: no images left to {'train on' if split == 'train' else 'evaluate'}{why}")
    if report.annotations:
        return
    if dropped or report.dropped_images:
        raise DataError(
            f"{split}: --bad-annotations drop left no object ({dropped} annotations and {report.dropped_images} "
            f"images dropped: {dict(report.dropped)}): run with --bad-annotations stop to see the problems"
        )
    crowd = f", {report.crowd} crowd regions, which are not trained on" if report.crowd else ""
    effect = "the model learns background only" if split == "train" else "its AP is undefined (-1)"
    report.notes.append(f"WARNING: {split}: no objects in {report.images} images{crowd}: {effect}")


def _annotation_problem(a, img, categories, need_masks: bool) -> Optional[Tuple[str, str]]:
    if a.get("category_id") not in categories:
        ids = sorted(categories)[:20]
        return "unknown_category", f"category_id {a.get('category_id')} is not in 'categories' (ids: {ids})"
    w, h, seg = img["width"], img["height"], a.get("segmentation")
    issue = _bbox_problem(a.get("bbox"), w, h)
    if issue is None:  # an RLE is checked whatever the model: evaluation decodes a crowd region's too
        issue = _rle_problem(seg, w, h)
    if issue is None:
        issue = _box_vs_segmentation_problem(a["bbox"], seg, w, h)
    if issue is None and need_masks and not a.get("iscrowd", 0):
        issue = _segmentation_problem(a.get("segmentation"), img["width"], img["height"])
    return issue


def _check_annotations(data, images, bad_images, categories, need_masks, report: "AnnotationReport", problems):
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


def _merged_rle(seg: Any, h: int, w: int):
    """One pycocotools RLE of a (checked) segmentation: polygons, RLE or uncompressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, h, w)
    return {"size": seg["size"], "counts": seg["counts"].encode("ascii")}


def _fill_evaluation_keys(kept: List[Dict[str, Any]], images, split: str, report: "AnnotationReport") -> None:
    """COCO evaluation reads every annotation's ``area`` (its area ranges), ``iscrowd`` and, for keypoints,
    ``num_keypoints``: fill those a file leaves out as pycocotools' loadRes fills results, area from the
    mask (else the box's w x h), iscrowd 0, num_keypoints the visible ones, and say so. A present value
    that is no number is a DataError naming the annotation."""
    from pycocotools import mask as mask_utils

    from_mask, from_box, crowd, keypoints = [], [], [], []
    for a in kept:
        kps = a.get("keypoints")
        if isinstance(kps, list) and "num_keypoints" not in a:  # COCOeval's keypoints ignore rule reads it
            a["num_keypoints"] = sum(1 for v in kps[2::3] if isinstance(v, (int, float)) and v > 0)
            keypoints.append(a.get("id"))
        if "iscrowd" not in a:
            a["iscrowd"] = 0
            crowd.append(a.get("id"))
        elif a["iscrowd"] not in (0, 1) or isinstance(a["iscrowd"], float):
            where = f"{split}: annotation {a.get('id')} (image {a['image_id']})"
            raise DataError(f"{where}: iscrowd {a['iscrowd']!r} is not 0 or 1")
        if "area" in a:
            if not isinstance(a["area"], (int, float)) or isinstance(a["area"], bool) or not math.isfinite(a["area"]):
                raise DataError(
                    f"{split}: annotation {a.get('id')} (image {a['image_id']}): area {a['area']!r} is not a number"
                )
            continue
        seg, img = a.get("segmentation"), images[a["image_id"]]
        if seg and _segmentation_problem(seg, img["width"], img["height"]) is None:
            a["area"] = float(mask_utils.area(_merged_rle(seg, img["height"], img["width"])))
            from_mask.append(a.get("id"))
        else:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
            from_box.append(a.get("id"))
    if from_mask or from_box:
        filled = from_mask + from_box
        report.notes.append(
            f"{split}: {len(filled)} annotation(s) without 'area' (ids {_ids(filled)}): filled as pycocotools "
            f"does for results, {len(from_mask)} from the mask, {len(from_box)} from the box w x h"
        )
    if crowd:
        report.notes.append(f"{split}: {len(crowd)} annotation(s) without 'iscrowd' (ids {_ids(crowd)}): set to 0")
    if keypoints:
        report.notes.append(
            f"{split}: {len(keypoints)} annotation(s) without 'num_keypoints' (ids {_ids(keypoints)}): "
            f"counted from their keypoints' visibility (v > 0), as COCO defines it"
        )


def load_coco_checked(
    ann_file: str,
    image_dir: str,
    split: str,
    policy: str = "stop",
    need_masks: bool = True,
    label_mode: str = "contiguous",
    check_image_files: bool = True,
):
    """Read, check and clean a COCO JSON. Returns (COCO, label_map, category names, AnnotationReport).

    ``label_mode``: "contiguous" maps the sorted category ids to labels 1..K; "category_id" uses
    the ids themselves (COCO's 91-class convention, to match pretrained COCO weights).
    """
    from pycocotools.coco import COCO

    if policy not in POLICIES:
        raise ValueError(f"data.bad_annotations must be one of {POLICIES}, got {policy!r}")
    data = _read_json(ann_file, image_dir, split)
    categories, label_map = _label_map(data, ann_file, split, label_mode)
    _check_annotation_ids(data, ann_file, split)
    report = AnnotationReport(split)
    problems: List[str] = []
    images, bad_images = _check_images(data, ann_file, image_dir, split, check_image_files, report, problems)
    kept, with_anns = _check_annotations(data, images, bad_images, categories, need_masks, report, problems)
    if problems and policy == "stop":
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise DataError(
            f"{split} data ({ann_file}) has {len(problems)} problem(s):\n  {shown}{more}\n"
            f"Fix them, or pass --bad-annotations drop (data.bad_annotations: drop) to train without them."
        )
    report.problems = problems
    _fill_evaluation_keys(kept, images, split, report)
    report.dropped_images = len(bad_images)
    data = dict(data, images=[i for k, i in images.items() if k not in bad_images], annotations=kept)
    report.images = len(data["images"])
    report.annotations = sum(1 for a in kept if not a.get("iscrowd", 0))
    report.negatives = report.images - len(with_anns)
    _check_not_empty(report, split)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    names = [categories[cid] for cid in sorted(categories, key=lambda c: label_map[c])]
    return coco, label_map, names, report


def check_samples(dataset, num_classes: int, count: int = 16) -> List[str]:
    """Check decoded samples (what the model will see) of the first ``count`` images.

    Catches what the JSON cannot show: 0-255 or uint8 images, masks that are not 0/1 or not
    the image's size, labels out of range, files that do not decode (truncated...). Returns the
    problems (empty when all is well).
    """
    problems = []
    for idx in range(min(count, len(dataset))):
        try:
            image, t = dataset[idx]
        except DataError as e:  # the loader names the image and file
            problems.append(str(e))
            continue
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
