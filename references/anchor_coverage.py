r"""Anchor coverage: how well a model's anchors fit the boxes it will train on, and anchors that fit better.

The boxes of a COCO dict as the model sees them (:class:`BoxSet`: after its own resize, at the padded
input size that sets its anchor grids); every box's best IoU with the anchors the model really uses
(:class:`AnchorGeometry`: its AnchorGenerator on its backbone's real feature-map strides, exactly and
without enumerating the grid); the fractions reaching the RPN matcher's foreground and background
thresholds (:class:`Thresholds`, read from ``model.rpn.proposal_matcher``), overall, per size bucket and
per class (:class:`Measured`); and the search for anchor sizes and aspect ratios that raise those
fractions without lowering any group (:func:`suggest_anchors`). Numbers in, numbers out: the data
report (data_report.py) words them.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scale import resized_hw  # noqa: E402

BUCKETS = (("small", 0, 32), ("medium", 32, 96), ("large", 96, math.inf))  # COCO's, on sqrt(area) after resize


# -- the thresholds ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """The RPN matcher's IoU thresholds, as the model holds them (torchvision's ``Matcher``): an anchor
    is foreground from IoU ``fg`` on, background under ``bg``, ignored between; with ``low_quality``
    (``allow_low_quality_matches``) each box's best anchors are foreground too, whatever their IoU."""

    fg: float = 0.7
    bg: float = 0.3
    low_quality: bool = True

    @classmethod
    def of(cls, model) -> "Thresholds":
        """The thresholds of ``model.rpn.proposal_matcher`` (set by model.kwargs rpn_fg_iou_thresh /
        rpn_bg_iou_thresh or model.rpn_head pos_iou_thr / neg_iou_thr)."""
        from models import ModelError

        m = getattr(getattr(model, "rpn", None), "proposal_matcher", None)
        if not all(hasattr(m, k) for k in ("high_threshold", "low_threshold")):
            raise ModelError(
                f"rpn.proposal_matcher: the data report needs the RPN's IoU thresholds (high_threshold, "
                f"low_threshold); {type(model).__name__}'s RPN has a {type(m).__name__}"
            )
        return cls(float(m.high_threshold), float(m.low_threshold), bool(getattr(m, "allow_low_quality_matches", 0)))

    def pairs(self) -> Tuple[Tuple[str, float], Tuple[str, float]]:
        """(key, threshold) of the coverage table's two fractions."""
        return ("fg", self.fg), ("bg", self.bg)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# -- the boxes as the model sees them ---------------------------------------------------------------
@dataclass(frozen=True)
class BoxSet:
    """Every non-crowd box of a COCO dict after the model's resize: one row per box, and every
    image's native size (images without boxes count in the scale cure's cost)."""

    xyxy: np.ndarray  # [N, 4] in model input coordinates
    labels: np.ndarray  # [N] category ids
    image_ids: np.ndarray  # [N]
    native_wh: np.ndarray  # [N, 2] the annotation's width and height, before the resize
    resized_hw: np.ndarray  # [N, 2] its image's height and width after the resize
    padded_hw: np.ndarray  # [N, 2] ... after padding to size_divisible: the anchors depend on it alone
    image_sizes: np.ndarray  # [M, 2] every image's native height and width

    def __len__(self) -> int:
        return len(self.xyxy)

    @property
    def sides(self) -> np.ndarray:
        """sqrt(area) after the resize."""
        wh = self.xyxy[:, 2:] - self.xyxy[:, :2]
        return np.sqrt(np.maximum(wh[:, 0] * wh[:, 1], 0))

    def take(self, idx: np.ndarray) -> "BoxSet":
        """The boxes at ``idx`` (every image's size kept)."""
        per_box = ("xyxy", "labels", "image_ids", "native_wh", "resized_hw", "padded_hw")
        return replace(self, **{k: getattr(self, k)[idx] for k in per_box})


def resized_boxes(coco_dataset: Dict[str, Any], geo: "AnchorGeometry") -> BoxSet:
    """Every non-crowd box in model input coordinates: ``geo``'s resize (scale.resized_hw) and padding."""
    images = {i["id"]: i for i in coco_dataset["images"]}
    anns = [a for a in coco_dataset["annotations"] if not a.get("iscrowd", 0) and a["image_id"] in images]
    n = len(anns)
    boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
    ids = np.asarray([a["image_id"] for a in anns])
    hw = np.asarray([(images[i]["height"], images[i]["width"]) for i in ids], dtype=np.float64).reshape(n, 2)
    new_h, new_w = resized_hw(hw[:, 0], hw[:, 1], geo.min_size, geo.max_size)
    sx, sy = new_w / hw[:, 1], new_h / hw[:, 0]  # torchvision resizes boxes by the size ratios
    xyxy = np.stack(
        [boxes[:, 0] * sx, boxes[:, 1] * sy, (boxes[:, 0] + boxes[:, 2]) * sx, (boxes[:, 1] + boxes[:, 3]) * sy], axis=1
    )
    d = geo.divisible
    return BoxSet(
        xyxy=xyxy,
        labels=np.asarray([a["category_id"] for a in anns], dtype=np.int64),
        image_ids=ids,
        native_wh=boxes[:, 2:],
        resized_hw=np.stack([new_h, new_w], axis=1).astype(np.int64),
        padded_hw=np.stack([np.ceil(new_h / d) * d, np.ceil(new_w / d) * d], axis=1).astype(np.int64),
        image_sizes=np.asarray([(i["height"], i["width"]) for i in coco_dataset["images"]], dtype=np.float64).reshape(
            -1, 2
        ),
    )


# -- geometry ---------------------------------------------------------------------------------------
def _iou_same_center_offsets(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of [N, 4] boxes with [N, A, 4] anchors."""
    b = boxes[:, None, :]
    iw = np.clip(np.minimum(b[..., 2], anchors[..., 2]) - np.maximum(b[..., 0], anchors[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], anchors[..., 3]) - np.maximum(b[..., 1], anchors[..., 1]), 0, None)
    inter = iw * ih
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    area_a = (anchors[..., 2] - anchors[..., 0]) * (anchors[..., 3] - anchors[..., 1])
    return inter / np.maximum(area_b + area_a - inter, 1e-12)


def best_anchor_iou(
    boxes: np.ndarray, levels: Sequence[Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]]
) -> np.ndarray:
    """Best IoU of each [N, 4] xyxy box with every anchor of every level.

    ``levels``: (cell anchors [A, 4] centred at 0, (grid h, grid w), (stride h, stride w)). Anchor
    (i, j) is the cell anchor shifted by (j * stride_w, i * stride_h), as torchvision's generator.
    For a fixed anchor shape the overlap can only shrink as the centres move apart along either
    axis, so the best anchor of that shape is the grid point nearest the box centre per axis: one
    candidate per shape instead of the whole grid, exactly.
    """
    best = np.zeros(len(boxes))
    if len(boxes) == 0:
        return best
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    for cell, (gh, gw), (sh, sw) in levels:
        acx = (cell[:, 0] + cell[:, 2]) / 2
        acy = (cell[:, 1] + cell[:, 3]) / 2
        j = np.clip(np.rint((cx[:, None] - acx[None]) / sw), 0, gw - 1)  # [N, A]
        i = np.clip(np.rint((cy[:, None] - acy[None]) / sh), 0, gh - 1)
        anchors = np.stack(
            [
                cell[None, :, 0] + j * sw,
                cell[None, :, 1] + i * sh,
                cell[None, :, 2] + j * sw,
                cell[None, :, 3] + i * sh,
            ],
            axis=-1,
        )
        best = np.maximum(best, _iou_same_center_offsets(boxes, anchors).max(axis=1))
    return best


class AnchorGeometry:
    """The model's anchors at each padded input size: cell anchors and the feature maps' grids.

    Feature-map sizes come from running the backbone on ``meta`` tensors (shapes only, no compute),
    so any backbone gives its real strides.
    """

    def __init__(self, model):
        self.cells = _cells(model.rpn.anchor_generator)
        self.backbone = copy.deepcopy(model.backbone).to("meta").eval()
        t = model.transform
        self.min_size, self.max_size = int(t.min_size[-1]), int(t.max_size)
        self.divisible = int(getattr(t, "size_divisible", 32))
        self._grids: Dict[Tuple[int, int], List] = {}

    def with_generator(self, gen) -> "AnchorGeometry":
        """The same backbone and grids (they do not depend on the anchors) with other anchors."""
        other = copy.copy(self)  # shares the meta backbone and the grid cache
        other.cells = _cells(gen)
        return other

    def with_sizes(self, min_size: int, max_size: int) -> "AnchorGeometry":
        """The same anchors at another resize (the grid cache is keyed by the padded size, so it is shared)."""
        other = copy.copy(self)
        other.min_size, other.max_size = int(min_size), int(max_size)
        return other

    @property
    def anchors_per_location(self) -> int:
        return len(self.cells[0])

    def levels(self, ph: int, pw: int):
        if (ph, pw) not in self._grids:  # feature-map grids and strides, per padded input size
            with torch.no_grad():
                feats = self.backbone(torch.empty(1, 3, ph, pw, device="meta"))
            sizes = [tuple(f.shape[-2:]) for f in (feats.values() if isinstance(feats, dict) else [feats])]
            self._grids[(ph, pw)] = [((gh, gw), (ph // gh, pw // gw)) for gh, gw in sizes]
        grids = self._grids[(ph, pw)]
        if len(grids) != len(self.cells):
            raise ValueError(
                f"the anchor generator has {len(self.cells)} levels but the backbone gives {len(grids)} feature maps"
            )
        return [(cell, grid, stride) for cell, (grid, stride) in zip(self.cells, grids)]


def _cells(gen) -> List[np.ndarray]:
    """Each level's cell anchors (centred at 0), as the generator makes them."""
    return [gen.generate_anchors(s, r).numpy().astype(np.float64) for s, r in zip(gen.sizes, gen.aspect_ratios)]


def _by_padded_size(boxes: BoxSet) -> List[Tuple[Tuple[int, int], np.ndarray]]:
    """(padded size, indices of its boxes) per padded input size: the anchors depend only on it."""
    keys, inverse = np.unique(boxes.padded_hw, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [((int(ph), int(pw)), np.nonzero(inverse == k)[0]) for k, (ph, pw) in enumerate(keys)]


def coverage(boxes: BoxSet, geo: AnchorGeometry) -> np.ndarray:
    """Best anchor IoU of every box, grouped by padded input size."""
    best = np.zeros(len(boxes))
    if len(boxes) == 0:
        return best
    for (ph, pw), idx in _by_padded_size(boxes):
        best[idx] = best_anchor_iou(boxes.xyxy[idx], geo.levels(ph, pw))
    return best


def coverage_groups(boxes: BoxSet, cat_names: Dict[int, str]) -> Dict[str, np.ndarray]:
    """The report's groups as boolean masks over the boxes: all, each size bucket, each class."""
    side = boxes.sides
    groups = {"all": np.ones(len(side), dtype=bool)}
    for name, lo, hi in BUCKETS:
        groups[name] = (side >= lo) & (side < hi)
    for c in sorted(cat_names):
        groups[f"class {cat_names[c]}"] = boxes.labels == c
    return groups


def fractions(best: np.ndarray, thr: Thresholds) -> Dict[str, float]:
    """The fractions of boxes whose best anchor IoU reaches ``thr.fg`` and ``thr.bg``, and their count."""
    n = len(best)
    out = {key: float((best >= t).mean()) if n else float("nan") for key, t in thr.pairs()}
    return {**out, "n": float(n)}


def coverage_table(best: np.ndarray, groups: Dict[str, np.ndarray], thr: Thresholds) -> Dict[str, Dict[str, float]]:
    return {k: fractions(best[m], thr) for k, m in groups.items()}


@dataclass(frozen=True)
class Measured:
    """The boxes at one input size with one set of anchors: their best IoUs, groups and coverage table."""

    boxes: BoxSet
    geo: AnchorGeometry
    best: np.ndarray
    groups: Dict[str, np.ndarray]
    table: Dict[str, Dict[str, float]]


def measure(data: Dict[str, Any], geo: AnchorGeometry, cat_names: Dict[int, str], thr: Thresholds) -> Measured:
    """A COCO dict's boxes at ``geo``'s input size against its anchors: groups all / size buckets / classes
    (``cat_names``: category id -> name) and their fractions at ``thr``."""
    boxes = resized_boxes(data, geo)
    return remeasure(boxes, geo, coverage_groups(boxes, cat_names), thr)


def remeasure(boxes: BoxSet, geo: AnchorGeometry, groups: Dict[str, np.ndarray], thr: Thresholds) -> Measured:
    """The same boxes and groups measured against ``geo``'s anchors."""
    best = coverage(boxes, geo)
    return Measured(boxes, geo, best, groups, coverage_table(best, groups, thr))


# -- advice -----------------------------------------------------------------------------------------
CANDIDATE_SIZES = 2.0 ** np.arange(2.0, 10.01, 0.25)  # 4 .. 1024 px, four per octave
# The advice may lower no group's coverage (the whole set, a size bucket or a class with at least
# MIN_GROUP boxes) at the foreground or the background threshold by more than MAX_DROP. A gain for the
# common class bought with a rare class's positives is the trade that makes a rare class collapse.
# Under MIN_GROUP boxes one box moves a group by more than 10 points: too noisy to hold the advice to.
MIN_GROUP, MAX_DROP = 10, 0.01
MIN_GAIN = 0.02  # coverage >= fg plus >= bg must rise by this much to be worth a change
# Neighbouring aspect ratios at least this factor apart (torchvision's 0.5, 1, 2): a narrower set
# repeats nearly the same anchor shape, spending anchors without reaching new boxes.
MIN_RATIO_STEP = 2.0


def cell_anchors(size: float, ratios: Sequence[float]) -> np.ndarray:
    """torchvision's cell anchors for one size and its aspect ratios (h / w), centred at 0 and rounded."""
    r = np.sqrt(np.asarray(ratios, dtype=np.float64))
    ws, hs = size / r, size * r
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / 2)


def lowered_groups(
    before: Dict[str, Dict[str, float]], after: Dict[str, Dict[str, float]], thr: Thresholds
) -> List[str]:
    """The groups of MIN_GROUP boxes or more whose coverage at either threshold drops by more than MAX_DROP."""
    out = []
    for key, b in before.items():
        if b["n"] < MIN_GROUP:
            continue
        out += [
            f"{key} at {t:g}: {b[k]:.1%} -> {after[key][k]:.1%}"
            for k, t in thr.pairs()
            if after[key][k] < b[k] - MAX_DROP
        ]
    return out


class _Objective:
    """Coverage >= fg plus >= bg on the sample, under the rule that no group loses more than MAX_DROP
    against the current anchors. Values compare as (-shortfall, coverage): the points lost beyond the
    rule rank first, so the search walks out of a losing setting before it climbs."""

    def __init__(self, masks: np.ndarray, weight: np.ndarray, current_best: np.ndarray, thr: Thresholds):
        m = masks * weight[None]  # [groups, boxes]: every group's weighted mean as one product
        self.means = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12)
        self.weight = weight / weight.sum()
        self.thresholds = (thr.fg, thr.bg)
        self.floors = [self.means @ (current_best >= t) - MAX_DROP for t in self.thresholds]

    def __call__(self, best: np.ndarray) -> Tuple[float, float]:
        hits = [(best >= t).astype(np.float64) for t in self.thresholds]
        shortfall = sum(float(np.clip(f - self.means @ h, 0, None).sum()) for f, h in zip(self.floors, hits))
        return -shortfall, float(sum(self.weight @ h for h in hits))


def _better(a: Tuple[float, float], b: Tuple[float, float]) -> bool:
    return a[0] > b[0] + 1e-12 or (a[0] >= b[0] - 1e-12 and a[1] > b[1] + 1e-12)


def _spread(lo: float, hi: float, n: int) -> List[float]:
    """n ratios from lo to hi, evenly in log, neighbours at least MIN_RATIO_STEP apart (around the centre)."""
    if n == 1:
        return [round(math.sqrt(lo * hi), 2)]
    step = max((hi / lo) ** (1 / (n - 1)), MIN_RATIO_STEP)
    centre = math.sqrt(lo * hi)
    return [round(centre * step ** (i - (n - 1) / 2), 2) for i in range(n)]


def ratio_candidates(h_over_w: np.ndarray, cats: np.ndarray, current: Sequence[float]) -> List[List[float]]:
    """The aspect-ratio sets the search tries, each of len(current) ratios: the current ones; a set
    spanning the classes' median h / w (every class's typical shape gets an anchor shape, however
    few its boxes: quantiles of the pooled boxes follow the common class and can leave a rare shape
    uncovered); and the same span widened to the classes' own spread (10th to 90th percentile)."""
    n = len(current)
    per_class = [h_over_w[cats == c] for c in np.unique(cats)]
    per_class = [v for v in per_class if len(v) >= MIN_GROUP] or per_class
    med = [float(np.median(v)) for v in per_class]
    lo, hi = min(float(np.quantile(v, 0.1)) for v in per_class), max(float(np.quantile(v, 0.9)) for v in per_class)
    out: List[List[float]] = []
    for cand in ([float(r) for r in current], _spread(min(med), max(med), n), _spread(lo, hi, n)):
        if cand not in out:
            out.append(cand)
    return out


def _sample(cats: np.ndarray, sample: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Indices to search on and their weights: every class keeps at least min(its boxes, 200) so a
    rare class's coverage is measured too; weights (boxes / kept, per class) keep the means unbiased."""
    n = len(cats)
    if n <= sample:
        return np.arange(n), np.ones(n)
    keep, weight = [], []
    for c in np.unique(cats):
        idx = np.nonzero(cats == c)[0]
        k = min(len(idx), max(200, int(round(sample * len(idx) / n))))
        keep.append(rng.choice(idx, k, replace=False))
        weight.append(np.full(k, len(idx) / k))
    return np.concatenate(keep), np.concatenate(weight)


class _SizeSearch:
    """The boxes one anchor search runs on (a class-balanced sample of ``found``'s), its objective, and
    each level's best IoU for a candidate cell."""

    def __init__(self, found: Measured, thr: Thresholds, sample: int, seed: int):
        idx, weight = _sample(found.boxes.labels, sample, np.random.default_rng(seed))
        self.boxes, self.geo = found.boxes.take(idx), found.geo
        self.by_size = _by_padded_size(self.boxes)
        rows = [m[idx] for m in found.groups.values() if m.sum() >= MIN_GROUP and m[idx].any()]
        masks = np.stack(rows).astype(np.float64) if rows else np.zeros((0, len(idx)))
        self.objective = _Objective(masks, weight, coverage(self.boxes, self.geo), thr)

    def level_best(self, level: int, cell: np.ndarray) -> np.ndarray:
        best = np.zeros(len(self.boxes))
        for (ph, pw), idx in self.by_size:
            _, grid, stride = self.geo.levels(ph, pw)[level]
            best[idx] = best_anchor_iou(self.boxes.xyxy[idx], [(cell, grid, stride)])
        return best

    def sizes(self, start: List[float], ratios: List[float]) -> Tuple[List[float], Tuple[float, float]]:
        """Coordinate ascent over one size per level (CANDIDATE_SIZES on that level's real anchor grid,
        non-decreasing with the stride as FPN's levels are meant), two passes."""
        sizes = list(start)
        per_level = [self.level_best(i, cell_anchors(s, ratios)) for i, s in enumerate(sizes)]
        value = self.objective(np.max(per_level, axis=0))
        for _ in range(2):
            for level in range(len(sizes)):
                lo = sizes[level - 1] if level > 0 else 0.0
                hi = sizes[level + 1] if level + 1 < len(sizes) else math.inf
                for size in CANDIDATE_SIZES[(CANDIDATE_SIZES >= lo) & (CANDIDATE_SIZES <= hi)]:
                    trial = self.level_best(level, cell_anchors(size, ratios))
                    v = self.objective(np.max(per_level[:level] + [trial] + per_level[level + 1 :], axis=0))
                    if _better(v, value):
                        value, sizes[level], per_level[level] = v, float(size), trial
        return sizes, value


def suggest_anchors(
    found: Measured, gen, thr: Thresholds, sample: int = 20000, seed: int = 0
) -> List[Tuple[List[List[int]], List[List[float]], Tuple[float, float]]]:
    """Anchor settings that raise coverage without lowering any group, best first.

    For each set of ``ratio_candidates``, one anchor size per feature map by coordinate ascent over
    4..1024 px on that level's real anchor grid (a size that suits the boxes but not the level's
    stride gains nothing), maximising the fractions of boxes that reach ``thr.fg`` and ``thr.bg``
    subject to the MAX_DROP rule per group (``found.groups``; "all" first). ``gen``: the model's
    AnchorGenerator, the start. MMDetection's anchor optimizer maximises the boxes' IoU with the
    anchors the same way, by search. Returns (sizes, [ratios], (-shortfall, coverage) on the sample)
    per ratio set, the best first.
    """
    search = _SizeSearch(found, thr, sample, seed)
    xyxy = search.boxes.xyxy
    h_over_w = np.maximum(xyxy[:, 3] - xyxy[:, 1], 1e-3) / np.maximum(xyxy[:, 2] - xyxy[:, 0], 1e-3)
    start = [float(np.exp(np.mean(np.log(s)))) for s in gen.sizes]
    out = []
    for ratios in ratio_candidates(h_over_w, search.boxes.labels, list(gen.aspect_ratios[0])):
        sizes, value = search.sizes(start, ratios)
        out.append(([[int(round(s))] for s in sizes], [ratios], value))
    out.sort(key=lambda r: (-r[2][0], -r[2][1]))  # by the same order as _better: no shortfall first
    return out
