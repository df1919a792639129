"""The input-scale rule: are the objects, after the model's own resize, big enough for its smallest
anchor and its finest feature map? If not, the ``min_size`` / ``max_size`` that makes them so, and
what it costs; above a documented cap, tiles instead.

Why the two yardsticks. A square box of side ``s`` centred on a square anchor of side ``a > s``
overlaps it with IoU ``(s / a)^2``: it reaches the RPN's foreground threshold 0.7 only from
``s = sqrt(0.7) a = 0.84 a``, and an anchor off-centre by the grid does worse. Below that the RPN
gets a positive for the box only from its low-quality match, and the RoI head sees few proposals
on it. And an object under about two cells of the finest feature map (two strides) is one or two
feature values mixed with background, whatever the anchors: RoIAlign then samples mostly background.
Upscaling the input is the standard lever (Detectron2's ``INPUT.MIN_SIZE_TRAIN``, torchvision's
``min_size``); for images already past a sensible input size, tiled (sliced) training and inference
(SAHI's) keep the magnification without the whole image.

The foreground threshold is the model's (``rpn.proposal_matcher.high_threshold``, torchvision's 0.7):
the side that reaches it centred is ``sqrt(fg) a``.

Everything here is plain numbers in, numbers out: :func:`scale_rule` decides from the boxes' sides
after the resize against a model's :class:`Yardsticks`; the data report and the collapse diagnostics
(through data_report.scale_finding) call :func:`finding_from_boxes` with the model's yardsticks and
its boxes (anchor_coverage.BoxSet).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np

RPN_FG_IOU = 0.7  # torchvision's rpn_fg_iou_thresh: the default of Yardsticks.fg_iou
STRIDE_MULTIPLE = 2.0  # an object should span at least two cells of the finest feature map
# Fires when the median object of any class is under the required side, or a tenth of all objects
# are under half of it. Per class, because the pooled quantiles follow the common class: a rare class
# of objects too small to see hides behind it, and it is the class the advice must not give up. A
# class needs MIN_CLASS_BOXES boxes to be judged on its own; the 10th percentile catches the rest.
P10_FRACTION = 0.5
MIN_CLASS_BOXES = 10
SIZE_STEP = 32  # suggested sizes are rounded up to this (torchvision pads to size_divisible 32 anyway)
# The largest input side the advice suggests: torchvision's and Detectron2's default max_size (1333).
# Past it a step costs more than tiles of the image do, and memory grows with the whole image.
MAX_INPUT_SIDE = 1333
TILE_OVERLAP_FRACTION = 0.2  # SAHI's default overlap ratio; at least the largest object's side, too


@dataclass(frozen=True)
class ScaleFinding:
    """What :func:`scale_rule` found: the sides it judged, the yardsticks, and the cure when it fires."""

    p10: float  # object side (sqrt of box area) after the model's resize, 10th percentile
    p50: float  # the smallest median of the classes judged on their own (the pooled median without classes)
    smallest_anchor: float
    finest_stride: float
    required: float  # max(sqrt(fg_iou) * smallest_anchor, STRIDE_MULTIPLE * finest_stride)
    min_size: int  # the model's current resize
    max_size: int
    fires: bool
    factor: float = 1.0  # magnification the objects need (1 when silent)
    new_min_size: Optional[int] = None  # the cure by resize (None when tiles are the cure)
    new_max_size: Optional[int] = None
    pixel_ratio: float = 1.0  # padded input pixels after / before, over the images
    tile_size: Optional[int] = None  # the cure by tiles, in native pixels
    tile_overlap: Optional[int] = None
    withheld: Optional[str] = None  # why no cure is advised (an augmentation that sets the input size itself)
    fg_iou: float = RPN_FG_IOU  # the RPN matcher's foreground threshold the anchor yardstick is for

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def config(self, kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The cure as config sections ({} when silent); ``kwargs``: the current model.kwargs, kept."""
        if not self.fires or self.withheld:
            return {}
        if self.tile_size is not None:
            return {"data": {"tile_size": self.tile_size, "tile_overlap": self.tile_overlap}}
        kw = dict(kwargs or {})
        mins = kw.get("min_size")
        # A list is torchvision's multi-scale training (a random size per step, the last at evaluation):
        # every size is magnified as much, so the list is not dropped for one size.
        if isinstance(mins, (list, tuple)) and len(mins) > 1:
            new_min: Any = [_round_up(m * self.factor) for m in mins[:-1]] + [self.new_min_size]
        else:
            new_min = self.new_min_size
        return {"model": {"kwargs": {**kw, "min_size": new_min, "max_size": self.new_max_size}}}

    def text(self) -> str:
        what = (
            f"object side after the resize to min_size {self.min_size} / max_size {self.max_size}: "
            f"p10 {self.p10:.1f} px, p50 {self.p50:.1f} px (the smallest class's median), against the smallest "
            f"anchor {self.smallest_anchor:g} px "
            f"and the finest stride {self.finest_stride:g} px (an object needs {self.required:.1f} px: "
            f"{math.sqrt(self.fg_iou):.2f} x the anchor reaches IoU {self.fg_iou:g} centred, "
            f"{STRIDE_MULTIPLE:g} strides)"
        )
        if not self.fires:
            return what + ": large enough"
        if self.withheld:
            return f"{what}: too small to be resolved at the evaluation resize; {self.withheld}"
        if self.tile_size is not None:
            cure = (
                f"the input would need x{self.factor:.2f}, past {MAX_INPUT_SIDE} px a side: tiles of "
                f"{self.tile_size} px "
                f"(overlap {self.tile_overlap}) resized to min_size {self.min_size} magnify the objects as much "
                f"(data.tile_size / data.tile_overlap; evaluation and predict.py slice the same way)"
            )
        else:
            cure = (
                f"the objects need x{self.factor:.2f}: min_size {self.new_min_size}, max_size {self.new_max_size} "
                f"(x{self.new_min_size / self.min_size:.2f}; pixels x{self.pixel_ratio:.1f}, so step time up to "
                f"x~{self.pixel_ratio:.1f})"
            )
        return f"{what}: too small to be resolved; {cure}"


def _round_up(x: float, step: int = SIZE_STEP) -> int:
    return int(math.ceil(x / step - 1e-9) * step)


def resized_hw(h: np.ndarray, w: np.ndarray, min_size: float, max_size: float) -> Tuple[np.ndarray, np.ndarray]:
    """GeneralizedRCNNTransform's resize of images h x w (arrays): the new heights and widths."""
    scale = np.minimum(min_size / np.minimum(h, w), max_size / np.maximum(h, w))
    return np.floor(h * scale), np.floor(w * scale)


def padded_pixels(hw: np.ndarray, min_size: float, max_size: float, divisible: int = 32) -> float:
    """Input pixels of the images ([M, 2] heights and widths) after the resize and the padding."""
    nh, nw = resized_hw(hw[:, 0], hw[:, 1], min_size, max_size)
    return float((np.ceil(nh / divisible) * divisible * np.ceil(nw / divisible) * divisible).sum())


@dataclass(frozen=True)
class Yardsticks:
    """What the scale rule measures the objects against: the model's resize, its smallest anchor, its
    finest feature-map stride, its padding and the RPN matcher's foreground threshold."""

    min_size: int
    max_size: int
    smallest_anchor: float
    finest_stride: float
    divisible: int = 32
    fg_iou: float = RPN_FG_IOU

    @property
    def required(self) -> float:
        """The side an object needs: sqrt(fg_iou) of the smallest anchor (it reaches fg_iou centred) and
        STRIDE_MULTIPLE strides."""
        return max(math.sqrt(self.fg_iou) * self.smallest_anchor, STRIDE_MULTIPLE * self.finest_stride)


def scale_rule(
    sides: np.ndarray,
    image_hw: np.ndarray,
    model: Yardsticks,
    native_extent: Optional[np.ndarray] = None,
    classes: Optional[np.ndarray] = None,
) -> ScaleFinding:
    """The scale rule on the boxes' sides (sqrt of area) after the model's resize.

    ``image_hw``: [M, 2] native heights and widths of the training images (the cost is counted on
    them); ``model``: the yardsticks (min_size, max_size, ... below); ``native_extent``: the boxes'
    longer sides before the resize (the tile overlap must hold the largest object; default ``sides``);
    ``classes``: each box's class. Fires when ``p50 < required`` or ``p10 < P10_FRACTION * required``,
    where p10 is over all boxes and p50 the smallest median of the classes with MIN_CLASS_BOXES boxes or
    more (of all boxes without ``classes``, or when no class has that many), with
    ``required = max(sqrt(fg_iou) * smallest_anchor, STRIDE_MULTIPLE * finest_stride)``. The cure
    magnifies by ``factor = max(required / p50, P10_FRACTION * required / p10)``: min_size and max_size
    times the factor, rounded up to SIZE_STEP. When the largest resized image side would pass
    MAX_INPUT_SIDE, the cure is tiles instead: the model keeps its sizes and a square tile of
    ``floor(min_size / (factor * s))`` native pixels (``s``: the median image's current resize
    scale) is magnified as much; the overlap is the larger of TILE_OVERLAP_FRACTION of the tile and
    the largest object's native side, so every object is whole in some tile. Tiles train.py would
    refuse (under tiles.MIN_TILE, or an overlap not below the tile: an object larger than the tile)
    are not advised: the finding says why in ``withheld``.
    """
    sides = np.asarray(sides, dtype=np.float64)
    # A box of zero width or height (the training data checks drop or refuse it) has no size to judge:
    # its side 0 would call for an unbounded magnification.
    valid = sides > 0
    if not valid.all():
        sides = sides[valid]
        classes = None if classes is None else np.asarray(classes)[valid]
        native_extent = None if native_extent is None else np.asarray(native_extent)[valid]
    image_hw = np.asarray(image_hw, dtype=np.float64).reshape(-1, 2)
    min_size, max_size, divisible, required = model.min_size, model.max_size, model.divisible, model.required
    p10, p50 = (float(np.percentile(sides, q)) for q in (10, 50)) if len(sides) else (math.nan, math.nan)
    if classes is not None and len(sides):
        classes = np.asarray(classes)
        medians = [float(np.median(sides[classes == c])) for c in np.unique(classes)]
        counts = [int((classes == c).sum()) for c in np.unique(classes)]
        judged = [m for m, n in zip(medians, counts) if n >= MIN_CLASS_BOXES]
        p50 = min(judged) if judged else p50
    base = dict(
        p10=p10,
        p50=p50,
        smallest_anchor=float(model.smallest_anchor),
        finest_stride=float(model.finest_stride),
        required=required,
        min_size=int(min_size),
        max_size=int(max_size),
        fg_iou=float(model.fg_iou),
    )
    fires = bool(len(sides)) and (p50 < required or p10 < P10_FRACTION * required)
    if not fires:
        return ScaleFinding(**base, fires=False)
    factor = max(required / max(p50, 1e-6), P10_FRACTION * required / max(p10, 1e-6))
    new_min, new_max = _round_up(min_size * factor), _round_up(max_size * factor)
    nh, nw = resized_hw(image_hw[:, 0], image_hw[:, 1], new_min, new_max)
    if float(np.maximum(nh, nw).max()) <= MAX_INPUT_SIDE:
        before = padded_pixels(image_hw, min_size, max_size, divisible)
        ratio = padded_pixels(image_hw, new_min, new_max, divisible) / max(before, 1.0)
        return ScaleFinding(
            **base, fires=True, factor=factor, new_min_size=new_min, new_max_size=new_max, pixel_ratio=ratio
        )
    current = np.minimum(min_size / image_hw.min(axis=1), max_size / image_hw.max(axis=1))
    tile = int(math.floor(min_size / (factor * float(np.median(current)))))
    native = np.asarray(native_extent if native_extent is not None else sides, dtype=np.float64)
    largest = float(native.max()) if len(native) else 0.0
    overlap = int(math.ceil(max(TILE_OVERLAP_FRACTION * tile, largest)))
    from tiles import MIN_TILE

    if tile < MIN_TILE or overlap >= tile:  # train.py refuses such tiles (check_tile_keys, TiledDataset)
        why = (
            f"no scale cure advised: the objects need x{factor:.2f}, past {MAX_INPUT_SIDE} px a side, and tiles "
            f"that magnify as much ({tile} native px) "
            + (f"are under {MIN_TILE} px" if tile < MIN_TILE else f"cannot hold the largest object ({largest:g} px)")
        )
        return ScaleFinding(**base, fires=True, factor=factor, tile_size=tile, tile_overlap=overlap, withheld=why)
    return ScaleFinding(**base, fires=True, factor=factor, tile_size=tile, tile_overlap=overlap)


def withhold_under_augmentation(finding: ScaleFinding, augmentation: Optional[str]) -> ScaleFinding:
    """``finding`` with its cure withheld when ``augmentation`` (data.augmentation) sets the training input
    size itself: the model does not resize while training then (run_model's _skip_resize), so a
    min_size / max_size would change evaluation alone, and tiles would be rescaled by the policy."""
    from data import SIZE_SETTING_POLICIES

    if not finding.fires or augmentation not in SIZE_SETTING_POLICIES:
        return finding
    why = (
        f"no scale cure advised: data.augmentation {augmentation} sets the training input size itself (the model "
        f"does not resize while training), so model.kwargs min_size / max_size or tiles would not reach training; "
        f"take the cure with a policy the model resizes after (hflip, none)"
    )
    return replace(finding, withheld=why)


def model_yardsticks(model, geo, fg_iou: float) -> Yardsticks:
    """The yardsticks of a torchvision detector as built; ``geo``: its anchor_coverage.AnchorGeometry (the
    real resize and feature-map grids); ``fg_iou``: its RPN matcher's foreground threshold."""
    side = _round_up(max(geo.min_size, geo.max_size), geo.divisible)
    strides = [min(s) for _, _, s in geo.levels(side, side)]
    anchors = [float(s) for sizes in model.rpn.anchor_generator.sizes for s in sizes]
    return Yardsticks(geo.min_size, geo.max_size, min(anchors), float(min(strides)), geo.divisible, fg_iou)


def tile_view(data: Dict[str, Any], tile_size: int, tile_overlap: int) -> Dict[str, Any]:
    """A COCO dict as the model sees it under tiles: each image at most tile_size a side, each box
    moved into the tile that starts at or before it (its offset modulo the tiles' step), so that the
    resize and the anchor grid the report measures are the tiles'."""
    step = max(tile_size - tile_overlap, 1)
    images, anns = [], []
    for im in data["images"]:
        images.append({**im, "height": min(im["height"], tile_size), "width": min(im["width"], tile_size)})
    native = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for a in data["annotations"]:
        if a["image_id"] not in native:
            continue
        H, W = native[a["image_id"]]
        h, w = min(H, tile_size), min(W, tile_size)
        x, y, bw, bh = a["bbox"]
        # Only an axis longer than the tile is cut: an image exactly one tile wide keeps its boxes where they are.
        x = min(x % step if W > tile_size else x, max(w - bw, 0.0))
        y = min(y % step if H > tile_size else y, max(h - bh, 0.0))
        anns.append({**a, "bbox": [x, y, bw, bh]})
    return {**data, "images": images, "annotations": anns}


def finding_from_boxes(model: Yardsticks, boxes) -> ScaleFinding:
    """:func:`scale_rule` against a model's yardsticks (:func:`model_yardsticks`) on its boxes, a
    anchor_coverage.BoxSet (sides after the resize, native extents, classes, every image's size)."""
    extent = np.maximum(boxes.native_wh.max(axis=1), 0) if len(boxes) else np.zeros(0)
    return scale_rule(boxes.sides, boxes.image_sizes, model, extent, boxes.labels)


def scale_cause(finding: Optional[ScaleFinding]) -> Optional[str]:
    """The collapse diagnostics' line for a scale problem, or None."""
    if finding is None or not finding.fires:
        return None
    cure = finding.config()
    if not cure:
        return f"objects too small for the model's input: {finding.text()}"
    keys = "; ".join(f"{sec}.{k}: {v}" for sec, d in cure.items() for k, v in d.items())
    return f"objects too small for the model's input: {finding.text()}. In the YAML: {keys}"
