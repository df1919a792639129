r"""The data and anchor report: from the annotation file alone, before step 1.

Objects per class and the imbalance, empty images, object sizes after the model's own resize, and
anchor coverage: for every ground-truth box, the best IoU with the anchors the model really uses
(its AnchorGenerator, at the real padded input size and feature-map strides), as the fraction
reaching the RPN's foreground threshold (0.7) and 0.3, per size bucket and per class. When
coverage is poor it proposes anchor sizes and aspect ratios (k-means on the box scales, quantiles
of the aspect ratios, as MMDetection's anchor optimizer reasons) and the YAML that sets them, with
the coverage they would give.

    python references/analyze_data.py --config references/configs/shapes.yaml [--plot report.png]

Takes the training script's flags and config; reads only the annotation JSON (no image is decoded).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

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


def _score(per_level: List[np.ndarray]) -> float:
    # Boxes reaching 0.7 get real RPN positives; boxes under 0.3 only the low-quality match: both count.
    best = np.max(per_level, axis=0)
    return float((best >= 0.7).mean() + (best >= 0.3).mean())


def suggest_anchors(
    xyxy: np.ndarray,
    padded: np.ndarray,
    geo: AnchorGeometry,
    current: Sequence[Sequence[float]],
    n_ratios: int,
    sample: int = 20000,
    seed: int = 0,
) -> Tuple[List[List[int]], List[List[float]]]:
    """One anchor size per feature map and ``n_ratios`` aspect ratios that maximise coverage.

    Ratios: quantiles of the boxes' h / w. Sizes: coordinate ascent, level by level, over sizes
    4..1024 px on that level's real anchor grid (a size that suits the boxes but not the level's
    stride gains nothing), non-decreasing with the stride, scoring the fractions of boxes that
    reach 0.7 and 0.3. MMDetection's anchor optimizer maximises the boxes' IoU with the anchors
    the same way, by search.
    """
    rng = np.random.default_rng(seed)
    if len(xyxy) > sample:
        keep = rng.choice(len(xyxy), sample, replace=False)
        xyxy, padded = xyxy[keep], padded[keep]
    w = np.maximum(xyxy[:, 2] - xyxy[:, 0], 1e-3)
    h = np.maximum(xyxy[:, 3] - xyxy[:, 1], 1e-3)
    q = np.quantile(h / w, np.linspace(0.15, 0.85, n_ratios)) if n_ratios > 1 else [float(np.median(h / w))]
    ratios = [round(float(r), 2) for r in q]
    keys, inverse = np.unique(padded, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sizes = [float(np.exp(np.mean(np.log(s)))) for s in current]
    per_level = [_level_best(xyxy, keys, inverse, geo, i, cell_anchors(s, ratios)) for i, s in enumerate(sizes)]
    for _ in range(2):
        for level in range(len(sizes)):
            best_score = _score(per_level)
            # Sizes stay non-decreasing with the stride, as FPN's levels are meant.
            lo = sizes[level - 1] if level > 0 else 0.0
            hi = sizes[level + 1] if level + 1 < len(sizes) else math.inf
            for size in CANDIDATE_SIZES[(CANDIDATE_SIZES >= lo) & (CANDIDATE_SIZES <= hi)]:
                trial = _level_best(xyxy, keys, inverse, geo, level, cell_anchors(size, ratios))
                score = _score(per_level[:level] + [trial] + per_level[level + 1 :])
                if score > best_score + 1e-12:
                    best_score, sizes[level], per_level[level] = score, float(size), trial
    return [[int(round(s))] for s in sizes], [ratios]


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
        lines += [f"  WARNING: {w}" for w in self.warnings]
        if self.advice:
            a = self.advice
            lines.append(
                f"  suggested anchors raise coverage >= 0.7 from {a['before']:.1%} to {a['after']:.1%} "
                f"(>= 0.3: {a['before_03']:.1%} -> {a['after_03']:.1%}); in the YAML:"
            )
            lines.append(
                f"    model:\n      anchor_sizes: {a['anchor_sizes']}\n      aspect_ratios: {a['aspect_ratios']}"
            )
        return "\n".join(lines)


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
) -> DataReport:
    """The report for a ``pycocotools.COCO`` (or a raw COCO dict) and the model that will train on it."""
    data = dataset if dataset is not None else coco.dataset
    cat_names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
    geo = AnchorGeometry(model)
    xyxy, cats, padded = resized_boxes(data, geo)
    best = coverage(xyxy, padded, geo)
    counts = Counter(cats.tolist())
    objects = {cat_names[c]: counts.get(c, 0) for c in sorted(cat_names)}
    nonzero = [v for v in objects.values() if v]
    with_objects = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)}
    side = np.sqrt(np.maximum((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]), 0))
    cov = {"all": _fractions(best)}
    for name, lo, hi in BUCKETS:
        cov[name] = _fractions(best[(side >= lo) & (side < hi)])
    for c in sorted(cat_names):
        cov[f"class {cat_names[c]}"] = _fractions(best[cats == c])
    gen = model.rpn.anchor_generator
    report = DataReport(
        images=len(data["images"]),
        empty_fraction=1 - len(with_objects) / max(len(data["images"]), 1),
        objects=objects,
        imbalance=max(nonzero) / min(nonzero) if nonzero else float("nan"),
        size_quantiles={f"p{q}": float(np.percentile(side, q)) if len(side) else float("nan") for q in (5, 50, 95)},
        coverage=cov,
        anchors={"sizes": [list(s) for s in gen.sizes], "aspect_ratios": [list(r) for r in gen.aspect_ratios]},
    )
    _warn_and_advise(report, xyxy, padded, best, model, geo)
    return report


def _warn_and_advise(report: DataReport, xyxy, padded, best, model, geo: AnchorGeometry) -> None:
    poor = [k for k, c in report.coverage.items() if _is_poor(k, c, report.coverage["all"])]
    for k in poor:
        c = report.coverage[k]
        report.warnings.append(
            f"{k}: only {c['0.7']:.0%} of {int(c['n'])} boxes reach IoU 0.7 with any anchor "
            f"({c['0.3']:.0%} reach 0.3): the RPN sees few positives for them"
        )
    if imb := report.imbalance:
        if math.isfinite(imb) and imb >= 10:
            rare = min((k for k, v in report.objects.items() if v), key=lambda k: report.objects[k])
            report.warnings.append(
                f"class imbalance {imb:.0f}:1 (rarest: {rare!r}, {report.objects[rare]} objects): "
                f"watch its per-class AP; model.roi_head.class_weight can raise its pull"
            )
    if not poor or len(xyxy) == 0:
        return
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    gen = model.rpn.anchor_generator
    per_loc = gen.num_anchors_per_location()[0]
    sizes, ratios = suggest_anchors(xyxy, padded, geo, gen.sizes, len(gen.aspect_ratios[0]))
    new_gen = AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(ratios[0]) for _ in sizes))
    after = coverage(xyxy, padded, geo.with_generator(new_gen))
    gain_07 = (after >= 0.7).mean() - (best >= 0.7).mean()
    gain_03 = (after >= 0.3).mean() - (best >= 0.3).mean()
    if gain_07 + gain_03 > 0.02 and gain_03 > -0.01 and gain_07 > -0.01:  # better, and worse at neither threshold
        report.advice = {
            "anchor_sizes": sizes,
            "aspect_ratios": ratios,
            "before": float((best >= 0.7).mean()),
            "after": float((after >= 0.7).mean()),
            "before_03": float((best >= 0.3).mean()),
            "after_03": float((after >= 0.3).mean()),
            "anchors_per_location": [per_loc, new_gen.num_anchors_per_location()[0]],
        }


# -- plot and command line ----------------------------------------------------------------------------
def plot_report(xyxy: np.ndarray, best: np.ndarray, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = np.sqrt(np.maximum((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]), 1e-6))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(side, bins=np.geomspace(max(side.min(), 1), side.max() + 1, 40))
    axes[0].set_xscale("log")
    axes[0].set_xlabel("object size after resize, sqrt(area) px")
    axes[0].set_title("object sizes")
    axes[1].scatter(side, best, s=3, alpha=0.4)
    axes[1].axhline(0.7, color="C1", lw=1, label="RPN foreground (0.7)")
    axes[1].axhline(0.3, color="C2", lw=1, label="RPN background (0.3)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("object size after resize, sqrt(area) px")
    axes[1].set_ylabel("best IoU with any anchor")
    axes[1].legend()
    axes[1].set_title("anchor coverage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    import json

    import train
    from models import build_model, set_anchors
    from train_config import resolve

    argv = list(sys.argv[1:] if argv is None else argv)
    plot = None
    if "--plot" in argv:
        k = argv.index("--plot")
        plot = argv[k + 1]
        del argv[k : k + 2]
    cfg, loss_cfg, _ = resolve(argv)
    m = cfg["model"]
    files = train.dataset_files(cfg)
    with open(files["train_ann"], encoding="utf-8") as f:
        data = json.load(f)
    num_classes = m["num_classes"] or len(data["categories"]) + 1
    model, _ = build_model(m["name"], num_classes, None, None, None, None, None, True, m["kwargs"])
    set_anchors(model, m["anchor_sizes"], m["aspect_ratios"])
    report = data_report(None, model, dataset=data)
    print(report.text())
    if plot:
        geo = AnchorGeometry(model)
        xyxy, _, padded = resized_boxes(data, geo)
        print("wrote", plot_report(xyxy, coverage(xyxy, padded, geo), plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
