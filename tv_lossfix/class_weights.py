"""Per-class classification weights from the number of objects of each class (rare classes up)."""

import math
import operator
from typing import List, Optional, Sequence

__all__ = ["class_weights_from_counts", "CLASS_WEIGHT_METHODS"]

CLASS_WEIGHT_METHODS = ("effective_number", "inverse_sqrt")


def _check_counts(counts: Sequence) -> List[int]:
    if isinstance(counts, (str, bytes)) or not hasattr(counts, "__iter__"):
        raise ValueError(f"counts must be a list of object counts per foreground class, got {type(counts).__name__}")
    out = []
    for i, c in enumerate(counts):
        try:
            n = operator.index(c)  # int, numpy / torch integers
        except TypeError:
            n = None
            if isinstance(c, float) and c.is_integer():
                n = int(c)
        if n is None or isinstance(c, bool) or n < 0:
            raise ValueError(f"counts[{i}] must be a non-negative integer (objects of class {i + 1}), got {c!r}")
        out.append(n)
    if not out:
        raise ValueError("counts is empty: give the number of objects of each foreground class (labels 1..K)")
    if max(out) == 0:
        raise ValueError("counts are all 0: no class has an object to weight by")
    return out


def class_weights_from_counts(
    counts: Sequence[int], method: str = "effective_number", beta: Optional[float] = None
) -> List[float]:
    """Classification weights that favour rare classes, for ``roi_head.class_weight``.

    Args:
        counts: the number of objects (ground-truth instances) of each *foreground* class in the
            training set, in label order: ``counts[0]`` is label 1, ``counts[K - 1]`` label K.
            Non-negative integers. A class with count 0 (no training object) is weighted as the
            rarest class that has objects: it gets the largest weight, never an infinite one.
        method: how a count ``n`` becomes a weight, before normalisation:

            * ``"effective_number"`` (Cui et al., "Class-Balanced Loss Based on Effective Number
              of Samples", CVPR 2019): ``w = (1 - beta) / (1 - beta**n)``, the inverse of the
              effective number of samples ``(1 - beta**n) / (1 - beta)``.
            * ``"inverse_sqrt"``: ``w = n ** -0.5``.
        beta: the effective-number parameter, in [0, 1); None means 0.999. 0 gives equal weights;
            towards 1 the weights approach inverse frequency (the paper uses 0.999 and 0.9999).
            Only ``"effective_number"`` reads it: given with another method it is an error.

    Returns:
        ``K + 1`` floats for a model with ``K + 1`` classes: background first with weight 1.0,
        then the foreground weights scaled so that their mean over the K classes is 1 (the
        overall loss scale stays that of the unweighted loss for a balanced set). Pass the list
        as ``roi_head.class_weight``; with ``roi_head.cls_loss: focal`` it is the focal loss's
        per-class alpha.

    Raises:
        ValueError: (one line, naming the argument) for negative or non-integer counts, an empty
            list or all-zero counts, ``beta`` outside [0, 1) or given for ``"inverse_sqrt"``, or an
            unknown ``method``.

    Example:
        >>> class_weights_from_counts([1000, 10], method="inverse_sqrt")  # doctest: +ELLIPSIS
        [1.0, 0.1818..., 1.8181...]
    """
    if method not in CLASS_WEIGHT_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, CLASS_WEIGHT_METHODS))}, got {method!r}")
    if beta is not None and method != "effective_number":
        raise ValueError(f"beta is the effective_number parameter: method {method!r} does not read it; drop beta")
    beta = 0.999 if beta is None else beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    n = _check_counts(counts)
    rarest = min(c for c in n if c > 0)
    n = [c if c > 0 else rarest for c in n]
    if method == "effective_number":
        # -expm1(n * log(beta)) is 1 - beta**n without cancellation when beta**n is near 1.
        raw = [1.0 if beta == 0 else (1 - beta) / -math.expm1(c * math.log(beta)) for c in n]
    else:
        raw = [c**-0.5 for c in n]
    scale = len(raw) / sum(raw)
    return [1.0] + [w * scale for w in raw]
