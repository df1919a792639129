"""Why did detections collapse? Turns evaluation and training numbers into named causes.

Each cause is a small function that returns a sentence with its numbers and the next lever to
pull given the current config (never advice that is already applied), or None.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from train_config import TrainConfig

# torchvision's reference lr (0.02) is for 16 images per step (8 GPUs x 2): the linear-scaling rule.
REFERENCE_LR, REFERENCE_BATCH = 0.02, 16


def score_summary(
    max_scores: List[float], kept_counts: List[int], all_scores: List[float], thresh: float
) -> Dict[str, Any]:
    """Detections per image above ``thresh`` and the score distribution of one evaluation."""
    n = max(len(kept_counts), 1)
    scores = np.asarray(all_scores, dtype=np.float64)
    q = np.quantile(scores, [0.5, 0.9, 0.99]).tolist() if scores.size else [0.0, 0.0, 0.0]
    return {
        "dets_per_image": float(sum(kept_counts) / n),
        "images_without_dets": float(sum(1 for c in kept_counts if c == 0) / n),
        "score_p50": q[0],
        "score_p90": q[1],
        "score_p99": q[2],
        "max_score_mean": float(np.mean(max_scores)) if max_scores else 0.0,
        "max_score": float(max(max_scores)) if max_scores else 0.0,
        "score_thresh": thresh,
        "score_hist": np.histogram(scores, bins=10, range=(0.0, 1.0))[0].tolist(),
    }


# -- per class ------------------------------------------------------------------------------------
def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of [N, 4] and [M, 4] xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _xyxy(boxes: List[List[float]]) -> np.ndarray:
    a = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    a[:, 2:] += a[:, :2]
    return a


def matched_gt(
    gt_boxes: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray, iou_thresh: float = 0.5
) -> np.ndarray:
    """Which ground-truth boxes a detection matches (greedy by score, IoU >= ``iou_thresh``, one each)."""
    hit = np.zeros(len(gt_boxes), dtype=bool)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return hit
    iou = _box_iou(det_boxes[np.argsort(-det_scores)], gt_boxes)
    for row in iou:
        row = np.where(hit, -1.0, row)
        j = int(row.argmax())
        if row[j] >= iou_thresh:
            hit[j] = True
    return hit


def _ap_per_category(ev, k: int) -> tuple:
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; -1 = no gt.
    p = ev.eval["precision"][:, :, k, 0, -1]
    ap = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    p50 = p[0]
    ap50 = float(p50[p50 > -1].mean()) if (p50 > -1).any() else float("nan")
    return ap, ap50


def per_class_summary(
    coco_gt,
    img_ids: List[int],
    bbox_dets: List[Dict[str, Any]],
    evals: Dict[str, Any],
    label_to_cat: Dict[int, int],
    class_names: Optional[List[str]] = None,
) -> Dict[str, Dict[str, float]]:
    """By category name: AP and AP50 per evaluated IoU type, ground-truth count, detections per
    image above the score threshold (``bbox_dets`` are already filtered) and recall at it (IoU 0.5)."""
    cats = sorted(label_to_cat.values())
    names = {c: coco_gt.cats.get(c, {}).get("name", str(c)) for c in cats}
    if class_names:  # labels 1..K in order
        names.update({label_to_cat[i + 1]: n for i, n in enumerate(class_names) if i + 1 in label_to_cat})
    ids = set(img_ids)
    gt_by: Dict[tuple, List] = defaultdict(list)  # (category, image) -> boxes; one pass each
    for a in coco_gt.dataset["annotations"]:
        if a["image_id"] in ids and not a.get("iscrowd", 0):
            gt_by[(a["category_id"], a["image_id"])].append(a["bbox"])
    det_by: Dict[tuple, List] = defaultdict(list)
    for d in bbox_dets:
        det_by[(d["category_id"], d["image_id"])].append(d)
    out: Dict[str, Dict[str, float]] = {}
    for cat in cats:
        n_gt = hits = 0
        for (c, iid), boxes in gt_by.items():
            if c != cat:
                continue
            n_gt += len(boxes)
            dd = det_by.get((c, iid), [])
            hits += int(
                matched_gt(_xyxy(boxes), _xyxy([d["bbox"] for d in dd]), np.asarray([d["score"] for d in dd])).sum()
            )
        n_det = sum(len(v) for (c, _), v in det_by.items() if c == cat)
        row = {
            "gt": float(n_gt),
            "dets_per_image": n_det / max(len(ids), 1),
            "recall": hits / n_gt if n_gt else float("nan"),
        }
        for iou, ev in evals.items():
            k = list(ev.params.catIds).index(cat) if cat in ev.params.catIds else None
            ap, ap50 = _ap_per_category(ev, k) if k is not None else (float("nan"), float("nan"))
            row[f"{iou}_AP"], row[f"{iou}_AP50"] = ap, ap50
        out[names[cat]] = row
    return out


def per_class_table(per_class: Dict[str, Dict[str, float]], thresh: float) -> str:
    """A compact fixed-width table of :func:`per_class_summary`."""
    if not per_class:
        return ""
    ap_cols = [c for c in next(iter(per_class.values())) if c.endswith("_AP") or c.endswith("_AP50")]
    width = max(8, *(len(n) for n in per_class))
    head = f"{'class':<{width}} {'gt':>6} {'dets/img':>8} {'recall@' + format(thresh, 'g'):>11} " + " ".join(
        f"{c:>10}" for c in ap_cols
    )
    lines = [head]
    for name, r in per_class.items():
        aps = " ".join(f"{r[c]:>10.3f}" if math.isfinite(r[c]) else f"{'-':>10}" for c in ap_cols)
        rec = f"{r['recall']:>11.3f}" if math.isfinite(r["recall"]) else f"{'-':>11}"
        lines.append(f"{name:<{width}} {int(r['gt']):>6} {r['dets_per_image']:>8.2f} {rec} {aps}")
    return "\n".join(lines)


# -- the learning rate ------------------------------------------------------------------------------
def linear_scaling_lr(images_per_step: int, opt: str = "sgd") -> Optional[float]:
    """The lr of the linear-scaling rule, or None for an optimizer it does not hold for: the rule (0.02
    for 16 images) is SGD's, and an AdamW lr of 1e-3 or 1e-4 is in another range."""
    if not opt.startswith("sgd"):
        return None
    return REFERENCE_LR * images_per_step / REFERENCE_BATCH


def lr_warning(lr: float, images_per_step: int, warmup_iters: int, opt: str = "sgd") -> Optional[str]:
    """A warning when an SGD lr exceeds the linear-scaling rule by more than 2x with no warmup."""
    ref = linear_scaling_lr(images_per_step, opt)
    if ref is None or warmup_iters > 0 or lr <= 2 * ref:
        return None
    return (
        f"lr {lr:g} is {lr / ref:.1f}x the linear-scaling rule for {images_per_step} images per step "
        f"({REFERENCE_LR:g} x {images_per_step}/{REFERENCE_BATCH} = {ref:g}) and there is no warmup: the most common "
        f"cause of a collapse. Use --lr {ref:g}, or training.auto_scale_lr: true, or --warmup-iters 1000"
    )


# -- the rare-class cure ----------------------------------------------------------------------------
# A class_weight list cuts the common class's share of the classifier's gradient. Pasted bare it
# lowered every class on sets whose rare classes the model could not yet resolve (the README's
# "class_weight: auto" row: the common class -0.13 AP with its weight at 0.15); the advice prints a
# list only with what makes it safe:
# * tempered: w_c ** tau, renormalised to a foreground mean of 1, with the largest tau in [0, 1]
#   that leaves no class under 1 / MAX_WEIGHT_CUT (the common class keeps at least half its weight);
# * never while the objects are too small for the model's input (the scale rule fires): weights
#   cannot rebalance classes the model cannot see, and they take the gradient of the one it learns.
MAX_WEIGHT_CUT = 2.0


def tempered_class_weights(weights: Sequence[float], max_cut: float = MAX_WEIGHT_CUT) -> tuple:
    """(background-first weights tempered as above, tau): ``weights[1:]`` ** tau over its mean."""
    fg = np.asarray(weights[1:], dtype=np.float64)

    def at(tau: float) -> np.ndarray:
        w = fg**tau
        return w / w.mean()

    if at(1.0).min() >= 1 / max_cut - 1e-12:
        return [float(weights[0]), *at(1.0).tolist()], 1.0
    lo, hi = 0.0, 1.0  # min(w) / mean(w) falls as tau grows: bisect for min(w) = 1 / max_cut
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid).min() >= 1 / max_cut else (lo, mid)
    return [float(weights[0]), *at(lo).tolist()], lo


def rare_class_cure(
    counts: Sequence[int],
    repeat_threshold: Optional[float],
    cfg: Optional[TrainConfig] = None,
    method: str = "effective_number",
    beta: Optional[float] = None,
    names: Optional[Sequence[str]] = None,
    scale_fires: bool = False,
) -> Dict[str, Any]:
    """The rare-class levers as values to paste, leaving out what ``cfg`` already sets.

    ``counts``: training objects per foreground label in label order (1..K); ``repeat_threshold``:
    data.suggest_repeat_threshold's value (None: no class needs repeating); ``scale_fires``: the
    scale rule (scale.py) found the objects too small. Returns the ``class_weight`` list
    (tv_lossfix.class_weights_from_counts tempered by :func:`tempered_class_weights`; None when
    already set, when it would not favour any class, or while ``scale_fires``, with the reason in
    ``withheld``), the ``repeat_factor_threshold`` (None likewise), the keys ``already`` set, and the
    ``yaml`` lines and one-line ``text`` that print them.
    """
    from tv_lossfix import class_weights_from_counts

    given = {
        "model.roi_head.class_weight": cfg.model.roi_head.get("class_weight") if cfg else None,
        "data.repeat_factor_threshold": cfg.data.repeat_factor_threshold if cfg else None,
    }
    already = [k for k, v in given.items() if v is not None]
    weights = class_weights_from_counts(list(counts), method, beta) if any(counts) else None
    if weights is not None and (max(weights[1:]) - min(weights[1:]) < 1e-6 or "model.roi_head.class_weight" in already):
        weights = None  # equal counts: nothing to rebalance
    withheld, tau = None, None
    if weights is not None and scale_fires:
        weights, withheld = None, "the objects are too small for the model's input: cure the scale first"
    if weights is not None:
        weights, tau = tempered_class_weights(weights)
    threshold = None if "data.repeat_factor_threshold" in already else repeat_threshold
    shown = [round(w, 3) for w in weights] if weights is not None else None
    origin = (
        f"{method}{f' (beta {0.999 if beta is None else beta:g})' if method == 'effective_number' else ''} "
        f"of {list(counts)} objects per class"
        + (
            f", tempered (power {tau:.2f}) so that no class is cut by more than {MAX_WEIGHT_CUT:g}x"
            if tau and tau < 1
            else ""
        )
    )
    yaml_lines, parts = [], []
    if shown is not None:
        yaml_lines += ["model:", "  roi_head:", f"    class_weight: {shown}  # {origin}"]
        parts.append(f"model.roi_head.class_weight: {shown} ({origin})")
    if threshold is not None:
        yaml_lines += ["data:", f"  repeat_factor_threshold: {threshold:g}"]
        parts.append(f"data.repeat_factor_threshold: {threshold:g}")
    return {
        "counts": list(counts),
        "method": method,
        "beta": beta,
        "class_weight": weights,
        "tempered_power": tau,
        "withheld": withheld,
        "repeat_factor_threshold": threshold,
        "already": already,
        # classes (by name, ``names`` in label order) with no training object: no weight or repeat helps them
        "untrained": [n for n, c in zip(names or (), counts) if c == 0],
        "yaml": yaml_lines,
        "text": "; ".join(parts),
    }


# -- collapse causes --------------------------------------------------------------------------------
def _cause_underconfident(current, train, cfg, cure: Optional[Dict[str, Any]] = None) -> Optional[str]:
    thresh = current["score_thresh"]
    if current["max_score"] >= thresh:
        return None
    roi = cfg.model.roi_head
    if roi.get("cls_pos_weight", 1.0) < 2:
        lever = "raise model.roi_head.cls_pos_weight to 2"
    elif not roi.get("class_weight"):
        values = cure["text"] if cure and cure["class_weight"] is not None else ""
        lever = f"cls_pos_weight is already {roi['cls_pos_weight']:g}: " + (
            f"rebalance the rare classes: {values}"
            if values
            else "set model.roi_head.class_weight for the rare classes"
        )
    else:
        lever = "positive and class weights are set: train longer, or lower model.kwargs.box_score_thresh to inspect"
    return (
        f"every score is under box_score_thresh={thresh:g} (highest {current['max_score']:.3f}): the classifier "
        f"is under-confident; {lever}"
    )


def _cause_few_positives(current, train, cfg) -> Optional[str]:
    pos = train.get("roi/pos_per_image")
    if pos is None or pos >= 4:
        return None
    roi = cfg.model.roi_head
    if roi.get("num") is not None or roi.get("pos_fraction") is not None:
        lever = (
            f"the config's sampler (model.roi_head num {roi.get('num', 'default')}, pos_fraction "
            f"{roi.get('pos_fraction', 'default')}) caps the positives: raise them"
        )
    else:
        lever = "check the data report's anchor coverage and the boxes/labels"
    return f"few positive RoIs per image ({pos:.1f} sampled): the classifier sees mostly background; {lever}"


def _sampler_set(cfg) -> bool:
    roi = cfg.model.roi_head
    return roi.get("num") is not None or roi.get("pos_fraction") is not None


def _cause_fg_prob(current, train, cfg) -> Optional[str]:
    fg = train.get("roi/fg_prob")
    if fg is None or fg >= 0.3:
        return None
    w = cfg.model.roi_head.get("cls_pos_weight", 1.0)
    lever = "raise model.roi_head.cls_pos_weight to 2" if w < 2 else f"cls_pos_weight is {w:g}: lower --lr"
    return f"mean probability of the true class on positive RoIs is {fg:.2f}: foreground is out-voted; {lever}"


def _cause_rpn(current, train, cfg) -> Optional[str]:
    rpn_pos = train.get("rpn/pos_per_image")
    if rpn_pos is None or rpn_pos >= 2:
        return None
    return (
        f"the RPN samples {rpn_pos:.1f} positive anchors per image: the anchors do not fit the objects, or boxes "
        f"are wrong; see the data report's anchor coverage and set model.anchor_sizes as it advises"
    )


def _cause_gradients(current, train, cfg) -> Optional[str]:
    gn, gmax = train.get("grad_norm"), train.get("grad_norm_max")
    clip = cfg.training.gradient_clip
    if gn is None or gmax is None:
        return None
    if clip.enabled:
        lever = (
            f"clipping is on at {clip.max_norm:g}: lower it to 10"
            if clip.max_norm > 10
            else f"clipping is on at {clip.max_norm:g}: lower --lr"
        )
    else:
        lever = "enable --clip-grad-norm 35"
    if gmax > 10 * max(gn, 1e-12):
        return f"gradient spikes: max grad_norm {gmax:.1f} vs mean {gn:.2f}; {lever}"
    if not clip.enabled and gn > 100:
        return f"large gradients (mean grad_norm {gn:.1f}) with no clipping; {lever}"
    return None


def _cause_skipped(current, train, cfg) -> Optional[str]:
    skipped = train.get("skipped_steps", 0)
    if not skipped:
        return None
    clip = cfg.training.gradient_clip
    lever = "lower --lr" if clip.enabled else "add --clip-grad-norm 35, or lower --lr"
    return f"{int(skipped)} steps were skipped for non-finite loss/gradients; {lever}"


def _cause_lr(current, train, cfg) -> Optional[str]:
    t = cfg.training
    ips = t.batch_size * int(train.get("world_size", 1))
    ref = linear_scaling_lr(ips, t.opt)
    if ref is None or t.lr <= 2 * ref:
        return None
    return (
        f"lr {t.lr:g} is {t.lr / ref:.1f}x the linear-scaling rule for {ips} images per step "
        f"({REFERENCE_LR:g} x {ips}/{REFERENCE_BATCH} = {ref:g}); use --lr {ref:g} or training.auto_scale_lr: true"
    )


def _cause_loss_rose(current, train, cfg, history) -> Optional[str]:
    if not history or train.get("loss") is None or history[-1].get("train_loss") is None:
        return None
    prev = history[-1]["train_loss"]
    if not math.isfinite(prev) or train["loss"] <= 1.5 * prev:
        return None
    return f"training loss rose from {prev:.3f} to {train['loss']:.3f}: divergence; lower --lr"


CAUSES = (
    _cause_lr,
    _cause_skipped,
    _cause_gradients,
    _cause_underconfident,
    _cause_fg_prob,
    _cause_rpn,
    _cause_few_positives,
)
_TAKE_CURE = (_cause_underconfident,)  # the causes whose lever is the rare-class cure
MAX_CAUSES = 3  # the strongest few; a list of five "likely" causes tells a user nothing


def _headline(history, current, gt_per_image) -> Optional[str]:
    dets = current["dets_per_image"]
    best = max((h["dets_per_image"] for h in history if "dets_per_image" in h), default=None)
    if dets == 0:
        return (
            f"detections collapsed: 0 detections per image above score {current['score_thresh']:g} "
            f"(ground truth: {gt_per_image:.2f} per image)"
        )
    if best is not None and best > 0 and dets < 0.5 * (min(best, gt_per_image) if gt_per_image > 0 else best):
        # An untrained model over-detects (~100 boxes/image); falling from there towards the
        # ground-truth count is learning, not collapse. Falling below half of it is a drop.
        return (
            f"detections per image dropped sharply: {dets:.2f} now vs {best:.2f} at best "
            f"({gt_per_image:.2f} objects per image)"
        )
    if gt_per_image > 0 and dets < 0.1 * gt_per_image and len(history) >= 2:
        return f"very few detections: {dets:.2f} per image vs {gt_per_image:.2f} ground-truth objects"
    return None


def _over_detection(history, current, train, cfg, gt_per_image) -> List[str]:
    """Many more detections than objects, evaluation after evaluation, or with the classifier shown few
    negatives: the warning and its causes with numbers (an untrained model over-detects too, and falls)."""
    dets, thresh = current["dets_per_image"], current["score_thresh"]
    if gt_per_image <= 0 or dets < max(10 * gt_per_image, 20):
        return []
    pos, neg = train.get("roi/pos_per_image"), train.get("roi/neg_per_image")
    few_negatives = pos is not None and neg is not None and neg <= pos
    previous = next((h["dets_per_image"] for h in reversed(history) if "dets_per_image" in h), None)
    if not few_negatives and (previous is None or dets < 0.8 * previous):
        return []
    causes = []
    ub = cfg.model.roi_head.get("neg_pos_ub", -1)
    if few_negatives:
        lever = (
            f"model.roi_head.neg_pos_ub {ub:g} caps them: raise it (3 is MMDetection's OHEM value) or set -1"
            if ub is not None and ub >= 0
            else "check model.roi_head.num / pos_fraction"
        )
        causes.append(
            f"few negative RoIs per image ({neg:.1f} negatives vs {pos:.1f} positives sampled): the classifier "
            f"rarely sees background; {lever}"
        )
    if thresh < 0.05:
        causes.append(f"box_score_thresh {thresh:g} keeps low-score boxes: torchvision's default is 0.05")
    if not causes:
        causes.append("the classifier does not reject background: train longer, or check the negatives sampled")
    head = (
        f"over-detection: {dets:.1f} detections per image above score {thresh:g} for {gt_per_image:.2f} "
        f"ground-truth objects" + (f" ({previous:.1f} at the last evaluation)" if previous is not None else "")
    )
    return [head] + [f"  likely cause: {c}" for c in causes[:MAX_CAUSES]]


def _class_warnings(history, current, cure: Optional[Dict[str, Any]] = None) -> List[str]:
    """One line per class at 0 detections, then the rare-class cure with its values (``cure``:
    :func:`rare_class_cure` of the training counts) when one of them is rarer than average."""
    out = []
    thresh = current["score_thresh"]
    for name, row in (current.get("per_class") or {}).items():
        if row["gt"] <= 0 or row["dets_per_image"] > 0:
            continue
        msg = f"class {name!r}: 0 detections above {thresh:g} for {int(row['gt'])} ground-truth objects"
        if cure is not None and name in cure.get("untrained", ()):
            out.append(
                msg + ": it has no training objects, so no class weight or repeat factor can teach it; "
                "annotate it in the training set (or drop it from the validation set)"
            )
            continue
        for back, h in enumerate(reversed(history), start=1):
            ap50 = (h.get("per_class") or {}).get(name, {}).get("bbox_AP50")
            if ap50 is not None and math.isfinite(ap50) and ap50 > 0:
                msg += f"; AP50 was {ap50:.2f} {back} evaluation{'s' if back > 1 else ''} ago"
                break
        out.append(msg)
    curable = [line for line in out if "no training objects" not in line]
    if curable and cure is not None:
        out.append(_cure_line(cure))
    return out


def _cure_line(cure: Dict[str, Any]) -> str:
    """The cure's values; what is already set is never suggested again."""
    withheld = f"no class_weight list: {cure['withheld']}" if cure.get("withheld") else ""
    if cure["text"]:
        return f"  cure for rare classes: {cure['text']}" + (f"; {withheld}" if withheld else "")
    if withheld:  # the classes are not balanced: the list is held back while the scale is the problem
        return f"  cure for rare classes: {withheld}"
    if "data.repeat_factor_threshold" in cure["already"]:
        return (
            f"  {' and '.join(cure['already'])} already set: raise data.repeat_factor_threshold (more repeats), "
            "or train longer"
        )
    if cure["already"]:
        return (
            "  model.roi_head.class_weight already set and no class is rare enough in images for repeat-factor "
            "sampling: train longer, or check the class's boxes, labels and anchor coverage"
        )
    return "  the classes are balanced in the training data: check the class's boxes, labels and anchor coverage"


def collapse_warnings(
    history: List[Dict[str, Any]],
    current: Dict[str, Any],
    train: Dict[str, float],
    cfg: TrainConfig,
    gt_per_image: float,
    iteration: int = 10**9,
    judge_after: int = 0,
    cure: Optional[Dict[str, Any]] = None,
    scale: Any = None,
) -> List[str]:
    """Warnings for the current evaluation, each followed by at most three likely causes with numbers.

    ``history``: earlier evaluation records; ``current``: this one (score_summary + AP + per_class);
    ``train``: the last epoch's means of losses, grad_norm and the heads' statistics. Nothing is
    said before ``iteration`` reaches ``judge_after``: an untrained model is not a collapsed one.
    ``cure``: :func:`rare_class_cure` of the training data, printed with the per-class warnings and
    the under-confidence cause. ``scale``: data_report.scale_finding of the training boxes; when it fires,
    objects too small for the model's input is the first cause named, with its cure.
    """
    if iteration < judge_after:
        return []
    over = _over_detection(history, current, train, cfg, gt_per_image)
    head = _headline(history, current, gt_per_image)
    classes = _class_warnings(history, current, cure)
    if head is None and not classes:
        return over
    causes = [
        c for c in (f(current, train, cfg, cure) if f in _TAKE_CURE else f(current, train, cfg) for f in CAUSES) if c
    ]
    loss = _cause_loss_rose(current, train, cfg, history)
    from scale import scale_cause

    small = scale_cause(scale)
    causes = ([loss] if loss else []) + ([small] if small else []) + causes
    few = _cause_few_positives(current, train, cfg)
    # No positive at all, or a sampler the config narrowed: the cause, not one of several.
    if few and (train.get("roi/pos_per_image", 4) < 1 or _sampler_set(cfg)) and few in causes:
        causes = [few] + [c for c in causes if c != few]
    if not causes:
        causes.append(
            "no loss-side cause stands out: check the data report (class balance, anchor coverage, empty "
            "images) and the score distribution in metrics.jsonl"
        )
    lines = ([head] if head else []) + classes
    return over + lines + [f"  likely cause: {c}" for c in causes[:MAX_CAUSES]]
