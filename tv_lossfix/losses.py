"""Loss math of the detection heads, as pure functions (tensors in, tensors out).

Every function works on the whole batch at once and never reads a tensor value on the host
(no item(), bool(tensor) or nonzero calls): on a GPU each of those is a device sync.
Normalizers ("avg_factors") are counts kept as tensors. Weighted losses follow MMDetection's
convention: ``sum(w * loss) / avg_factor`` where avg_factor is a *count*, not a sum of weights
(as MMDetection's weighted losses do). All functions are TorchScript-compatible.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "count",
    "per_image_count",
    "sample_weights",
    "objectness_loss",
    "classification_loss",
    "softmax_focal_loss",
    "focal_classification_loss",
    "sigmoid_focal_loss",
    "weighted_reduce",
    "decode_deltas",
    "iou_loss",
    "box_regression_loss",
    "mask_loss",
]

# torchvision's BoxCoder clamps dw/dh at log(1000/16) before exp: same here.
_DEFAULT_DELTA_CLIP = math.log(1000.0 / 16)


def count(mask: Tensor) -> Tensor:
    """Number of True entries as a float tensor, at least 1 (a normalizer never divides by 0)."""
    return mask.sum(dtype=torch.float32).clamp(min=1.0)


def per_image_count(pos: Tensor, neg: Tensor) -> Tensor:
    """MMDetection's RPN normalizer: sum over images of max(P_i, 1) + max(N_i, 1).

    ``pos`` and ``neg`` are [num_images, num_anchors] boolean masks of the sampled anchors.
    """
    p = pos.sum(dim=1, dtype=torch.float32).clamp(min=1.0)
    n = neg.sum(dim=1, dtype=torch.float32).clamp(min=1.0)
    return (p + n).sum()


def sample_weights(
    is_pos: Tensor, pos_weight: float, labels: Optional[Tensor] = None, class_weight: Optional[Tensor] = None
) -> Optional[Tensor]:
    """Per-sample classification weights: ``pos_weight`` on positives times ``class_weight[label]``.

    Returns None when every weight is 1, so callers skip the multiply (exact stock numerics).
    """
    w: Optional[Tensor] = None
    if class_weight is not None and labels is not None:
        w = class_weight[labels]
    if pos_weight != 1.0:
        ones = torch.ones(is_pos.shape, dtype=torch.float32, device=is_pos.device)
        pw = torch.where(is_pos, ones * pos_weight, ones)
        w = pw if w is None else w * pw
    return w


def objectness_loss(
    logits: Tensor, targets: Tensor, avg_factor: Optional[Tensor] = None, weight: Optional[Tensor] = None
) -> Tensor:
    """RPN objectness: binary cross-entropy over sampled anchors, ``sum(w * bce) / avg_factor``.

    ``avg_factor=None`` divides by the number of samples given (one fused mean, torchvision's
    op at default settings). BCE's ``weight`` is per element, so weighting costs no extra op.
    """
    targets = targets.to(logits.dtype)
    if avg_factor is None:
        return F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="mean")
    return F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="sum") / avg_factor


def classification_loss(
    logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor] = None, weight: Optional[Tensor] = None
) -> Tensor:
    """RoI classifier: cross-entropy per sample, ``sum(w * ce) / avg_factor``.

    ``avg_factor=None`` divides by the number of samples given. Not ``F.cross_entropy(weight=...)``:
    that argument is per *class* and its mean divides by the sum of the weights, so a class
    weight would also rescale the loss of every other class.
    """
    if weight is None:
        if avg_factor is None:
            return F.cross_entropy(logits, labels)
        return F.cross_entropy(logits, labels, reduction="sum") / avg_factor
    return weighted_reduce(F.cross_entropy(logits, labels, reduction="none"), avg_factor, weight)


def _focal_modulation(ce: Tensor, gamma: float) -> Tensor:
    """``(1 - p_t)^gamma`` from the cross-entropy ``ce = -log p_t`` of each sample.

    ``1 - p_t = -expm1(-ce)`` keeps the precision that ``1 - exp(-ce)`` loses near p_t = 1. The clamp
    only moves values below 1e-30 (where the term ``(1 - p_t)^gamma * ce`` is 0 to float precision)
    and keeps the gradient finite there: ``d/dx x^gamma`` is infinite at x = 0 for gamma < 1, and
    0 * inf is NaN. With gamma = 0 the factor is exactly 1.
    """
    return (-torch.expm1(-ce)).clamp(min=1e-30).pow(gamma)


def softmax_focal_loss(logits: Tensor, labels: Tensor, alpha: Optional[Tensor] = None, gamma: float = 2.0) -> Tensor:
    """Softmax focal loss per sample, ``-alpha[label] * (1 - p_t)^gamma * log(p_t)`` (Lin et al. 2017).

    ``p_t`` is the softmax probability of the true class of each of the [S, C] ``logits``;
    ``alpha`` ([C], optional) is a per-class weight (1 for every class when None). gamma = 0 without
    alpha is exactly ``F.cross_entropy(logits, labels, reduction="none")``. Returns [S].
    """
    ce = F.cross_entropy(logits, labels, reduction="none")
    loss = _focal_modulation(ce, gamma) * ce
    if alpha is not None:
        loss = loss * alpha[labels]
    return loss


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss per element; the values of ``torchvision.ops.sigmoid_focal_loss(reduction="none")``,
    arguments in its order (alpha, then gamma).

    ``alpha`` weighs the positives (targets 1) and ``1 - alpha`` the negatives; a negative ``alpha``
    (-1) means no weighting. gamma = 0 and alpha = -1 are exactly
    ``F.binary_cross_entropy_with_logits(reduction="none")``.
    """
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = _focal_modulation(ce, gamma) * ce
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def focal_classification_loss(
    logits: Tensor, labels: Tensor, gamma: float, avg_factor: Optional[Tensor] = None, weight: Optional[Tensor] = None
) -> Tensor:
    """RoI classifier with the softmax focal loss, reduced as :func:`classification_loss` reduces the CE.

    ``weight`` (per sample) carries the per-class alpha, ``class_weight[label]``, times any positive weight.
    """
    per_roi = softmax_focal_loss(logits, labels, gamma=gamma)
    if weight is None and avg_factor is None:
        # F.cross_entropy's mean is nll_loss's own sum over the count, which rounds unlike Tensor.sum()
        # or mean(): reducing through nll_loss too keeps gamma = 0 equal to the default loss bit for bit.
        return F.nll_loss(-per_roi.unsqueeze(1), torch.zeros_like(labels))
    return weighted_reduce(per_roi, avg_factor, weight)


def weighted_reduce(loss: Tensor, avg_factor: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
    """``sum(w * loss) / avg_factor`` of per-sample terms; the mean over the samples when ``avg_factor=None``."""
    if weight is not None:
        loss = loss * weight
    return loss.mean() if avg_factor is None else loss.sum() / avg_factor


def decode_deltas(
    deltas: Tensor,
    ref_boxes: Tensor,
    coder_weights: Tuple[float, float, float, float],
    clip: float = _DEFAULT_DELTA_CLIP,
) -> Tensor:
    """Boxes (x1, y1, x2, y2) from Faster R-CNN deltas (dx, dy, dw, dh) relative to ``ref_boxes``.

    Same parameterization as torchvision's ``BoxCoder``; differentiable in ``deltas``.
    """
    ref = ref_boxes.to(deltas.dtype)
    w = ref[:, 2] - ref[:, 0]
    h = ref[:, 3] - ref[:, 1]
    cx = ref[:, 0] + 0.5 * w
    cy = ref[:, 1] + 0.5 * h
    wx, wy, ww, wh = coder_weights
    pcx = deltas[:, 0] / wx * w + cx
    pcy = deltas[:, 1] / wy * h + cy
    pw = torch.exp((deltas[:, 2] / ww).clamp(max=clip)) * w
    ph = torch.exp((deltas[:, 3] / wh).clamp(max=clip)) * h
    return torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=1)


def iou_loss(pred: Tensor, target: Tensor, kind: str = "giou", eps: float = 1e-7) -> Tensor:
    """Per-box GIoU / DIoU / CIoU loss of [N, 4] xyxy boxes (the values of torchvision.ops').

    Written with clamps instead of torchvision's boolean-mask assignment, which is a
    ``nonzero`` (a GPU sync) per call.
    """
    x1, y1, x2, y2 = pred.unbind(dim=-1)
    gx1, gy1, gx2, gy2 = target.unbind(dim=-1)
    inter = (torch.min(x2, gx2) - torch.max(x1, gx1)).clamp(min=0) * (torch.min(y2, gy2) - torch.max(y1, gy1)).clamp(
        min=0
    )
    union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - inter
    iou = inter / (union + eps)
    cw = torch.max(x2, gx2) - torch.min(x1, gx1)  # enclosing box
    ch = torch.max(y2, gy2) - torch.min(y1, gy1)
    if kind == "giou":
        area_c = cw * ch
        return 1 - iou + (area_c - union) / (area_c + eps)
    # DIoU: squared centre distance over the enclosing box's squared diagonal.
    dist = ((x1 + x2 - gx1 - gx2) ** 2 + (y1 + y2 - gy1 - gy2) ** 2) / 4
    loss = 1 - iou + dist / (cw**2 + ch**2 + eps)
    if kind == "ciou":
        v = (4 / (math.pi**2)) * (torch.atan((gx2 - gx1) / (gy2 - gy1)) - torch.atan((x2 - x1) / (y2 - y1))) ** 2
        alpha = (v / (1 - iou + v + eps)).detach()  # a constant weight, as in the CIoU paper
        loss = loss + alpha * v
    return loss


def box_regression_loss(
    pred_deltas: Tensor,
    target_deltas: Tensor,
    is_pos: Tensor,
    avg_factor: Optional[Tensor],
    loss_type: str = "smooth_l1",
    beta: float = 1.0 / 9,
    ref_boxes: Optional[Tensor] = None,
    coder_weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """Box regression over the positive samples, ``sum_pos(loss) / avg_factor``.

    ``pred_deltas``/``target_deltas`` are [S, 4] for S sampled anchors or RoIs, ``is_pos`` [S].
    Negatives contribute exactly 0, and neither their prediction nor their target is read (value
    or gradient): torchvision's targets hold -inf for images without ground truth, and an fp16
    overflow puts inf in a prediction; either would turn a multiply-by-0 mask into NaN. So the
    loss is non-finite only when stock torchvision's is (a non-finite positive).
    ``smooth_l1``/``l1`` sum over the 4 coordinates; ``giou``/``diou``/``ciou`` decode both sides
    against ``ref_boxes`` (required for them) and give one term per box.
    With zero positives the result is 0 and still depends on ``pred_deltas`` (DDP needs that).
    ``avg_factor=None`` divides by S, the number of samples given (torchvision's normalizer).
    """
    pos = is_pos.unsqueeze(1)
    if loss_type == "smooth_l1" or loss_type == "l1":
        # Both sides of a negative are replaced by 0 before the loss: exactly 0 loss and 0 gradient
        # in one fused reduction, whatever the negative held (where()'s backward sends the
        # unselected side a zero gradient, never inf * 0).
        zeros = torch.zeros_like(pred_deltas)
        pred = torch.where(pos, pred_deltas, zeros)
        target = torch.where(pos, target_deltas.to(pred_deltas.dtype), zeros)
        if loss_type == "l1":
            total = F.l1_loss(pred, target, reduction="sum")
        else:
            total = F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
    else:
        if loss_type not in ("giou", "diou", "ciou"):
            raise ValueError(f"unknown bbox_loss {loss_type}")
        if ref_boxes is None:
            raise ValueError(f"bbox_loss={loss_type} needs the reference boxes to decode the deltas")
        # Decode negatives against a zero delta, so no inf/NaN enters the graph; IoU math in
        # float32 at least (fp16 areas overflow), as torchvision.ops does.
        zeros = torch.zeros_like(pred_deltas)
        pred_boxes = decode_deltas(torch.where(pos, pred_deltas, zeros).float(), ref_boxes.float(), coder_weights)
        target_boxes = decode_deltas(torch.where(pos, target_deltas, zeros).float(), ref_boxes.float(), coder_weights)
        per_box = iou_loss(pred_boxes, target_boxes, loss_type)
        # where(), not a multiply: the result stays in the graph (zero gradient) with no positive.
        total = torch.where(is_pos, per_box, torch.zeros_like(per_box)).sum()
    if avg_factor is None:
        return total / max(pred_deltas.shape[0], 1)
    return total / avg_factor


def mask_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
    """Mask BCE as a per-pixel mean over P x M x M (every reference's choice), class-specific.

    With no positive RoI the loss is ``mask_logits.sum() * 0``: exactly 0, still in the graph.
    """
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    idx = torch.arange(labels.shape[0], device=labels.device)
    return F.binary_cross_entropy_with_logits(mask_logits[idx, labels], mask_targets)
