r"""The data and anchor report's computations: from the annotation file alone, before step 1.

Objects per class and the imbalance, empty images, object sizes after the model's own resize, and
anchor coverage (anchor_coverage.py): for every ground-truth box, the best IoU with the anchors the model
really uses, as the fraction reaching the RPN matcher's foreground threshold and its background
threshold (read from the model's ``rpn.proposal_matcher``: torchvision's 0.7 / 0.3 unless the config sets
others), per size bucket and per class. When coverage is poor it proposes the anchor setting that
raises coverage while no size bucket or class loses more than a point at either threshold (or says in
one line that no setting tried does). It judges the input
scale (scale.py) and, when the objects are too small, searches the anchors at the input size the cure
gives. From a 5:1 class imbalance on it gives the repeat-factor threshold and a class_weight list made
safe (tempered; none while the scale is the problem: diagnostics.py). All of it as one config
(:func:`advice_config`).

Pure computations: a COCO dict and a model in, a :class:`DataReport` out; ``analyze_data.py`` is the
command line around them and the training script's data report calls :func:`data_report` itself.
Only the RPN's thresholds enter a figure here: the report measures anchors against boxes, and the RoI
head's matcher (``roi_heads.proposal_matcher``) judges proposals, which exist only once the RPN runs.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anchor_coverage import (  # noqa: E402
    MAX_DROP,
    MIN_GAIN,
    AnchorGeometry,
    Measured,
    Thresholds,
    lowered_groups,
    measure,
    remeasure,
    resized_boxes,
    suggest_anchors,
)
from data import image_classes, repeat_factors, suggest_repeat_threshold  # noqa: E402
from scale import (  # noqa: E402
    ScaleFinding,
    finding_from_boxes,
    model_yardsticks,
    tile_view,
    withhold_under_augmentation,
)

if TYPE_CHECKING:
    from train_config import TrainConfig


# -- the report -------------------------------------------------------------------------------------
@dataclass
class DataReport:
    images: int
    empty_fraction: float
    objects: Dict[str, int]
    imbalance: float
    size_quantiles: Dict[str, float]
    coverage: Dict[str, Dict[str, float]]  # "all", "small"/"medium"/"large", "class <name>" -> {"fg", "bg", "n"}
    anchors: Dict[str, Any]
    advice: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)
    repeat_factors: Optional[Dict[str, Any]] = None  # the suggested repeat-factor sampling (repeat_factor_advice)
    rare_advice: Optional[Dict[str, Any]] = None  # the imbalance cure: class_weight list, repeat threshold
    anchor_note: Optional[str] = None  # why no anchors are suggested although coverage is poor
    scale: Optional[Dict[str, Any]] = None  # scale.ScaleFinding.to_dict(): the input-scale rule
    config: Dict[str, Any] = field(default_factory=dict)  # all the advice as one config (advice_config)
    thresholds: Dict[str, Any] = field(default_factory=lambda: Thresholds().to_dict())  # the coverage's: Thresholds

    def to_dict(self) -> Dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "images",
                "empty_fraction",
                "objects",
                "imbalance",
                "size_quantiles",
                "thresholds",
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
        thr = Thresholds(**self.thresholds)
        lines = [
            f"data report: {self.images} images ({self.empty_fraction:.0%} without objects); objects per class: "
            + ", ".join(f"{k} {v}" for k, v in self.objects.items())
            + (f"; imbalance {self.imbalance:.1f}:1" if math.isfinite(self.imbalance) else ""),
            "  object size after resize, sqrt(area) px: "
            + ", ".join(f"{k} {v:.1f}" for k, v in self.size_quantiles.items()),
            f"  anchors: sizes {self.anchors['sizes']}, aspect ratios {self.anchors['aspect_ratios']}",
            f"  anchor coverage (best IoU >= {thr.fg:g} / >= {thr.bg:g}: {threshold_source(thr)}):",
        ]
        for key, c in self.coverage.items():
            if c["n"]:
                lines.append(f"    {key:<24} {c['fg']:6.1%} / {c['bg']:6.1%}   ({int(c['n'])} boxes)")
        if self.scale and not self.scale["fires"]:
            lines.append("  input scale: " + ScaleFinding(**self.scale).text())
        lines += [f"  WARNING: {w}" for w in self.warnings]
        if self.repeat_factors and self.repeat_factors["threshold"] is not None:
            lines.append(_repeat_line(self.repeat_factors))
        if self.advice:
            lines += _anchor_advice_lines(self.advice, thr, bool(self.scale and self.scale["fires"]))
        if self.anchor_note:
            lines.append(f"  anchor advice: {self.anchor_note}")
        lines += advice_lines(self.config)
        return "\n".join(lines)


def threshold_source(thr: Thresholds) -> str:
    """Where the coverage's thresholds come from, and what the low-quality rule does to a box under fg."""
    if thr.low_quality:
        return "the model's rpn.proposal_matcher, allow_low_quality_matches on"
    return f"the model's rpn.proposal_matcher, allow_low_quality_matches off: a box under {thr.fg:g} gets no positive"


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


def _anchor_advice_lines(a: Dict[str, Any], thr: Thresholds, scaled: bool = False) -> List[str]:
    at = " at the advised input scale" if scaled else ""
    lines = [
        f"  suggested anchors (model.anchor_sizes {a['anchor_sizes']}, model.aspect_ratios {a['aspect_ratios']}) "
        f"raise coverage >= {thr.fg:g}{at} from {a['before']:.1%} to {a['after']:.1%} "
        f"(>= {thr.bg:g}: {a['before_bg']:.1%} -> {a['after_bg']:.1%}) and lower no size bucket or class by more "
        f"than {MAX_DROP * 100:g} point at either",
        f"  coverage{at}, current anchors -> with them (>= {thr.fg:g} / >= {thr.bg:g}):",
    ]
    for key, c in a["coverage"].items():
        lines.append(
            f"    {key:<24} {c['before_fg']:6.1%} -> {c['after_fg']:6.1%} / {c['before_bg']:6.1%} -> "
            f"{c['after_bg']:6.1%}   ({int(c['n'])} boxes)"
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


# With one anchor size per octave a box between two sizes reaches IoU ~0.7 at best, so about half of
# the boxes reaching the foreground threshold (torchvision's 0.7) is normal. Poor is: boxes that do not
# even reach the background threshold (they get only the RPN's low-quality match), overall coverage
# under 0.2, or a size bucket / class at under half the overall rate.
POOR_BG, POOR_FG, RELATIVE = 0.9, 0.2, 0.5


def _is_poor(key: str, c: Dict[str, float], overall: Dict[str, float]) -> bool:
    if c["n"] < 10:
        return False
    if key == "all":
        return c["bg"] < POOR_BG or c["fg"] < POOR_FG
    # A size bucket or class: flagged when it is worse than the whole, not merely as poor.
    return (c["bg"] < POOR_BG and c["bg"] < overall["bg"] - 0.05) or c["fg"] < RELATIVE * overall["fg"]


def poor_groups(table: Dict[str, Dict[str, float]]) -> List[str]:
    return [k for k, c in table.items() if _is_poor(k, c, table["all"])]


def coverage_warnings(table: Dict[str, Dict[str, float]], thr: Thresholds) -> List[str]:
    """One warning per group whose coverage is poor."""
    tail = "" if thr.low_quality else f" (allow_low_quality_matches is off: a box under {thr.fg:g} gets none)"
    return [
        f"{k}: only {table[k]['fg']:.0%} of {int(table[k]['n'])} boxes reach IoU {thr.fg:g} with any anchor "
        f"({table[k]['bg']:.0%} reach {thr.bg:g}): the RPN sees few positives for them{tail}"
        for k in poor_groups(table)
    ]


def data_report(
    coco,
    model,
    names: Optional[List[str]] = None,
    label_to_cat: Optional[Dict[int, int]] = None,
    dataset: Optional[Dict[str, Any]] = None,
    cfg: Optional[TrainConfig] = None,
) -> DataReport:
    """The report for a ``pycocotools.COCO`` (or a raw COCO dict ``dataset``) and the model that will train on it.

    ``label_to_cat``: the training labels' category ids (default: the sorted ids as labels 1..K);
    ``cfg``: the training config, so that no advice repeats a setting it already has. ``names`` is
    not read (the category names come from the file); it stays for the callers that pass it.
    """
    data = model_view(dataset if dataset is not None else coco.dataset, cfg)
    cat_names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
    thr = Thresholds.of(model)
    geo = AnchorGeometry(model)
    found = measure(data, geo, cat_names, thr)
    counts = Counter(found.boxes.labels.tolist())
    objects = {cat_names[c]: counts.get(c, 0) for c in sorted(cat_names)}
    nonzero = [v for v in objects.values() if v]
    with_objects = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)}
    side = found.boxes.sides
    gen = model.rpn.anchor_generator
    report = DataReport(
        images=len(data["images"]),
        empty_fraction=1 - len(with_objects) / max(len(data["images"]), 1),
        objects=objects,
        imbalance=max(nonzero) / min(nonzero) if nonzero else float("nan"),
        size_quantiles={f"p{q}": float(np.percentile(side, q)) if len(side) else float("nan") for q in (5, 50, 95)},
        coverage=found.table,
        anchors={"sizes": [list(s) for s in gen.sizes], "aspect_ratios": [list(r) for r in gen.aspect_ratios]},
        repeat_factors=repeat_factor_advice(data, cat_names),
        thresholds=thr.to_dict(),
    )
    target = found  # the boxes the anchors are searched on: at the input size the scale cure gives, if any
    if len(found.boxes):
        finding = finding_from_boxes(model_yardsticks(model, geo, thr.fg), found.boxes)
        finding = withhold_under_augmentation(finding, cfg.data.augmentation if cfg is not None else None)
        report.scale = finding.to_dict()
        if finding.fires:
            report.warnings.append("input scale: " + finding.text())
            if not finding.withheld:
                target = _at_advised_scale(finding, data, geo, thr)
    report.warnings += coverage_warnings(found.table, thr)
    counts_per_label = label_counts(found.boxes.labels, cat_names, label_to_cat, _model_num_classes(model))
    _imbalance_advice(report, counts_per_label, cfg)
    if poor_groups(target.table) and len(target.boxes):
        _anchor_advice(report, target, gen, thr)
    report.config = advice_config(report, cfg)
    return report


def model_view(data: Dict[str, Any], cfg: Optional[TrainConfig]) -> Dict[str, Any]:
    """A COCO dict as the model trains on it: under data.tile_size its tiles (scale.tile_view), so that the
    sizes and anchor grids the report measures are theirs."""
    if cfg is not None and cfg.data.tile_size:
        return tile_view(data, cfg.data.tile_size, cfg.data.tile_overlap)
    return data


def scale_finding(
    model, data: Dict[str, Any], tile: Optional[Sequence[int]] = None, augmentation: Optional[str] = None
) -> Optional[ScaleFinding]:
    """The scale rule (scale.py) for ``model`` on a COCO dict's boxes; ``tile``: (tile_size, tile_overlap)
    when the config tiles; ``augmentation``: data.augmentation (a policy that sets the input size withholds
    the cure). None without boxes. The collapse diagnostics call it."""
    if tile:
        data = tile_view(data, int(tile[0]), int(tile[1]))
    geo = AnchorGeometry(model)
    boxes = resized_boxes(data, geo)
    if not len(boxes):
        return None
    sticks = model_yardsticks(model, geo, Thresholds.of(model).fg)
    return withhold_under_augmentation(finding_from_boxes(sticks, boxes), augmentation)


def _at_advised_scale(finding: ScaleFinding, data: Dict[str, Any], geo: AnchorGeometry, thr: Thresholds) -> Measured:
    """The boxes, their coverage, groups and table at the input the scale cure gives."""
    if finding.tile_size is not None:
        data = tile_view(data, finding.tile_size, finding.tile_overlap)
    else:
        geo = geo.with_sizes(finding.new_min_size, finding.new_max_size)
    return measure(data, geo, {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}, thr)


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


def _anchor_advice(report: DataReport, found: Measured, gen, thr: Thresholds) -> None:
    """Suggest anchors only when a setting raises coverage by MIN_GAIN and lowers no group by more
    than MAX_DROP at either threshold on the whole set; else say in one line why none is suggested."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    tried = suggest_anchors(found, gen, thr)
    rejected = []
    for sizes, ratios, _ in tried:
        new_gen = AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(ratios[0]) for _ in sizes))
        after = remeasure(found.boxes, found.geo.with_generator(new_gen), found.groups, thr)
        lowered = lowered_groups(found.table, after.table, thr)
        gain = sum(float((after.best >= t).mean() - (found.best >= t).mean()) for _, t in thr.pairs())
        if not lowered and gain >= MIN_GAIN:
            report.advice = {"anchor_sizes": sizes, "aspect_ratios": ratios, **_before_after(found, after)}
            return
        rejected.append((gain, f"anchor_sizes {sizes}, aspect_ratios {ratios}", lowered))
    # Name a setting that lowers a group if one was tried (the conflict), else the best gain.
    gain, what, lowered = max(rejected, key=lambda r: (bool(r[2]), r[0]))
    why = f"{what} would lower {'; '.join(lowered[:3])}" if lowered else f"the best gains {gain:.1%}"
    report.anchor_note = (
        f"none of the {len(tried)} anchor settings tried raises coverage (>= {thr.fg:g} plus >= {thr.bg:g}) by "
        f"{MIN_GAIN:.0%} without lowering a size bucket or class by more than {MAX_DROP * 100:g} point at IoU "
        f"{thr.fg:g} or {thr.bg:g}: keep the current anchors ({why})"
    )


def _before_after(before: Measured, after: Measured) -> Dict[str, Any]:
    """The advice's figures: overall and per group coverage with the current anchors and with the advised."""
    b, a = before.table["all"], after.table["all"]
    return {
        "before": b["fg"],
        "after": a["fg"],
        "before_bg": b["bg"],
        "after_bg": a["bg"],
        "anchors_per_location": [before.geo.anchors_per_location, after.geo.anchors_per_location],
        "coverage": {
            k: {
                "before_fg": c["fg"],
                "after_fg": after.table[k]["fg"],
                "before_bg": c["bg"],
                "after_bg": after.table[k]["bg"],
                "n": c["n"],
            }
            for k, c in before.table.items()
            if k != "all" and c["n"]
        },
    }
