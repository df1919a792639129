"""The classification losses of the two heads: one registry, one pure function per loss.

A loss is registered once (:func:`register`) as a :class:`ClsLoss`: its name (the value of
``rpn_head.cls_loss`` / ``roi_head.cls_loss``), the config keys it reads, how many classifier outputs
it needs beyond the model's classes, and a small ``nn.Module`` (a *criterion*) that the head holds as
``cls_criterion``. The criterion calls the pure function (tensors in, tensors out, no host read) and
gives the three things every user of a classification loss needs:

* ``forward(logits, labels, avg_factor, weight)``: the loss, ``sum(w * loss) / avg_factor``;
* ``ranking(logits, labels)``: the per-sample loss OHEM ranks candidates by (no state update);
* ``scores(logits)``: the inference probabilities, ``[N, K + 1]`` in torchvision's layout (column 0
  background, columns 1..K the classes) whatever the classifier's own layout.

The heads, OHEM and the config call them the same way for every loss, so a new stateless RoI loss is
one pure function and one registration::

    def poly1(logits: Tensor, labels: Tensor, params: Dict[str, float]) -> Tensor:  # per RoI, [N]
        p_t = F.softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
        return F.cross_entropy(logits, labels, reduction="none") + params["poly_epsilon"] * (1 - p_t)

    register(ClsLoss("poly1", "roi_head", per_sample=poly1, params={"poly_epsilon": Param(1.0)}))

after which ``roi_head: {cls_loss: poly1, poly_epsilon: 2.0}`` is a valid config (the parameter checked
by its ``Param``), the loss is ``sum(w * poly1) / avg_factor``, OHEM ranks by ``poly1`` and TorchScript
compiles it (:class:`LossFunction`). A loss with running statistics registers a criterion instead
(``build=``). A criterion is an ``nn.Module`` so that TorchScript compiles the one the head
holds and so that a loss with running statistics (Seesaw's
sample counts, EQLv2's gradient statistics) keeps them as buffers: in ``state_dict``, hence in
checkpoints and kept on resume. Criteria without state have no buffers: ``state_dict`` keeps stock
torchvision's keys.

Logit layouts of the RoI classifier (torchvision's labels: 0 background, 1..K classes):

* ``ce`` / ``focal`` / ``sigmoid`` / ``federated`` / ``eqlv2``: torchvision's ``K + 1`` logits. The
  sigmoid losses (Detectron2) leave column 0 unused; EQLv2 reads it as its objectness logit (the
  background channel MMDetection puts last).
* ``seesaw``: ``K + 2`` logits, ``[background, class 1..K, object]``: MMDetection's ``C + 2`` outputs
  (its classes, then the objectness pair ``[object, background]``) with the background logit kept in
  torchvision's column 0. The extra ``object`` logit comes from ``box_predictor.cls_objectness``
  (see :mod:`tv_lossfix.classifiers`).
"""

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses as L
from ._checks import LossConfigError, check_alpha, check_count_list, check_focal_gamma, check_int, check_weight

__all__ = [
    "ClsLoss",
    "Param",
    "register",
    "unregister",
    "registered",
    "cls_loss_names",
    "build_criterion",
    "LossFunction",
    "softmax_probabilities",
    "sigmoid_ce_loss",
    "federated_classes",
    "fed_class_weights",
    "seesaw_loss",
    "seesaw_scores",
    "eqlv2_weights",
    "eqlv2_loss",
    "eqlv2_grad_stats",
    "eqlv2_scores",
]


# -- the pure functions of the long-tail losses ----------------------------------------------------
def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot(labels, num_classes).to(dtype)`` without its range check, a host read on the CPU."""
    return (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(dtype)


def sigmoid_ce_loss(
    logits: Tensor,
    labels: Tensor,
    avg_factor: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    class_mask: Optional[Tensor] = None,
) -> Tensor:
    """Detectron2's ``USE_SIGMOID_CE``: binary cross-entropy of each RoI against each of the K classes.

    ``logits`` [N, K + 1] (column 0, background, unused: a background RoI is a 0 target for every
    class), ``labels`` [N] in 0..K. Per RoI the K terms are summed (times ``class_mask[1:]``, [K + 1],
    when given: the federated loss's classes), then ``sum(w * loss) / avg_factor``; ``avg_factor=None``
    divides by N, Detectron2's normalizer.
    """
    fg = logits[:, 1:]
    target = one_hot(labels, logits.shape[1], fg.dtype)[:, 1:]
    loss = F.binary_cross_entropy_with_logits(fg, target, reduction="none")
    if class_mask is not None:
        loss = loss * class_mask[1:].to(loss.dtype)
    return L.weighted_reduce(loss.sum(dim=1), avg_factor, weight)


def fed_class_weights(image_counts: List[int], power: float) -> Tensor:
    """Detectron2's ``get_fed_loss_cls_weights``: images per foreground class ** ``power``, float32 [K]."""
    return torch.tensor(image_counts, dtype=torch.float32) ** power


def federated_classes(labels: Tensor, class_weight: Tensor, num_fed_classes: int) -> Tensor:
    """Detectron2's ``get_fed_loss_classes`` as a [K + 1] 0/1 mask (column 0, background, is 0).

    The classes of ``labels`` (0..K) are kept; when they are fewer than ``num_fed_classes`` (the
    background counted, as Detectron2 counts it), negatives are drawn without replacement with
    probability ∝ ``class_weight`` ([K], image count ** power) until there are ``num_fed_classes``.

    The draw is ``torch.multinomial(prob, n, replacement=False)``'s own algorithm (exponential race:
    the n largest ``prob / q``, ``q ~ Exp(1)`` over every entry), written out so that it reads nothing
    back: ``torch.multinomial`` checks its input on the host and needs ``n`` as a Python int, where here
    ``n`` depends on the batch. Under the same random state the classes drawn are Detectron2's. Unlike
    Detectron2, a draw always consumes the random numbers (Detectron2 skips it when the batch already
    has enough classes), and a class of weight 0 (no training image) is never drawn.
    """
    k = class_weight.shape[0]
    device = labels.device
    # Detectron2's layout: classes 0..K-1, background K; our label l >= 1 is its class l - 1.
    present = torch.zeros(k + 1, dtype=torch.bool, device=device)
    present[torch.where(labels > 0, labels - 1, torch.full_like(labels, k))] = True
    prob = torch.cat([class_weight.to(device=device, dtype=torch.float32), torch.zeros(1, device=device)])
    prob = torch.where(present, torch.zeros_like(prob), prob)
    keys = prob / torch.empty_like(prob).exponential_(1.0)
    # Rank of each key among all (0 = largest): the first ``wanted`` of the draw's order.
    rank = torch.zeros(k + 1, dtype=torch.long, device=device)
    rank[keys.argsort(descending=True)] = torch.arange(k + 1, device=device)
    wanted = num_fed_classes - present.sum()  # may be <= 0: no negatives
    drawn = (rank < wanted) & (keys > 0)
    keep = (present | drawn)[:k]
    return torch.cat([torch.zeros(1, device=device), keep.to(torch.float32)])


def _seesaw_split(logits: Tensor) -> Tuple[Tensor, Tensor]:
    """(class logits [N, K], objectness logits [N, 2] as ``[object, background]``) of our seesaw layout."""
    k = logits.shape[1] - 2
    return logits[:, 1 : k + 1], torch.stack([logits[:, k + 1], logits[:, 0]], dim=1)


def seesaw_loss(
    logits: Tensor,
    labels: Tensor,
    cum_samples: Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
    avg_factor: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """MMDetection's ``SeesawLoss`` (Wang et al., CVPR 2021) on our ``[bg, class 1..K, object]`` logits.

    Two terms per RoI, reduced together as ``sum(w * (classes + objectness)) / avg_factor``
    (MMDetection reduces each with the same weights and avg_factor and adds them):

    * objectness: cross-entropy of ``[object, background]`` against object for a positive RoI;
    * classes (positives only): cross-entropy of the K class logits where every other class j's
      logit is raised by ``log(M_ij * C_ij)``: the mitigation ``M_ij = (N_j / N_i) ** p`` when class j
      has fewer samples so far than the true class i (``N`` = ``cum_samples[1:]``, at least 1), else 1;
      the compensation ``C_ij = (s_j / s_i) ** q`` when the (detached) softmax score of j exceeds the
      true class's ``s_i`` (clamped at ``eps``), else 1.

    ``cum_samples`` [K + 1] (background first) holds the samples seen per class, this batch included
    (the criterion adds the batch first, as MMDetection does). ``avg_factor=None`` divides by N.
    """
    return L.weighted_reduce(seesaw_per_sample(logits, labels, cum_samples, p, q, eps), avg_factor, weight)


def seesaw_per_sample(
    logits: Tensor, labels: Tensor, cum_samples: Tensor, p: float = 0.8, q: float = 2.0, eps: float = 1e-2
) -> Tensor:
    """The per-RoI terms of :func:`seesaw_loss` (classes + objectness), [N]."""
    # float32 at least: fp16 (autocast) would overflow LVIS-sized counts (> 65504) and their ratios.
    cls_logits, obj_logits = _seesaw_split(logits if logits.dtype == torch.float64 else logits.float())
    k = cls_logits.shape[1]
    is_pos = labels > 0
    loss_obj = F.cross_entropy(obj_logits, (~is_pos).long(), reduction="none")
    # Every row is computed (a negative as class 1) and the negatives' terms dropped with where():
    # no boolean indexing, no host read.
    target = (labels - 1).clamp(min=0)
    onehot = one_hot(target, k, cls_logits.dtype)
    factor = torch.ones_like(cls_logits)
    if p > 0:
        counts = cum_samples[1:].to(cls_logits.dtype).clamp(min=1)  # float32 or float64
        ratio = counts[None, :] / counts[:, None]  # [i, j] = N_j / N_i
        mitigation = torch.where(ratio < 1.0, ratio.pow(p), torch.ones_like(ratio))
        factor = factor * mitigation[target]
    if q > 0:
        scores = F.softmax(cls_logits.detach(), dim=1)
        own = scores.gather(1, target[:, None]).clamp(min=eps)
        ratio = scores / own
        factor = factor * torch.where(ratio > 1.0, ratio.pow(q), torch.ones_like(ratio))
    adjusted = cls_logits + factor.log() * (1 - onehot)
    loss_cls = F.cross_entropy(adjusted, target, reduction="none")
    loss_cls = torch.where(is_pos, loss_cls, torch.zeros_like(loss_cls))
    return loss_cls + loss_obj


def seesaw_scores(logits: Tensor) -> Tensor:
    """MMDetection's Seesaw ``get_activation``: class softmax × P(object); background = P(background)."""
    cls_logits, obj_logits = _seesaw_split(logits)
    obj = F.softmax(obj_logits, dim=1)
    return torch.cat([obj[:, 1:2], F.softmax(cls_logits, dim=1) * obj[:, 0:1]], dim=1)


def eqlv2_weights(pos_neg: Tensor, mu: float, alpha: float, gamma: float) -> Tuple[Tensor, Tensor]:
    """EQLv2's (positive, negative) weights per channel, [K + 1] each, background (column 0) 1 and 1.

    ``neg = 1 / (1 + exp(-gamma (g - mu)))`` of the accumulated positive / negative gradient ratio
    ``g`` of each class, ``pos = 1 + alpha (1 - neg)`` (Tan et al., CVPR 2021).
    """
    neg = 1 / (1 + torch.exp(-gamma * (pos_neg - mu)))
    neg = torch.cat([torch.ones(1, dtype=neg.dtype, device=neg.device), neg])
    return 1 + alpha * (1 - neg), neg


def eqlv2_loss(
    logits: Tensor,
    labels: Tensor,
    pos_neg: Tensor,
    mu: float = 0.8,
    alpha: float = 4.0,
    gamma: float = 12.0,
    avg_factor: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """MMDetection's ``EQLV2Loss``: BCE over all K + 1 logits (background included, as its objectness
    channel), each class's positive and negative terms weighted by :func:`eqlv2_weights` of ``pos_neg``
    [K]; summed per RoI, ``sum(w * loss) / avg_factor`` (``None``: N, MMDetection's ``n_i``)."""
    target = one_hot(labels, logits.shape[1], logits.dtype)
    pos_w, neg_w = eqlv2_weights(pos_neg, mu, alpha, gamma)
    w = pos_w * target + neg_w * (1 - target)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w
    return L.weighted_reduce(loss.sum(dim=1), avg_factor, weight)


def eqlv2_grad_stats(
    logits: Tensor, labels: Tensor, pos_neg: Tensor, mu: float, alpha: float, gamma: float
) -> Tuple[Tensor, Tensor]:
    """EQLv2's ``collect_grad``: the summed |dL/dlogit| of the positive and of the negative terms of each
    foreground class in this batch ([K] each, background excluded), weighted as the loss weighs them."""
    with torch.no_grad():
        target = one_hot(labels, logits.shape[1], logits.dtype)
        pos_w, neg_w = eqlv2_weights(pos_neg, mu, alpha, gamma)
        w = pos_w * target + neg_w * (1 - target)
        grad = (target * (torch.sigmoid(logits) - 1) + (1 - target) * torch.sigmoid(logits)).abs()
        pos = (grad * target * w).sum(dim=0)[1:]
        neg = (grad * (1 - target) * w).sum(dim=0)[1:]
    return pos, neg


def eqlv2_scores(logits: Tensor) -> Tensor:
    """MMDetection's EQLv2 ``get_activation`` (``test_with_obj=True``): sigmoid of each class × (1 -
    sigmoid of the background logit); column 0 is the background sigmoid. MMDetection 3.3.0's BBoxHead
    calls it only for a loss with ``custom_cls_channels``, which ``EQLV2Loss`` lacks (its head would take
    the softmax); this is the loss's own, and the EQLv2 authors', activation."""
    prob = torch.sigmoid(logits)
    return torch.cat([prob[:, :1], prob[:, 1:] * (1 - prob[:, :1])], dim=1)


@torch.jit.unused
def _all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over the DDP ranks (identity when not distributed); not scriptable (collectives)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# -- the criteria (what the heads hold) ------------------------------------------------------------
class _Criterion(nn.Module):
    """Base of the criteria; ``scores`` defaults to the softmax (torchvision's inference)."""

    softmax_scores: bool = True

    def ranking(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    def scores(self, logits: Tensor) -> Tensor:
        return F.softmax(logits, -1)


class CrossEntropy(_Criterion):
    """torchvision's RoI classifier loss (``fastrcnn_loss``'s cross-entropy)."""

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        return L.classification_loss(logits, labels, avg_factor, weight)

    def ranking(self, logits: Tensor, labels: Tensor) -> Tensor:
        # The focal loss at gamma 0 is the cross-entropy exactly (the factor is 1): OHEM's ranking as before.
        return L.softmax_focal_loss(logits, labels, None, 0.0)


class SoftmaxFocal(_Criterion):
    """The softmax focal loss (Lin et al. 2017); ``class_weight`` is its per-class alpha."""

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        return L.focal_classification_loss(logits, labels, self.gamma, avg_factor, weight)

    def ranking(self, logits: Tensor, labels: Tensor) -> Tensor:
        return L.softmax_focal_loss(logits, labels, None, self.gamma)


class SigmoidCE(_Criterion):
    """Detectron2's sigmoid classifier; sigmoid scores at inference (its ``predict_probs``)."""

    softmax_scores = False

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        return sigmoid_ce_loss(logits, labels, avg_factor, weight)

    def ranking(self, logits: Tensor, labels: Tensor) -> Tensor:
        target = one_hot(labels, logits.shape[1], logits.dtype)[:, 1:]
        return F.binary_cross_entropy_with_logits(logits[:, 1:], target, reduction="none").sum(dim=1)

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


class Federated(SigmoidCE):
    """Detectron2's federated loss: the sigmoid loss over the batch's classes plus drawn negatives.

    ``class_weight`` ([K], image count ** power) is a non-persistent buffer: it comes from the config
    (``roi_head.fed_image_counts``, saved in checkpoints with the model settings). OHEM ranks by the
    sigmoid loss over every class (a draw there would rank by noise).
    """

    def __init__(self, image_counts: List[int], power: float, num_fed_classes: int) -> None:
        super().__init__()
        self.num_fed_classes = int(num_fed_classes)
        self.register_buffer("class_weight", fed_class_weights(image_counts, power), persistent=False)

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        if self.class_weight.shape[0] + 1 != logits.shape[1]:
            raise ValueError(
                "roi_head.fed_image_counts has " + str(self.class_weight.shape[0]) + " entries but the box predictor "
                "returns " + str(logits.shape[1]) + " class logits: give one count per foreground class"
            )
        mask = federated_classes(labels, self.class_weight, self.num_fed_classes)
        return sigmoid_ce_loss(logits, labels, avg_factor, weight, mask)


class Seesaw(_Criterion):
    """MMDetection's ``SeesawLoss``; ``cum_samples`` ([K + 1], background first) is a buffer.

    As in MMDetection the counts are per process (not all-reduced under DDP: MMDetection 3.3.0's
    ``SeesawLoss`` adds each rank's own labels); the batch is added before the loss is computed.
    """

    softmax_scores = False

    def __init__(self, num_classes: int, p: float, q: float, eps: float = 1e-2) -> None:
        super().__init__()
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.register_buffer("cum_samples", torch.zeros(num_classes, dtype=torch.float32))

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        if self.cum_samples.shape[0] + 1 != logits.shape[1]:
            raise ValueError(
                "roi_head.cls_loss seesaw needs " + str(self.cum_samples.shape[0] + 1) + " class logits (the classes, "
                "background included, and one objectness logit) but the box predictor returns "
                + str(logits.shape[1])
                + ": build the model with tv_lossfix's builders or patch_model, which add box_predictor.cls_objectness"
            )
        with torch.no_grad():
            # The batch's count per class in integers, then one float add per class (MMDetection adds
            # each class's batch count): adding 1 per sample to a float32 count stops at 2 ** 24, a
            # count LVIS's frequent classes pass.
            batch = torch.zeros(self.cum_samples.shape[0], dtype=torch.long, device=labels.device)
            batch.index_add_(0, labels, torch.ones_like(labels))
            self.cum_samples += batch.to(self.cum_samples.dtype)
        return seesaw_loss(logits, labels, self.cum_samples, self.p, self.q, self.eps, avg_factor, weight)

    def ranking(self, logits: Tensor, labels: Tensor) -> Tensor:
        return seesaw_per_sample(logits, labels, self.cum_samples, self.p, self.q, self.eps)

    def scores(self, logits: Tensor) -> Tensor:
        return seesaw_scores(logits)


class EQLv2(_Criterion):
    """MMDetection's ``EQLV2Loss``; its gradient statistics ``pos_grad``, ``neg_grad`` and ``pos_neg``
    ([K] each) are buffers, ``pos_neg`` starting at 100 (weights 1 on the first step), as MMDetection.

    Under DDP each step's statistics are summed over the ranks before they are added (the EQLv2
    authors' ``dist.all_reduce``; MMDetection 3.3.0's port drops it), so every rank keeps the same
    weights. That collective is why training a *scripted* model with EQLv2 raises: train eagerly, script
    for inference.
    """

    softmax_scores = False

    def __init__(self, num_classes: int, mu: float, alpha: float, gamma: float) -> None:
        super().__init__()
        self.mu, self.alpha, self.gamma = float(mu), float(alpha), float(gamma)
        k = num_classes - 1
        self.register_buffer("pos_grad", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("neg_grad", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("pos_neg", torch.full((k,), 100.0, dtype=torch.float32))

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        if self.pos_neg.shape[0] + 1 != logits.shape[1]:
            raise ValueError(
                "roi_head.cls_loss eqlv2 was set up for " + str(self.pos_neg.shape[0] + 1) + " classes but the box "
                "predictor returns " + str(logits.shape[1]) + " class logits: set the loss config again"
            )
        loss = eqlv2_loss(logits, labels, self.pos_neg, self.mu, self.alpha, self.gamma, avg_factor, weight)
        pos, neg = eqlv2_grad_stats(logits, labels, self.pos_neg, self.mu, self.alpha, self.gamma)
        if torch.jit.is_scripting():
            raise RuntimeError(
                "roi_head.cls_loss eqlv2 trains in eager mode only: its gradient statistics are all-reduced over "
                "DDP ranks (torch.distributed is not scriptable); script the model for inference"
            )
        stats = _all_reduce_sum(torch.stack([pos, neg]))
        self.pos_grad += stats[0]
        self.neg_grad += stats[1]
        self.pos_neg.copy_(self.pos_grad / (self.neg_grad + 1e-10))
        return loss

    def ranking(self, logits: Tensor, labels: Tensor) -> Tensor:
        target = one_hot(labels, logits.shape[1], logits.dtype)
        pos_w, neg_w = eqlv2_weights(self.pos_neg, self.mu, self.alpha, self.gamma)
        w = pos_w * target + neg_w * (1 - target)
        return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).sum(dim=1)

    def scores(self, logits: Tensor) -> Tensor:
        return eqlv2_scores(logits)


def softmax_probabilities(logits: Tensor) -> Tensor:
    """torchvision's inference probabilities: the softmax over ``[background, class 1..K]``."""
    return F.softmax(logits, -1)


class LossFunction(_Criterion):
    """The criterion of a loss registered as a pure function (``ClsLoss.per_sample``).

    ``per_sample(logits, labels, params) -> [N]`` is the loss of each sample (``params``: the loss's
    parameters, ``Dict[str, float]``); the loss is ``sum(w * per_sample) / avg_factor`` (None: N), OHEM
    ranks by ``per_sample`` itself, and ``scores`` (default: the softmax) gives the inference
    probabilities. Scripting the model scripts the functions (:meth:`__prepare_scriptable__`); one
    TorchScript cannot compile is refused then, in one line naming the loss: train it eagerly.
    """

    params: Dict[str, float]

    def __init__(
        self,
        name: str,
        per_sample: Callable[[Tensor, Tensor, Dict[str, float]], Tensor],
        params: Dict[str, float],
        scores: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.per_sample = per_sample
        self.score_fn = softmax_probabilities if scores is None else scores
        self.softmax_scores = scores is None
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LossConfigError(
                    f"roi_head.{key} is {value!r}: roi_head.cls_loss {name} is a per_sample loss, whose parameters "
                    "are numbers (register a criterion with build= for other parameters)"
                )
        self.params = {k: float(v) for k, v in params.items()}

    @torch.jit.unused
    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule first; the functions are compiled in place.
        signatures = {"per_sample": ["Tensor", "Tensor", "Dict[str, float]"], "score_fn": ["Tensor"]}
        for attr, want in signatures.items():
            fn = getattr(self, attr)
            name = getattr(fn, "__name__", attr)
            try:
                compiled = fn if isinstance(fn, torch.jit.ScriptFunction) else torch.jit.script(fn)
            except Exception as e:
                first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                raise RuntimeError(
                    f"roi_head.cls_loss {self.name}: TorchScript cannot compile {name} ({first.strip()}); "
                    "train and infer with the eager model"
                ) from None
            got = [str(a.type) for a in compiled.schema.arguments]
            if got != want:  # an unannotated argument is a Tensor to TorchScript
                raise RuntimeError(
                    f"roi_head.cls_loss {self.name}: TorchScript reads {name}({', '.join(got)}); annotate it as "
                    f"({', '.join(want)}) -> Tensor"
                )
            setattr(self, attr, compiled)
        return self

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        return L.weighted_reduce(self.per_sample(logits, labels, self.params), avg_factor, weight)

    def ranking(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.per_sample(logits, labels, self.params)

    def scores(self, logits: Tensor) -> Tensor:
        return self.score_fn(logits)


class ObjectnessBCE(nn.Module):
    """torchvision's RPN objectness loss (binary cross-entropy)."""

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        return L.objectness_loss(logits, labels, avg_factor, weight)


class ObjectnessFocal(nn.Module):
    """The sigmoid focal loss of ``torchvision.ops.sigmoid_focal_loss`` on the RPN objectness."""

    def __init__(self, alpha: float, gamma: float) -> None:
        super().__init__()
        self.alpha, self.gamma = float(alpha), float(gamma)

    def forward(self, logits: Tensor, labels: Tensor, avg_factor: Optional[Tensor], weight: Optional[Tensor]) -> Tensor:
        return L.weighted_reduce(L.sigmoid_focal_loss(logits, labels, self.alpha, self.gamma), avg_factor, weight)


# -- the registry ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a registered loss, declared once: its ``default`` (taken when the key is not
    given, i.e. None) and the ``check(where, value)`` of a given value, which returns it normalised or
    raises :class:`~tv_lossfix.LossConfigError` naming ``where`` (the dotted key). LossConfig reads both."""

    default: Any
    check: Callable[[str, Any], Any] = check_weight


@dataclasses.dataclass(frozen=True)
class ClsLoss:
    """One classification loss of one head, and everything the rest of the package reads about it.

    A loss is either a pure function, ``per_sample(logits [N, C], labels [N], params) -> [N]`` (the
    loss of each RoI; ``params``: its parameters as ``Dict[str, float]``) with optional ``scores(logits)
    -> [N, C]`` (the inference probabilities; default the softmax), made into a :class:`LossFunction`
    criterion (RoI head only), or ``build(settings, num_classes)``, which makes any criterion from the
    resolved settings (a dict of every key of the head's config, each parameter at its value or
    default) and the model's classes (background included): the losses with state.

    ``params``: the config keys only this loss reads, ``key -> Param`` (a bare
    value is ``Param(value)``: a number >= 0); LossConfig accepts them under the head, checks them
    with ``Param.check`` and refuses them while another loss is chosen. ``extra_outputs``: classifier
    outputs beyond the classes, which the box predictor gains as ``cls_objectness`` (Seesaw: 1, the
    object logit); ``needs``: parameters that must be given (data statistics); ``per_class``:
    parameters that are lists with one entry per foreground class (checked against the model);
    ``stateful``: the criterion has buffers (they need the model's class count).
    """

    name: str
    head: str
    build: Optional[Callable[[Dict[str, Any], int], nn.Module]] = None
    per_sample: Optional[Callable[[Tensor, Tensor, Dict[str, float]], Tensor]] = None
    scores: Optional[Callable[[Tensor], Tensor]] = None
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    extra_outputs: int = 0
    needs: Tuple[str, ...] = ()
    per_class: Tuple[str, ...] = ()
    stateful: bool = False
    summary: str = ""


_REGISTRY: Dict[Tuple[str, str], ClsLoss] = {}


def register(spec: ClsLoss) -> ClsLoss:
    """Add a loss (``spec.head`` is ``"rpn_head"`` or ``"roi_head"``); a name is registered once per head.

    Everything reads the registry at use: ``cls_loss: <name>`` is then a valid config value, its
    parameters valid keys, OHEM ranks with the criterion's ``ranking``, the heads score with its
    ``scores`` and the box predictor gets its ``extra_outputs``."""
    if spec.head not in ("rpn_head", "roi_head"):
        raise ValueError(f"ClsLoss.head must be 'rpn_head' or 'roi_head', got {spec.head!r}")
    if (spec.head, spec.name) in _REGISTRY:
        raise ValueError(f"{spec.head}.cls_loss {spec.name!r} is already registered")
    if (spec.build is None) == (spec.per_sample is None):
        raise ValueError(f"{spec.head}.cls_loss {spec.name!r}: give one of build= or per_sample=")
    if spec.per_sample is not None and spec.head != "roi_head":
        raise ValueError(f"{spec.head}.cls_loss {spec.name!r}: per_sample= losses are RoI classifier losses")
    params = {k: v if isinstance(v, Param) else Param(v) for k, v in spec.params.items()}
    for key in spec.needs + spec.per_class:
        if key not in params:
            raise ValueError(f"{spec.head}.cls_loss {spec.name!r} needs {key!r}, which is not one of its params")
    spec = dataclasses.replace(spec, params=params)
    _REGISTRY[(spec.head, spec.name)] = spec
    return spec


def unregister(head: str, name: str) -> None:
    """Remove a registered loss (a test's or a plug-in's); a model that holds its criterion keeps it."""
    del _REGISTRY[(head, name)]


def registered(head: str, name: str) -> ClsLoss:
    return _REGISTRY[(head, name)]


def cls_loss_names(head: str) -> Tuple[str, ...]:
    """The registered names for one head, in registration order (the stock loss first)."""
    return tuple(n for h, n in _REGISTRY if h == head)


def param_owners(head: str) -> Dict[str, List[str]]:
    """config key -> the losses of ``head`` that read it."""
    out: Dict[str, List[str]] = {}
    for (h, n), spec in _REGISTRY.items():
        if h == head:
            for key in spec.params:
                out.setdefault(key, []).append(n)
    return out


def resolved_param(settings: Dict[str, Any], spec: ClsLoss, key: str) -> Any:
    value = settings.get(key)
    return spec.params[key].default if value is None else value


def build_criterion(head: str, settings: Dict[str, Any], num_classes: int) -> nn.Module:
    """The criterion of ``settings["cls_loss"]`` for a model with ``num_classes`` (background included);
    ``settings`` holds the head's config keys, None meaning the loss's default."""
    spec = registered(head, settings["cls_loss"])
    resolved = {k: resolved_param(settings, spec, k) for k in spec.params}
    if spec.per_sample is not None:
        return LossFunction(spec.name, spec.per_sample, resolved, spec.scores)
    return spec.build({**settings, **resolved}, num_classes)


register(ClsLoss("bce", "rpn_head", lambda s, n: ObjectnessBCE(), summary="binary cross-entropy (torchvision)"))
register(
    ClsLoss(
        "focal",
        "rpn_head",
        lambda s, n: ObjectnessFocal(s["focal_alpha"], s["focal_gamma"]),
        params={"focal_gamma": Param(2.0, check_focal_gamma), "focal_alpha": Param(0.25, check_alpha)},
        summary="sigmoid focal loss (torchvision.ops.sigmoid_focal_loss)",
    )
)
register(ClsLoss("ce", "roi_head", lambda s, n: CrossEntropy(), summary="softmax cross-entropy (torchvision)"))
register(
    ClsLoss(
        "focal",
        "roi_head",
        lambda s, n: SoftmaxFocal(s["focal_gamma"]),
        params={"focal_gamma": Param(2.0, check_focal_gamma)},
        summary="softmax focal loss; class_weight is its per-class alpha",
    )
)
register(ClsLoss("sigmoid", "roi_head", lambda s, n: SigmoidCE(), summary="Detectron2 USE_SIGMOID_CE"))
register(
    ClsLoss(
        "federated",
        "roi_head",
        lambda s, n: Federated(list(s["fed_image_counts"]), s["fed_freq_power"], s["fed_num_classes"]),
        params={
            "fed_num_classes": Param(50, check_int),
            "fed_freq_power": Param(0.5),
            "fed_image_counts": Param(None, check_count_list),
        },
        needs=("fed_image_counts",),
        per_class=("fed_image_counts",),
        summary="Detectron2 USE_FED_LOSS",
    )
)
register(
    ClsLoss(
        "seesaw",
        "roi_head",
        lambda s, n: Seesaw(n, s["seesaw_p"], s["seesaw_q"]),
        params={"seesaw_p": Param(0.8), "seesaw_q": Param(2.0)},
        extra_outputs=1,
        stateful=True,
        summary="MMDetection SeesawLoss",
    )
)
register(
    ClsLoss(
        "eqlv2",
        "roi_head",
        lambda s, n: EQLv2(n, s["eqlv2_mu"], s["eqlv2_alpha"], s["eqlv2_gamma"]),
        params={"eqlv2_mu": Param(0.8), "eqlv2_alpha": Param(4.0), "eqlv2_gamma": Param(12.0)},
        stateful=True,
        summary="MMDetection EQLV2Loss",
    )
)
