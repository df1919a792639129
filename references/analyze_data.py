r"""The data and anchor report: from the annotation file alone, before step 1.

Objects per class and the imbalance, empty images, object sizes after the model's own resize, and
anchor coverage: for every ground-truth box, the best IoU with the anchors the model really uses
(its AnchorGenerator, at the real padded input size and feature-map strides), as the fraction
reaching the RPN's foreground threshold (0.7) and 0.3, per size bucket and per class. When
coverage is poor it searches anchor sizes per level for aspect ratios that span the classes' shapes,
and proposes the YAML of a setting that raises coverage while no size bucket or class loses more
than a point at either threshold, with every group's coverage before and after (or says in one
line that no setting tried does). It judges the input scale: the objects' sides after the resize
against the smallest anchor and the finest stride (scale.py), and when they are too small it
prints the min_size / max_size that resolves them and its cost, or tiles; the anchor search then
runs at that input size. From a 5:1 class imbalance on it gives the repeat-factor threshold and a
class_weight list made safe (tempered; none while the scale is the problem: diagnostics.py).
All of it is printed as one YAML config, which ``--write-config FILE`` merges into the config the
report ran with and writes, for ``train.py --config FILE``.

    python references/analyze_data.py --config references/configs/shapes.yaml [--plot report.png]
    python references/analyze_data.py --config my.yaml --write-config my_advised.yaml

Takes the training script's flags and config; reads only the annotation JSON (no image is decoded).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import image_classes, repeat_factors, suggest_repeat_threshold  # noqa: E402
from scale import ScaleFinding, finding_from_boxes, tile_view, withhold_under_augmentation  # noqa: E402

if TYPE_CHECKING:
    from train_config import TrainConfig

THRESHOLDS = (0.7, 0.3)  # the RPN's foreground and background IoU thresholds
BUCKETS = (("small", 0, 32), ("medium", 32, 96), ("large", 96, math.inf))  # COCO's, on sqrt(area) after resize


# -- geometry ---------------------------------------------------------------------------------------
def resized_size(h: int, w: int, min_size: int, max_size: int) -> Tuple[int, int, float]:
    """GeneralizedRCNNTransform's resize: (new h, new w, scale)."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(math.floor(h * scale)), int(math.floor(w * scale)), scale


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


def resized_boxes(coco_dataset: Dict[str, Any], geo: AnchorGeometry):
    """Every non-crowd box in model input coordinates, with its class, padded size and image id."""
    images = {i["id"]: i for i in coco_dataset["images"]}
    anns = [a for a in coco_dataset["annotations"] if not a.get("iscrowd", 0) and a["image_id"] in images]
    n = len(anns)
    boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
    cats = np.asarray([a["category_id"] for a in anns], dtype=np.int64)
    hw = np.asarray(
        [(images[a["image_id"]]["height"], images[a["image_id"]]["width"]) for a in anns], dtype=np.float64
    ).reshape(n, 2)
    scale = np.minimum(geo.min_size / hw.min(1), geo.max_size / hw.max(1))
    new_h, new_w = np.floor(hw[:, 0] * scale), np.floor(hw[:, 1] * scale)
    sx, sy = new_w / hw[:, 1], new_h / hw[:, 0]  # torchvision resizes boxes by the size ratios
    xyxy = np.stack(
        [boxes[:, 0] * sx, boxes[:, 1] * sy, (boxes[:, 0] + boxes[:, 2]) * sx, (boxes[:, 1] + boxes[:, 3]) * sy], axis=1
    )
    d = geo.divisible
    padded = np.stack([np.ceil(new_h / d) * d, np.ceil(new_w / d) * d], axis=1).astype(np.int64)
    return xyxy, cats, padded


def coverage(xyxy: np.ndarray, padded: np.ndarray, geo: AnchorGeometry) -> np.ndarray:
    """Best anchor IoU of every box, grouped by padded input size (anchors depend only on it)."""
    best = np.zeros(len(xyxy))
    if len(xyxy) == 0:
        return best
    keys, inverse = np.unique(padded, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for k, (ph, pw) in enumerate(keys):
        idx = np.nonzero(inverse == k)[0]
        best[idx] = best_anchor_iou(xyxy[idx], geo.levels(int(ph), int(pw)))
    return best


# -- advice -----------------------------------------------------------------------------------------
CANDIDATE_SIZES = 2.0 ** np.arange(2.0, 10.01, 0.25)  # 4 .. 1024 px, four per octave
# The advice may lower no group's coverage (the whole set, a size bucket or a class with at least
# MIN_GROUP boxes) at IoU 0.7 or at 0.3 by more than MAX_DROP. A gain for the common class bought
# with a rare class's positives is the trade that makes a rare class collapse. Under MIN_GROUP boxes
# one box moves a group by more than 10 points: too noisy to hold the advice to.
MIN_GROUP, MAX_DROP = 10, 0.01
MIN_GAIN = 0.02  # coverage >= 0.7 plus >= 0.3 must rise by this much to be worth a change
# Neighbouring aspect ratios at least this factor apart (torchvision's 0.5, 1, 2): a narrower set
# repeats nearly the same anchor shape, spending anchors without reaching new boxes.
MIN_RATIO_STEP = 2.0


def cell_anchors(size: float, ratios: Sequence[float]) -> np.ndarray:
    """torchvision's cell anchors for one size and its aspect ratios (h / w), centred at 0 and rounded."""
    r = np.sqrt(np.asarray(ratios, dtype=np.float64))
    ws, hs = size / r, size * r
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / 2)


def _level_best(xyxy, keys, inverse, geo: AnchorGeometry, level: int, cell: np.ndarray) -> np.ndarray:
    best = np.zeros(len(xyxy))
    for k, (ph, pw) in enumerate(keys):
        idx = np.nonzero(inverse == k)[0]
        _, grid, stride = geo.levels(int(ph), int(pw))[level]
        best[idx] = best_anchor_iou(xyxy[idx], [(cell, grid, stride)])
    return best


def coverage_groups(side: np.ndarray, cats: np.ndarray, cat_names: Dict[int, str]) -> Dict[str, np.ndarray]:
    """The report's groups as boolean masks over the boxes: all, each size bucket, each class."""
    groups = {"all": np.ones(len(side), dtype=bool)}
    for name, lo, hi in BUCKETS:
        groups[name] = (side >= lo) & (side < hi)
    for c in sorted(cat_names):
        groups[f"class {cat_names[c]}"] = cats == c
    return groups


def coverage_table(best: np.ndarray, groups: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    return {k: _fractions(best[m]) for k, m in groups.items()}


def lowered_groups(before: Dict[str, Dict[str, float]], after: Dict[str, Dict[str, float]]) -> List[str]:
    """The groups of MIN_GROUP boxes or more whose coverage at 0.7 or 0.3 drops by more than MAX_DROP."""
    out = []
    for key, b in before.items():
        if b["n"] < MIN_GROUP:
            continue
        out += [
            f"{key} at {t}: {b[t]:.1%} -> {after[key][t]:.1%}"
            for t in ("0.7", "0.3")
            if after[key][t] < b[t] - MAX_DROP
        ]
    return out


class _Objective:
    """Coverage >= 0.7 plus >= 0.3 on the sample, under the rule that no group loses more than
    MAX_DROP against the current anchors. Values compare as (-shortfall, coverage): the points lost
    beyond the rule rank first, so the search walks out of a losing setting before it climbs."""

    def __init__(self, masks: np.ndarray, weight: np.ndarray, current_best: np.ndarray):
        m = masks * weight[None]  # [groups, boxes]: every group's weighted mean as one product
        self.means = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12)
        self.weight = weight / weight.sum()
        self.floors = [self.means @ (current_best >= t) - MAX_DROP for t in THRESHOLDS]

    def __call__(self, best: np.ndarray) -> Tuple[float, float]:
        hits = [(best >= t).astype(np.float64) for t in THRESHOLDS]
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


def _search_sizes(boxes, keys, inverse, geo, start: List[float], ratios, objective: _Objective):
    """Coordinate ascent over one size per level (CANDIDATE_SIZES on that level's real anchor grid,
    non-decreasing with the stride as FPN's levels are meant), two passes."""
    sizes = list(start)
    per_level = [_level_best(boxes, keys, inverse, geo, i, cell_anchors(s, ratios)) for i, s in enumerate(sizes)]
    value = objective(np.max(per_level, axis=0))
    for _ in range(2):
        for level in range(len(sizes)):
            lo = sizes[level - 1] if level > 0 else 0.0
            hi = sizes[level + 1] if level + 1 < len(sizes) else math.inf
            for size in CANDIDATE_SIZES[(CANDIDATE_SIZES >= lo) & (CANDIDATE_SIZES <= hi)]:
                trial = _level_best(boxes, keys, inverse, geo, level, cell_anchors(size, ratios))
                v = objective(np.max(per_level[:level] + [trial] + per_level[level + 1 :], axis=0))
                if _better(v, value):
                    value, sizes[level], per_level[level] = v, float(size), trial
    return sizes, value


def suggest_anchors(
    xyxy: np.ndarray,
    padded: np.ndarray,
    geo: AnchorGeometry,
    current_sizes: Sequence[Sequence[float]],
    current_ratios: Sequence[float],
    cats: np.ndarray,
    groups: Dict[str, np.ndarray],
    sample: int = 20000,
    seed: int = 0,
) -> List[Tuple[List[List[int]], List[List[float]], Tuple[float, float]]]:
    """Anchor settings that raise coverage without lowering any group, best first.

    For each set of ``ratio_candidates``, one anchor size per feature map by coordinate ascent over
    4..1024 px on that level's real anchor grid (a size that suits the boxes but not the level's
    stride gains nothing), maximising the fractions of boxes that reach 0.7 and 0.3 subject to the
    MAX_DROP rule per group (``groups``: the report's masks; "all" first). MMDetection's anchor
    optimizer maximises the boxes' IoU with the anchors the same way, by search. Returns
    (sizes, [ratios], (-shortfall, coverage) on the sample) per ratio set, the best first.
    """
    idx, weight = _sample(cats, sample, np.random.default_rng(seed))
    boxes, pad = xyxy[idx], padded[idx]
    rows = [m[idx] for m in groups.values() if m.sum() >= MIN_GROUP and m[idx].any()]
    masks = np.stack(rows).astype(np.float64) if rows else np.zeros((0, len(idx)))
    keys, inverse = np.unique(pad, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    objective = _Objective(masks, weight, coverage(boxes, pad, geo))
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-3)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-3)
    start = [float(np.exp(np.mean(np.log(s)))) for s in current_sizes]
    out = []
    for ratios in ratio_candidates(h / w, cats[idx], current_ratios):
        sizes, value = _search_sizes(boxes, keys, inverse, geo, start, ratios, objective)
        out.append(([[int(round(s))] for s in sizes], [ratios], value))
    out.sort(key=lambda r: (-r[2][0], -r[2][1]))  # by the same order as _better: no shortfall first
    return out


# -- the report -------------------------------------------------------------------------------------
@dataclass
class DataReport:
    images: int
    empty_fraction: float
    objects: Dict[str, int]
    imbalance: float
    size_quantiles: Dict[str, float]
    coverage: Dict[
        str, Dict[str, float]
    ]  # "all", "small"/"medium"/"large", "class <name>" -> {"0.7": f, "0.3": f, "n": n}
    anchors: Dict[str, Any]
    advice: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)
    repeat_factors: Optional[Dict[str, Any]] = None  # the suggested repeat-factor sampling (repeat_factor_advice)
    rare_advice: Optional[Dict[str, Any]] = None  # the imbalance cure: class_weight list, repeat threshold
    anchor_note: Optional[str] = None  # why no anchors are suggested although coverage is poor
    scale: Optional[Dict[str, Any]] = None  # scale.ScaleFinding.to_dict(): the input-scale rule
    config: Dict[str, Any] = field(default_factory=dict)  # all the advice as one config (advice_config)

    def to_dict(self) -> Dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "images",
                "empty_fraction",
                "objects",
                "imbalance",
                "size_quantiles",
                "coverage",
                "anchors",
                "advice",
                "warnings",
                "repeat_factors",
                "rare_advice",
                "anchor_note",
                "scale",
                "config",
            )
        }

    def text(self) -> str:
        lines = [
            f"data report: {self.images} images ({self.empty_fraction:.0%} without objects); objects per class: "
            + ", ".join(f"{k} {v}" for k, v in self.objects.items())
            + (f"; imbalance {self.imbalance:.1f}:1" if math.isfinite(self.imbalance) else ""),
            "  object size after resize, sqrt(area) px: "
            + ", ".join(f"{k} {v:.1f}" for k, v in self.size_quantiles.items()),
            f"  anchors: sizes {self.anchors['sizes']}, aspect ratios {self.anchors['aspect_ratios']}",
            "  anchor coverage (best IoU >= 0.7 / >= 0.3):",
        ]
        for key, c in self.coverage.items():
            if c["n"]:
                lines.append(f"    {key:<24} {c['0.7']:6.1%} / {c['0.3']:6.1%}   ({int(c['n'])} boxes)")
        if self.scale and not self.scale["fires"]:
            lines.append("  input scale: " + ScaleFinding(**self.scale).text())
        lines += [f"  WARNING: {w}" for w in self.warnings]
        if self.repeat_factors and self.repeat_factors["threshold"] is not None:
            lines.append(_repeat_line(self.repeat_factors))
        if self.advice:
            lines += _anchor_advice_lines(self.advice, bool(self.scale and self.scale["fires"]))
        if self.anchor_note:
            lines.append(f"  anchor advice: {self.anchor_note}")
        lines += advice_lines(self.config)
        return "\n".join(lines)


def advice_lines(config: Dict[str, Any]) -> List[str]:
    """The advice as one indented YAML block, as --write-config merges it into the config."""
    if not config:
        return ["  advice: no change to the scale, anchors or class balance"]
    import yaml

    block = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=200).splitlines()
    return [
        "  advice, as one config (the lr stays at the linear-scaling rule; analyze_data.py --write-config FILE "
        "writes this config with it):"
    ] + ["    " + line for line in block]


def _anchor_advice_lines(a: Dict[str, Any], scaled: bool = False) -> List[str]:
    at = " at the advised input scale" if scaled else ""
    lines = [
        f"  suggested anchors (model.anchor_sizes {a['anchor_sizes']}, model.aspect_ratios {a['aspect_ratios']}) "
        f"raise coverage >= 0.7{at} from {a['before']:.1%} to {a['after']:.1%} "
        f"(>= 0.3: {a['before_03']:.1%} -> {a['after_03']:.1%}) and lower no size bucket or class by more than "
        f"{MAX_DROP * 100:g} point at either",
        f"  coverage{at}, current anchors -> with them (>= 0.7 / >= 0.3):",
    ]
    for key, c in a["coverage"].items():
        lines.append(
            f"    {key:<24} {c['before_07']:6.1%} -> {c['after_07']:6.1%} / {c['before_03']:6.1%} -> "
            f"{c['after_03']:6.1%}   ({int(c['n'])} boxes)"
        )
    return lines


def _repeat_line(r: Dict[str, Any]) -> str:
    top = list(r["class_factors"].items())
    shown = ", ".join(f"{k} x{v:.2f}" for k, v in top[:3]) + (f" (+{len(top) - 3} more)" if len(top) > 3 else "")
    return (
        f"  rare classes: --repeat-factor-threshold {r['threshold']:g} (the median class's image fraction) "
        f"repeats {shown}: {r['expected_images_per_epoch']:.1f} images per epoch on average instead of {r['images']}"
    )


def repeat_factor_advice(data: Dict[str, Any], cat_names: Dict[int, str]) -> Dict[str, Any]:
    """suggest_repeat_threshold on a COCO dict: the threshold, the factors > 1 it gives (rarest
    class first) and the images per epoch it gives on average; threshold None when none is needed."""
    classes = image_classes(data["annotations"], [i["id"] for i in data["images"]])
    t = suggest_repeat_threshold(classes)
    n = len(classes)
    out = {"threshold": t, "class_factors": {}, "images": n, "expected_images_per_epoch": float(n)}
    if t is not None:
        factors, per_class = repeat_factors(classes, t)
        ranked = sorted((c for c in per_class if per_class[c] > 1), key=lambda c: -per_class[c])
        out["class_factors"] = {cat_names.get(c, str(c)): per_class[c] for c in ranked}
        out["expected_images_per_epoch"] = float(sum(factors))
    return out


def _fractions(best: np.ndarray) -> Dict[str, float]:
    n = len(best)
    return {
        "0.7": float((best >= 0.7).mean()) if n else float("nan"),
        "0.3": float((best >= 0.3).mean()) if n else float("nan"),
        "n": float(n),
    }


# With one anchor size per octave a box between two sizes reaches IoU ~0.7 at best, so about half of
# the boxes reaching 0.7 is normal. Poor is: boxes that do not even reach 0.3 (they get only the
# RPN's low-quality match), overall coverage under 0.2, or a size bucket / class at under half the
# overall rate.
POOR_03, POOR_07, RELATIVE = 0.9, 0.2, 0.5


def _is_poor(key: str, c: Dict[str, float], overall: Dict[str, float]) -> bool:
    if c["n"] < 10:
        return False
    if key == "all":
        return c["0.3"] < POOR_03 or c["0.7"] < POOR_07
    # A size bucket or class: flagged when it is worse than the whole, not merely as poor.
    return (c["0.3"] < POOR_03 and c["0.3"] < overall["0.3"] - 0.05) or c["0.7"] < RELATIVE * overall["0.7"]


def data_report(
    coco,
    model,
    names: Optional[List[str]] = None,
    label_to_cat: Optional[Dict[int, int]] = None,
    dataset: Optional[Dict[str, Any]] = None,
    cfg: Optional[TrainConfig] = None,
) -> DataReport:
    """The report for a ``pycocotools.COCO`` (or a raw COCO dict) and the model that will train on it.

    ``label_to_cat``: the training labels' category ids (default: the sorted ids as labels 1..K);
    ``cfg``: the training config, so that no advice repeats a setting it already has.
    """
    data = dataset if dataset is not None else coco.dataset
    tile = (cfg.data.tile_size, cfg.data.tile_overlap) if cfg is not None and cfg.data.tile_size else None
    if tile:  # the model sees tiles: the sizes and anchor grids the report measures are theirs
        data = tile_view(data, *tile)
    cat_names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
    geo = AnchorGeometry(model)
    xyxy, cats, padded = resized_boxes(data, geo)
    best = coverage(xyxy, padded, geo)
    counts = Counter(cats.tolist())
    objects = {cat_names[c]: counts.get(c, 0) for c in sorted(cat_names)}
    nonzero = [v for v in objects.values() if v]
    with_objects = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)}
    side = np.sqrt(np.maximum((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]), 0))
    groups = coverage_groups(side, cats, cat_names)
    cov = coverage_table(best, groups)
    gen = model.rpn.anchor_generator
    report = DataReport(
        images=len(data["images"]),
        empty_fraction=1 - len(with_objects) / max(len(data["images"]), 1),
        objects=objects,
        imbalance=max(nonzero) / min(nonzero) if nonzero else float("nan"),
        size_quantiles={f"p{q}": float(np.percentile(side, q)) if len(side) else float("nan") for q in (5, 50, 95)},
        coverage=cov,
        anchors={"sizes": [list(s) for s in gen.sizes], "aspect_ratios": [list(r) for r in gen.aspect_ratios]},
        repeat_factors=repeat_factor_advice(data, cat_names),
    )
    counts = label_counts(cats, cat_names, label_to_cat, _model_num_classes(model))
    finding = finding_from_boxes(model, geo, data, xyxy) if len(xyxy) else None
    scaled = None
    if finding is not None:
        finding = withhold_under_augmentation(finding, cfg.data.augmentation if cfg is not None else None)
        report.scale = finding.to_dict()
        if finding.fires:
            report.warnings.append("input scale: " + finding.text())
            if not finding.withheld:  # the anchors are searched at the input the cure gives
                scaled = _at_advised_scale(finding, data, geo, cat_names)
    _warn_and_advise(report, xyxy, padded, best, model, geo, cats, groups, counts, cfg, scaled)
    report.config = advice_config(report, cfg)
    return report


def scale_finding(
    model, data: Dict[str, Any], tile: Optional[Sequence[int]] = None, augmentation: Optional[str] = None
) -> Optional[ScaleFinding]:
    """The scale rule (scale.py) for ``model`` on a COCO dict's boxes; ``tile``: (tile_size, tile_overlap)
    when the config tiles; ``augmentation``: data.augmentation (a policy that sets the input size withholds
    the cure). None without boxes. The collapse diagnostics call it."""
    if tile:
        data = tile_view(data, int(tile[0]), int(tile[1]))
    geo = AnchorGeometry(model)
    xyxy, _, _ = resized_boxes(data, geo)
    if not len(xyxy):
        return None
    return withhold_under_augmentation(finding_from_boxes(model, geo, data, xyxy), augmentation)


def _at_advised_scale(finding: ScaleFinding, data: Dict[str, Any], geo: AnchorGeometry, cat_names):
    """The boxes, padded sizes, coverage, groups and table at the input the scale cure gives."""
    if finding.tile_size is not None:
        data = tile_view(data, finding.tile_size, finding.tile_overlap)
    else:
        geo = copy.copy(geo)  # shares the meta backbone and the grid cache (grids depend on the padded size)
        geo.min_size, geo.max_size = finding.new_min_size, finding.new_max_size
    xyxy, cats, padded = resized_boxes(data, geo)
    best = coverage(xyxy, padded, geo)
    side = np.sqrt(np.maximum((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]), 0))
    groups = coverage_groups(side, cats, cat_names)
    return xyxy, padded, best, geo, groups, coverage_table(best, groups)


def advice_config(report: DataReport, cfg: Optional[TrainConfig]) -> Dict[str, Any]:
    """Every piece of advice as one config: the scale cure, anchors, the safe class_weight list and
    the repeat-factor threshold. Mapping-valued keys (model.kwargs, model.roi_head) keep what the
    config already holds: the config replaces them whole."""
    out: Dict[str, Any] = {}
    if report.scale and report.scale["fires"]:
        for sec, keys in ScaleFinding(**report.scale).config(dict(cfg.model.kwargs) if cfg else {}).items():
            out.setdefault(sec, {}).update(keys)
    if report.advice:
        out.setdefault("model", {}).update(
            anchor_sizes=report.advice["anchor_sizes"], aspect_ratios=report.advice["aspect_ratios"]
        )
    cure = report.rare_advice or {}
    if cure.get("class_weight") is not None:
        roi = dict(cfg.model.roi_head) if cfg else {}
        out.setdefault("model", {})["roi_head"] = {**roi, "class_weight": [round(w, 3) for w in cure["class_weight"]]}
    if cure.get("repeat_factor_threshold") is not None:
        out.setdefault("data", {})["repeat_factor_threshold"] = float(f"{cure['repeat_factor_threshold']:.4g}")
    return out


def _model_num_classes(model) -> Optional[int]:
    layer = getattr(getattr(getattr(model, "roi_heads", None), "box_predictor", None), "cls_score", None)
    return int(layer.out_features) if isinstance(layer, torch.nn.Linear) else None


def label_counts(
    cats: np.ndarray, cat_names: Dict[int, str], label_to_cat: Optional[Dict[int, int]], num_classes: Optional[int]
) -> List[int]:
    """Objects per foreground label 1..K in label order (K = num_classes - 1, else the highest label):
    the ``counts`` of tv_lossfix.class_weights_from_counts. A label without a category counts 0."""
    if label_to_cat is None:  # contiguous labels, as the training script gives a COCO-format file
        label_to_cat = {i + 1: c for i, c in enumerate(sorted(cat_names))}
    k = num_classes - 1 if num_classes else max(label_to_cat, default=0)
    per_cat = Counter(cats.tolist())
    return [per_cat.get(label_to_cat.get(label), 0) for label in range(1, k + 1)]


def _warn_and_advise(report: DataReport, xyxy, padded, best, model, geo, cats, groups, counts, cfg, scaled) -> None:
    poor = [k for k, c in report.coverage.items() if _is_poor(k, c, report.coverage["all"])]
    for k in poor:
        c = report.coverage[k]
        report.warnings.append(
            f"{k}: only {c['0.7']:.0%} of {int(c['n'])} boxes reach IoU 0.7 with any anchor "
            f"({c['0.3']:.0%} reach 0.3): the RPN sees few positives for them"
        )
    _imbalance_advice(report, counts, cfg)
    table = report.coverage
    if scaled is not None:  # the anchors are searched at the input size the scale cure gives
        xyxy, padded, best, geo, groups, table = scaled
        poor = [k for k, c in table.items() if _is_poor(k, c, table["all"])]
    if poor and len(xyxy):
        _anchor_advice(report, xyxy, padded, best, model, geo, cats, groups, table)


# An imbalance of 5:1 or more gets the cure printed. From there the rare class gets a fifth or less
# of the positive RoIs and of the classifier's gradient, and the rebalancing weights differ
# materially: inverse_sqrt gives it sqrt(5) = 2.2x the common class's weight, effective_number
# (beta 0.999) 4x / 3x / 1.6x when the rare class has 100 / 300 / 1000 objects. Below 5:1 the
# weights stay within about 2x and the default loss is the better first try. The earlier line,
# 10:1, stayed silent on sets such as 8.8:1 whose rare class collapses.
IMBALANCE_ADVICE = 5.0


def _imbalance_advice(report: DataReport, counts: List[int], cfg: Optional[TrainConfig]) -> None:
    imb = report.imbalance
    if not (math.isfinite(imb) and imb >= IMBALANCE_ADVICE and any(counts)):
        return
    from diagnostics import rare_class_cure

    threshold = (report.repeat_factors or {}).get("threshold")
    cure = rare_class_cure(counts, threshold, cfg, scale_fires=bool(report.scale and report.scale["fires"]))
    present = {k: v for k, v in report.objects.items() if v}
    rare, common = min(present, key=present.get), max(present, key=present.get)
    if cure["yaml"]:
        tail = "rebalance them (in the advice below)" + (
            f"; no class_weight list: {cure['withheld']}" if cure["withheld"] else ""
        )
    elif cure["withheld"]:
        tail = f"no class_weight list: {cure['withheld']}"
    elif cure["already"]:
        tail = f"{' and '.join(cure['already'])} already set: watch the rare classes' rows in the per-class table"
    else:
        tail = "watch the rare classes' rows in the per-class table"
    report.warnings.append(
        f"class imbalance {imb:.1f}:1 (rarest {rare!r} {present[rare]} objects, most {common!r} {present[common]}): "
        f"the rare classes get few positive RoIs and a small share of the classifier's gradient; {tail}"
    )
    report.rare_advice = cure


def _anchor_advice(report: DataReport, xyxy, padded, best, model, geo, cats, groups, table) -> None:
    """Suggest anchors only when a setting raises coverage by MIN_GAIN and lowers no group by more
    than MAX_DROP at 0.7 or 0.3 on the whole set; else say in one line why none is suggested."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    gen, before = model.rpn.anchor_generator, table
    tried = suggest_anchors(xyxy, padded, geo, gen.sizes, list(gen.aspect_ratios[0]), cats, groups)
    rejected = []
    for sizes, ratios, _ in tried:
        new_gen = AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(ratios[0]) for _ in sizes))
        after = coverage(xyxy, padded, geo.with_generator(new_gen))
        after_table = coverage_table(after, groups)
        lowered = lowered_groups(before, after_table)
        gain = sum(float((after >= t).mean() - (best >= t).mean()) for t in THRESHOLDS)
        if not lowered and gain >= MIN_GAIN:
            report.advice = _advice(sizes, ratios, best, after, before, after_table, gen, new_gen)
            return
        rejected.append((gain, f"anchor_sizes {sizes}, aspect_ratios {ratios}", lowered))
    # Name a setting that lowers a group if one was tried (the conflict), else the best gain.
    gain, what, lowered = max(rejected, key=lambda r: (bool(r[2]), r[0]))
    why = f"{what} would lower {'; '.join(lowered[:3])}" if lowered else f"the best gains {gain:.1%}"
    report.anchor_note = (
        f"none of the {len(tried)} anchor settings tried raises coverage (>= 0.7 plus >= 0.3) by {MIN_GAIN:.0%} "
        f"without lowering a size bucket or class by more than {MAX_DROP * 100:g} point at IoU 0.7 or 0.3: "
        f"keep the current anchors ({why})"
    )


def _advice(sizes, ratios, best, after, before_table, after_table, gen, new_gen) -> Dict[str, Any]:
    return {
        "anchor_sizes": sizes,
        "aspect_ratios": ratios,
        "before": float((best >= 0.7).mean()),
        "after": float((after >= 0.7).mean()),
        "before_03": float((best >= 0.3).mean()),
        "after_03": float((after >= 0.3).mean()),
        "anchors_per_location": [gen.num_anchors_per_location()[0], new_gen.num_anchors_per_location()[0]],
        "coverage": {
            k: {
                "before_07": b["0.7"],
                "after_07": after_table[k]["0.7"],
                "before_03": b["0.3"],
                "after_03": after_table[k]["0.3"],
                "n": b["n"],
            }
            for k, b in before_table.items()
            if k != "all" and b["n"]
        },
    }


# -- plot and command line ----------------------------------------------------------------------------
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # matplotlib picks the format from the suffix
PLOT_CLASSES = 12  # classes drawn in their own colour (the most frequent); the rest as one "other"


def _class_groups(cats: np.ndarray, names: Dict[int, str]) -> List[Tuple[str, np.ndarray]]:
    """(legend label, box mask) per class with boxes: the most frequent in their own colour, the tail as one."""
    present = sorted({int(c) for c in cats}, key=lambda c: (-int((cats == c).sum()), c))
    groups = [(names.get(c, str(c)), cats == c) for c in sorted(present[:PLOT_CLASSES])]  # in category order
    rest = present[PLOT_CLASSES:]
    if len(rest) == 1:
        groups.append((names.get(rest[0], str(rest[0])), cats == rest[0]))
    elif rest:
        groups.append((f"other ({len(rest)} classes)", np.isin(cats, rest)))
    return groups


def report_figure(xyxy: np.ndarray, best: np.ndarray, cats: np.ndarray, names: Dict[int, str]):
    """The sizes histogram (stacked by class) and the coverage scatter (coloured by class), with legends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = np.sqrt(np.maximum((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]), 1e-6))
    groups = _class_groups(cats, names)
    colors = [plt.get_cmap("tab20" if len(groups) > 10 else "tab10")(i) for i in range(len(groups))]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    bins = np.geomspace(max(side.min(), 1), side.max() + 1, 40)
    axes[0].hist([side[m] for _, m in groups], bins=bins, stacked=True, color=colors, label=[n for n, _ in groups])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("object size after resize, sqrt(area) px")
    axes[0].set_ylabel("boxes")
    axes[0].set_title("object sizes, stacked by class")
    axes[0].legend(title="class", fontsize="small")
    for (name, m), color in zip(groups, colors):
        axes[1].scatter(side[m], best[m], s=4, alpha=0.5, color=color, label=name)
    # Black and grey: the class colours are the tab palettes'.
    axes[1].axhline(0.7, color="black", ls="--", lw=1, label="RPN foreground (0.7)")
    axes[1].axhline(0.3, color="grey", ls=":", lw=1, label="RPN background (0.3)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("object size after resize, sqrt(area) px")
    axes[1].set_ylabel("best IoU with any anchor")
    axes[1].set_title("anchor coverage, by class")
    axes[1].legend(fontsize="small", markerscale=3)
    fig.tight_layout()
    return fig


def plot_report(
    xyxy: np.ndarray,
    best: np.ndarray,
    path: str,
    cats: Optional[np.ndarray] = None,
    names: Optional[Dict[int, str]] = None,
) -> str:
    """Write :func:`report_figure` to ``path`` (checked by :func:`check_plot_path`); returns the path."""
    import matplotlib.pyplot as plt

    cats = np.zeros(len(xyxy), dtype=np.int64) if cats is None else cats
    fig = report_figure(xyxy, best, cats, names if names is not None else {0: "objects"})
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def check_plot_path(path: str) -> List[str]:
    """One-line ConfigErrors for a --plot path that cannot be written; returns the folders to create."""
    from train_config import ConfigError

    if os.path.isdir(path):
        raise ConfigError(f"--plot {path}: is a folder; give a file name, e.g. {os.path.join(path, 'report.png')}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PLOT_SUFFIXES:
        raise ConfigError(
            f"--plot {path}: the file name must end in one of {', '.join(PLOT_SUFFIXES)} (it sets the image format)"
        )
    missing, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--plot {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--plot {path}: {parent} is not writable")
    return missing[::-1]


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="references/analyze_data.py",
        description="The data and anchor report, from the training annotations alone (no image is decoded).",
        epilog="Every other flag (--config, --model, --dataset, --data-path, --train-ann, ...) is "
        "references/train.py's (python references/train.py --help lists them); of the data files, only the "
        "training annotations are read.",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help=f"also write the object sizes and the anchor coverage, coloured by class ({', '.join(PLOT_SUFFIXES)}); "
        "missing folders are created",
    )
    p.add_argument(
        "--write-config",
        metavar="FILE.yaml",
        default=None,
        help="write the config the report ran with (--config and flags), with all its advice merged in, as a "
        "config for train.py --config FILE.yaml",
    )
    return p


def check_config_path(path: str) -> None:
    """--write-config FILE: a one-line ConfigError when it cannot be written (before any data is read)."""
    from train_config import ConfigError

    if os.path.isdir(path):
        raise ConfigError(
            f"--write-config {path}: is a folder; give a file name, e.g. {os.path.join(path, 'advised.yaml')}"
        )
    if not path.lower().endswith((".yaml", ".yml")):
        raise ConfigError(f"--write-config {path}: the file name must end in .yaml or .yml")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--write-config {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--write-config {path}: {parent} is not writable")


def write_advised_config(cfg: TrainConfig, advice: Dict[str, Any], path: str) -> str:
    """The config with the advice merged in (validated as train.py validates it), written atomically."""
    from train_config import dump, finalize, flatten
    from training_checkpoint import atomic_write_text

    changes = flatten(advice)
    advised = cfg.replace(changes, source="the data report's advice")
    advised, loss_cfg = finalize(advised.to_dict(), source="the data report's advice", reads=("train_ann",))
    keys = ", ".join(changes) or "none"
    head = f"# the data report's advice (analyze_data.py --write-config), merged into the config it ran with: {keys}\n"
    atomic_write_text(head + dump(advised, loss_cfg), path)
    return keys


def _read_annotations(path: Optional[str]) -> Dict[str, Any]:
    import json

    from checks import DataError
    from train_config import ConfigError

    if not path or not os.path.isfile(path):
        raise ConfigError(f"the training annotations file is not found: {path} (--train-ann / --data-path)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a COCO JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DataError(f"{path}: a COCO file needs the lists 'images', 'annotations' and 'categories'")
    for a in data["annotations"]:  # the report reads every box: one without a usable one is named here
        box = a.get("bbox") if isinstance(a, dict) else None
        if not isinstance(box, list) or len(box) != 4 or not _finite_numbers(box):
            where = f"annotation {a.get('id')} (image {a.get('image_id')})" if isinstance(a, dict) else repr(a)[:40]
            raise DataError(f"{path}: {where}: bbox {box!r} is not 4 numbers [x, y, width, height]")
    return data


def _finite_numbers(values: List[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)


def main(argv: Optional[List[str]] = None) -> int:
    from models import build_model, set_anchors
    from run_data import dataset_files
    from train_config import dump, resolve

    args, rest = build_parser().parse_known_args(argv)
    new_dirs = check_plot_path(args.plot) if args.plot else []  # before the data pass, not after
    if args.write_config:
        check_config_path(args.write_config)
    cfg, loss_cfg, print_only = resolve(rest, reads=("train_ann",))
    if print_only:
        print(dump(cfg, loss_cfg), end="")
        return 0
    m = cfg.model
    files = dataset_files(cfg)
    data = _read_annotations(files["train_ann"])
    # The training script's labels and class count: COCO's own ids (91 classes), else contiguous ones.
    by_id = files["label_mode"] == "category_id"
    label_to_cat = {c["id"]: c["id"] for c in data["categories"]} if by_id else None
    coco_classes = {"coco": 91, "coco_kp": 2}.get(cfg.data.dataset)
    num_classes = m.num_classes or coco_classes or len(data["categories"]) + 1
    # torchvision's own model (stock), no weights: only its anchors and input sizes are read.
    model, _ = build_model(name=m.name, num_classes=num_classes, stock=True, kwargs=m.kwargs)
    set_anchors(model, m.anchor_sizes, m.aspect_ratios)
    report = data_report(None, model, label_to_cat=label_to_cat, dataset=data, cfg=cfg)
    print(report.text())
    if args.write_config:
        keys = write_advised_config(cfg, report.config, args.write_config)
        print(
            f"wrote {args.write_config}: the config with the advice ({keys}); train with --config {args.write_config}"
        )
    if args.plot:
        geo = AnchorGeometry(model)
        xyxy, cats, padded = resized_boxes(data, geo)
        if len(xyxy) == 0:
            print(f"--plot {args.plot}: not written, the training annotations hold no boxes")
            return 0
        for d in new_dirs:
            os.makedirs(d, exist_ok=True)
        names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        written = plot_report(xyxy, coverage(xyxy, padded, geo), args.plot, cats, names)
        print("wrote", written + (f" (created the folder {new_dirs[-1]})" if new_dirs else ""))
    return 0


if __name__ == "__main__":
    from errors import run_cli

    sys.exit(run_cli(main))
