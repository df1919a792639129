"""The checks of loss config values, shared by tv_lossfix.config and the loss registrations of
tv_lossfix.cls_losses (each registered loss parameter names its check). Each takes ``where`` (the
dotted key, for the message) and the value, and returns the value normalised or raises
:class:`LossConfigError` naming the key."""

import math
from typing import Any, Tuple

from ._suggest import did_you_mean

__all__ = [
    "LossConfigError",
    "check_weight",
    "check_positive",
    "check_choice",
    "check_number",
    "check_int",
    "check_count_list",
    "check_alpha",
    "check_focal_gamma",
    "MAX_FOCAL_GAMMA",
]


class LossConfigError(ValueError):
    """A loss config that cannot be used; the message names the offending key."""


def check_weight(where: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LossConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise LossConfigError(f"{where} must be a finite number {bound}, got {value!r}")
    return value


def check_positive(where: str, value: Any) -> float:
    """A finite number > 0."""
    return check_weight(where, value, True)


def check_choice(where: str, value: Any, allowed: Tuple[str, ...]) -> str:
    if value not in allowed:
        tip = did_you_mean(value, allowed)
        raise LossConfigError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}{tip}")
    return value


def check_number(where: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LossConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise LossConfigError(f"{where} must be in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return float(value)


def check_count_list(where: str, value: Any) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise LossConfigError(f"{where} must be a list of image counts, one per foreground class, got {value!r}")
    out = []
    for i, c in enumerate(value):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0 or c != int(c):
            raise LossConfigError(f"{where}[{i}] must be a non-negative integer, got {c!r}")
        out.append(int(c))
    if not out or max(out) == 0:
        raise LossConfigError(f"{where} needs a positive count for at least one class, got {list(value)!r}")
    return tuple(out)


def check_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LossConfigError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def check_alpha(where: str, alpha: Any) -> float:
    # alpha 0 drops every positive anchor's loss, alpha 1 every negative's: both collapse the RPN.
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha == -1 or 0 < alpha < 1):
        raise LossConfigError(f"{where} must be in (0, 1), or -1 for no alpha weighting, got {alpha!r}")
    return float(alpha)


# Beyond it the focal factor (1 - p_t)^gamma is under 0.5^10 ~ 1e-3 for an untrained head (p_t ~ 0.5): the
# loss vanishes. RetinaNet studied gamma in [0, 5].
MAX_FOCAL_GAMMA = 10.0


def check_focal_gamma(where: str, gamma: Any) -> float:
    gamma = check_weight(where, gamma)
    if gamma > MAX_FOCAL_GAMMA:
        raise LossConfigError(
            f"{where} {gamma:g} must be <= {MAX_FOCAL_GAMMA:g}: the factor (1 - p_t)^gamma "
            f"is {0.5**gamma:.1e} at p_t = 0.5 (an untrained head), so the loss is ~0 and nothing "
            f"trains (RetinaNet uses 2)"
        )
    return gamma
