"""Batch-size advice from a measured gradient noise scale.

Pure functions (NumPy / pandas only) implementing the large-batch model of
McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162).

Notation: ``B`` is the batch size (examples per optimizer step) and ``B_noise`` the gradient
noise scale; in practice the measured ``B_simple = tr(Σ)/|G|²`` (logged as ``gns/b_simple``)
stands in for it. ``S``/``E`` are the optimizer steps / training examples needed to reach a
given loss, ``S_min``/``E_min`` their limits for ``B → ∞`` / ``B → 0``.

Scalar inputs give Python floats; array inputs give NumPy arrays (broadcast together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from lightning_gns.estimator import PRECISION, precise

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "MAX_SPREAD",
    "Supported",
    "supported",
    "supported_batch_size",
    "compute_efficiency",
    "critical_batch_size",
    "efficiency",
    "efficiency_table",
    "examples_ratio",
    "optimal_batch_size",
    "step_size_ratio",
    "steps_ratio",
    "temperature",
    "time_efficiency",
    "wasted",
]

FloatOrArray = float | np.ndarray


def _positive(value: ArrayLike, name: str, hint: str) -> np.ndarray:
    """Return ``value`` as a float array after checking every entry is positive and finite."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}; {hint}") from None
    if arr.size == 0:
        raise ValueError(f"{name} is empty; {hint}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        first = arr[bad].flat[0]
        raise ValueError(f"{name} must be positive and finite, got {first!r}; {hint}")
    return arr


def _batch(value: ArrayLike) -> np.ndarray:
    return _positive(value, "batch_size", "pass the number of examples per optimizer step")


def _noise(value: ArrayLike) -> np.ndarray:
    return _positive(
        value, "b_noise", "pass the measured gradient noise scale (e.g. the logged gns/b_simple)"
    )


def _scalar_noise(value: ArrayLike) -> float:
    arr = _noise(value)
    if arr.size != 1:
        raise ValueError(f"b_noise must be a single number here, got {arr.size} values")
    return float(arr.reshape(()))


def _out(result: np.ndarray) -> FloatOrArray:
    """Collapse 0-d arrays to ``float``; leave real arrays alone."""
    return float(result) if np.ndim(result) == 0 else result


def steps_ratio(batch_size: ArrayLike, b_noise: ArrayLike) -> FloatOrArray:
    """Steps needed relative to the minimum: ``S/S_min = 1 + B_noise/B``.

    McCandlish et al. 2018, §2.3, eq. 2.11 (Pareto law S/S_min − 1 = (E/E_min − 1)^−1).
    """
    return _out(1.0 + _noise(b_noise) / _batch(batch_size))


def examples_ratio(batch_size: ArrayLike, b_noise: ArrayLike) -> FloatOrArray:
    """Examples needed relative to the minimum: ``E/E_min = 1 + B/B_noise``.

    McCandlish et al. 2018, §2.3, eq. 2.11/2.12 (E = B·S, B_crit = E_min/S_min).
    """
    return _out(1.0 + _batch(batch_size) / _noise(b_noise))


def time_efficiency(batch_size: ArrayLike, b_noise: ArrayLike) -> FloatOrArray:
    """Fraction of the best possible training time: ``S_min/S = B/(B + B_noise)``.

    McCandlish et al. 2018, §2.3 (steps axis of the Pareto frontier).
    """
    b, n = _batch(batch_size), _noise(b_noise)
    return _out(b / (b + n))


def compute_efficiency(batch_size: ArrayLike, b_noise: ArrayLike) -> FloatOrArray:
    """Fraction of the best possible compute: ``E_min/E = B_noise/(B + B_noise)``.

    McCandlish et al. 2018, §2.3 (examples axis of the Pareto frontier).
    """
    b, n = _batch(batch_size), _noise(b_noise)
    return _out(n / (b + n))


def efficiency(batch_size: ArrayLike, b_noise: ArrayLike) -> FloatOrArray:
    """Balanced efficiency ``4·B·B_noise/(B + B_noise)²`` as a fraction in ``[0, 1]``.

    It is the product of time and compute efficiency, scaled so that it equals 1 at
    ``B = B_noise`` (where both are 50%) and falls off symmetrically in ``log(B/B_noise)``.
    McCandlish et al. 2018, §2.3 (B_crit ≈ B_noise balances steps and examples).
    """
    b, n = _batch(batch_size), _noise(b_noise)
    return _out(4.0 * b * n / (b + n) ** 2)


def step_size_ratio(batch_size: ArrayLike, b_noise: ArrayLike) -> FloatOrArray:
    """Optimal SGD learning rate relative to its large-batch limit: ``ε_opt(B)/ε_max``.

    ``ε_opt(B) = ε_max / (1 + B_noise/B)``; McCandlish et al. 2018, §2.2 (optimal step size).
    """
    b, n = _batch(batch_size), _noise(b_noise)
    return _out(1.0 / (1.0 + n / b))


def critical_batch_size(b_noise: ArrayLike) -> FloatOrArray:
    """Critical batch size ``B_crit ≈ B_noise``: time and compute efficiency are both 50%.

    McCandlish et al. 2018, §2.3 (B_crit = E_min/S_min ≈ B_noise).
    """
    return _out(_noise(b_noise).copy())


def temperature(lr: ArrayLike, batch_size: ArrayLike) -> FloatOrArray:
    """Training temperature ``T = η/B``; keep it fixed when changing B (SGD).

    McCandlish et al. 2018, appendix "Temperature and the Noise Scale" (B_noise ∝ 1/T).
    """
    eta = np.asarray(lr, dtype=float)
    if not np.all(np.isfinite(eta)):
        raise ValueError(f"lr must be finite, got {lr!r}; pass the optimizer's learning rate")
    return _out(eta / _batch(batch_size))


def optimal_batch_size(
    b_noise: float,
    multiple_of: int | None = None,
    min_size: int = 1,
    max_size: int | None = None,
) -> int:
    """Recommended batch size: ``B_noise`` rounded, then clamped to ``[min_size, max_size]``.

    Rounds to the nearest power of two in log space (``16.07 -> 16``, ``23 -> 32``), or to the
    nearest positive multiple of ``multiple_of`` when given. Raises ``ValueError`` for a NaN,
    infinite or non-positive ``b_noise`` (check ``math.isfinite`` first when it may be so).
    McCandlish et al. 2018, §2.3 (the critical batch size B_crit ≈ B_noise).

    Examples:
        >>> optimal_batch_size(91.0), optimal_batch_size(89.0)  # 2^6.5 = 90.5 between them
        (128, 64)
        >>> optimal_batch_size(100.0, multiple_of=48)
        96
    """
    try:
        value = float(b_noise)
    except (TypeError, ValueError):
        raise ValueError(
            f"b_noise must be a positive finite number, got {b_noise!r}; "
            "pass the measured gradient noise scale"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"b_noise must be a positive finite number, got {value!r}; no batch size can be "
            "recommended (the estimate is still noisy: log more steps or average it)"
        )
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size!r}")
    if max_size is not None and max_size < min_size:
        raise ValueError(f"max_size ({max_size!r}) must be >= min_size ({min_size!r})")
    if multiple_of is not None:
        if int(multiple_of) != multiple_of or multiple_of < 1:
            raise ValueError(f"multiple_of must be a positive integer, got {multiple_of!r}")
        step = int(multiple_of)
        size = max(1, math.floor(value / step + 0.5)) * step
    else:
        exponent = math.floor(math.log2(value) + 0.5)  # round half up in log space
        size = 2 ** max(exponent, 0)
    size = max(size, int(min_size))
    if max_size is not None:
        size = min(size, int(max_size))
    return int(size)


# Recommend a batch size only when the 95% interval of B_noise spans at most this factor (the
# same bar as for reporting B_simple as known: about ±20%).
MAX_SPREAD = PRECISION


@dataclass(frozen=True)
class Supported:
    """What the data support: ``kind`` is ``"estimate"`` (a recommendation), ``"at_least"``
    (only a lower bound: B_noise is at least ``lower``) or ``"unknown"``."""

    kind: str
    b_noise: float = math.nan
    lower: float = math.nan
    recommended: int | None = None


def supported(
    b_simple: float, lower: float, upper: float, multiple_of: int | None = None
) -> Supported:
    """Advice from an estimate and its interval: a recommendation only when the interval is
    precise (:func:`lightning_gns.estimator.precise`: upper/lower at most :data:`MAX_SPREAD`),
    and never above twice the lower bound (so efficiency stays ≥ 89% even if B_noise is at the
    low end of the interval); a lower bound alone when that is all the data show. The
    callback's advice and the report's recommendation both come from it.

    Examples:
        >>> supported(52.15, 44.85, 61.81)
        Supported(kind='estimate', b_noise=52.15, lower=44.85, recommended=64)
        >>> supported(float("nan"), 43.76, float("inf"))  # only a lower bound
        Supported(kind='at_least', b_noise=nan, lower=43.76, recommended=None)
    """
    has_lower = math.isfinite(lower) and lower > 0
    if math.isfinite(b_simple) and b_simple > 0 and precise(lower, upper):
        rec = optimal_batch_size(b_simple, multiple_of)
        if rec > 2 * lower:
            rec = optimal_batch_size(lower, multiple_of)
        return Supported("estimate", b_simple, lower, rec)
    if has_lower:
        return Supported("at_least", math.nan, lower)
    return Supported("unknown")


def supported_batch_size(
    verdict: Supported, batch_size: float, multiple_of: int | None = None
) -> float:
    """The batch size the data support now, always a number: the recommendation when the
    estimate is precise; with only a lower bound L, the current batch grown to L rounded down
    (to a power of two or ``multiple_of``: never past what is known) if it is below L; the
    current batch otherwise (the data do not say to change it)."""
    if verdict.recommended is not None:
        return float(verdict.recommended)
    if verdict.kind == "at_least" and batch_size < verdict.lower:
        if multiple_of is not None:
            floor = max(1, math.floor(verdict.lower / multiple_of)) * multiple_of
        else:
            floor = 2 ** max(0, math.floor(math.log2(verdict.lower)))
        return float(max(batch_size, floor))
    return float(batch_size)


def wasted(batch_size: ArrayLike, b_noise: float, recommended: int | None = None) -> dict[str, Any]:
    """Extra steps (time) and extra examples (compute) versus the recommended batch size.

    Percentages relative to training at ``recommended`` (default ``optimal_batch_size``):
    ``extra_steps_pct = 100·(S(B)/S(B_rec) − 1)``, ``extra_examples_pct = 100·(E(B)/E(B_rec) − 1)``.
    Negative values are savings (a larger B needs fewer steps but more examples).
    McCandlish et al. 2018, §2.3 (S/S_min = 1 + B_noise/B, E/E_min = 1 + B/B_noise).
    """
    noise = _scalar_noise(b_noise)
    rec = optimal_batch_size(noise) if recommended is None else recommended
    rec_value = float(_positive(rec, "recommended", "pass one positive batch size").reshape(()))
    steps = _batch(batch_size)
    extra_steps = 100.0 * ((1.0 + noise / steps) / (1.0 + noise / rec_value) - 1.0)
    extra_examples = 100.0 * ((1.0 + steps / noise) / (1.0 + rec_value / noise) - 1.0)
    return {
        "batch_size": _out(steps),
        "b_noise": noise,
        "recommended_batch_size": int(rec_value) if rec_value.is_integer() else rec_value,
        "extra_steps_pct": _out(extra_steps),
        "extra_examples_pct": _out(extra_examples),
    }


def efficiency_table(b_noise: float, batch_sizes: ArrayLike) -> pd.DataFrame:
    """Table of the model's predictions for each batch size at one noise scale.

    Columns: batch_size, steps_ratio (S/S_min), examples_ratio (E/E_min), time_efficiency,
    compute_efficiency, efficiency. McCandlish et al. 2018, §2.3.
    """
    noise = _scalar_noise(b_noise)
    sizes = np.atleast_1d(_batch(batch_sizes)).ravel()
    import pandas as pd  # only the table needs pandas; the package imports without it

    return pd.DataFrame(
        {
            "batch_size": sizes,
            "steps_ratio": steps_ratio(sizes, noise),
            "examples_ratio": examples_ratio(sizes, noise),
            "time_efficiency": time_efficiency(sizes, noise),
            "compute_efficiency": compute_efficiency(sizes, noise),
            "efficiency": efficiency(sizes, noise),
        }
    )
