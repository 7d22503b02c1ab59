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
    "Advice",
    "decide",
    "known",
    "number",
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


def number(x: float) -> str:
    """A finite value as the summaries print it: ``32``, ``163.8``, ``12346``."""
    if float(x).is_integer() and abs(x) < 1e7:
        return f"{int(x)}"
    return f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}"


def known(b_simple: float, lower: float, upper: float) -> bool:
    """The one meaning of "known" (README): B_simple has a value because its 95% interval is
    bounded (|G|² significantly above zero); ``gns/b_simple`` is NaN ("not yet known")
    otherwise. Advice needs more: an interval within :data:`MAX_SPREAD` (:func:`decide`)."""
    return (
        math.isfinite(b_simple)
        and b_simple > 0
        and math.isfinite(lower)
        and lower >= 0
        and math.isfinite(upper)
    )


def _round_down(value: float, multiple_of: int | None) -> int:
    """The largest power of two (or positive multiple of ``multiple_of``) at most ``value``,
    at least the smallest one."""
    if multiple_of is not None:
        return max(1, math.floor(value / multiple_of)) * multiple_of
    return 2 ** max(0, math.floor(math.log2(value)))


def _next_up(batch: float, multiple_of: int | None) -> int:
    """The smallest power of two (or multiple of ``multiple_of``) above ``batch``."""
    if multiple_of is not None:
        return (math.floor(batch / multiple_of) + 1) * multiple_of
    return 2 ** (math.floor(math.log2(batch)) + 1)


def _spread(ratio: float) -> str:
    """The interval's spread, with the digits that show it above :data:`MAX_SPREAD`
    (1.5045 is "1.505", not "1.5")."""
    digits = 3
    while f"{ratio:.{digits}g}" == f"{MAX_SPREAD:.{digits}g}" and digits < 8:
        digits += 1
    return f"{ratio:.{digits}g}"


def _reason(lower: float, upper: float, b_simple: float) -> str:
    """Why an interval gives no recommendation, in the order the checks fail."""
    if not math.isfinite(lower):
        return "no 95% interval yet (it needs two effective steps)"
    if not math.isfinite(upper):
        return "|G|² is not significantly above zero, so the 95% interval has no upper end"
    if lower <= 0:
        return f"the 95% interval ({number(lower)} to {number(upper)}) reaches down to zero"
    if not precise(lower, upper):
        return (
            f"the 95% interval spans {_spread(upper / lower)}x, more than the "
            f"{MAX_SPREAD:g}x that advice needs"
        )
    return "no B_simple value"  # a precise interval without its point: logs cut short


@dataclass(frozen=True)
class Advice:
    """What the data say about the batch size, from :func:`decide`.

    ``kind`` is ``"recommend"`` (the interval is precise: ``size`` is the recommendation),
    ``"grow"`` (only a lower bound, far enough above the batch used: grow to at least
    ``size``, always above it) or ``"none"`` (``reason`` says why; ``size`` is the batch used).
    ``size`` is what ``gns/optimal_batch_size`` logs; ``efficiency`` is NaN unless
    ``"recommend"``. :meth:`headline` and :meth:`sentence` are the words every summary prints.
    """

    kind: str
    b_simple: float  # NaN while not known
    lower: float
    upper: float
    batch_size: float
    size: float
    efficiency: float = math.nan
    reason: str = ""
    multiple_of: int | None = None

    @property
    def known(self) -> bool:
        """Whether B_simple has a value (:func:`known`)."""
        return math.isfinite(self.b_simple)

    @property
    def recommended(self) -> int | None:
        return int(self.size) if self.kind == "recommend" else None

    @property
    def grow_to(self) -> int | None:
        return int(self.size) if self.kind == "grow" else None

    def headline(self) -> str:
        """``B_simple 163.8 (95% interval 134.9 to 203.8)``, or its bound while not known."""
        lo, hi = self.lower, self.upper
        if self.known:
            return f"B_simple {number(self.b_simple)} (95% interval {number(lo)} to {number(hi)})"
        if math.isfinite(lo) and lo > 0:
            return (
                f"B_simple not yet known: at least {number(lo)} (95%); "
                "|G|² is not yet above its noise"
            )
        return "B_simple not yet known: too few steps, or the gradient is all noise so far"

    def sentence(self, step: int | None = None) -> str:
        """The advice in one sentence (no final period); ``step`` names the read-out."""
        batch, lo = self.batch_size, self.lower
        used = f"batch size {number(batch)}" if math.isfinite(batch) else "the batch size used"
        if self.kind == "recommend":
            text = f"recommended batch size {number(self.size)}"
            if not math.isfinite(batch):
                return text + " (the batch size used is unknown)"
            if self.size == batch:
                return text + f": the batch size used, at {self.efficiency:.0%} efficiency"
            return text + f"; {used} is at {self.efficiency:.0%} efficiency"
        bound = f"B_noise is at least {number(lo)} (95%)"
        if self.kind == "grow":
            return f"{bound}, above {used}: grow it to at least {number(self.size)}"
        at = f" at step {step}" if step is not None else ""
        text = f"no advice{at}: {self.reason}"
        if math.isfinite(lo) and lo > 0:
            if math.isfinite(batch) and batch < lo:
                up = number(_next_up(batch, self.multiple_of))
                return (
                    f"{text}; {bound}, above {used}, but the next batch size, {up}, may be past it"
                )
            return f"{text}; {bound}"
        return text


def decide(
    b_simple: float,
    lower: float,
    upper: float,
    batch_size: float,
    multiple_of: int | None = None,
) -> Advice:
    """The advice for one read-out: the only place that decides it. The callback's summary
    and its logged ``gns/optimal_batch_size`` and ``gns/efficiency``, ``make demo``, the
    analyzer and ``lightning-gns report`` all call it with the same values.

    - **recommend** when B_simple is :func:`known` and the 95% interval spans at most
      :data:`MAX_SPREAD` (:func:`lightning_gns.estimator.precise`): B_simple rounded
      (:func:`optimal_batch_size`), never above twice the lower bound (efficiency stays ≥ 89%
      even if B_noise is at the low end of the interval);
    - **grow** when only a lower bound L is known, above the batch used B, and L rounded down
      (to a power of two or ``multiple_of``: never past what is known) is above B: grow to
      at least that;
    - **none** otherwise: the batch used stays what the data support, and ``reason`` says why.

    Examples:
        >>> a = decide(52.15, 44.85, 61.81, batch_size=32)
        >>> a.kind, a.size, a.sentence()
        ('recommend', 64.0, 'recommended batch size 64; batch size 32 is at 94% efficiency')
        >>> decide(float("nan"), 43.76, float("inf"), batch_size=4).sentence()
        'B_noise is at least 43.76 (95%), above batch size 4: grow it to at least 32'
        >>> decide(float("nan"), 40.0, float("inf"), batch_size=32).kind  # 64 may be past it
        'none'
    """
    b = b_simple if known(b_simple, lower, upper) else math.nan
    m = multiple_of
    if math.isfinite(b) and precise(lower, upper):
        rec = optimal_batch_size(b, m)
        if rec > 2 * lower:
            rec = optimal_batch_size(lower, m)
        eff = float(efficiency(batch_size, b)) if _usable(batch_size) else math.nan
        return Advice("recommend", b, lower, upper, batch_size, float(rec), eff, "", m)
    reason = _reason(lower, upper, b)
    if _usable(batch_size) and math.isfinite(lower) and lower > batch_size:
        grow = _round_down(lower, m)
        if grow > batch_size:
            return Advice("grow", b, lower, upper, batch_size, float(grow), math.nan, reason, m)
    return Advice("none", b, lower, upper, batch_size, float(batch_size), math.nan, reason, m)


def _usable(batch_size: float) -> bool:
    return math.isfinite(batch_size) and batch_size > 0


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
    try:
        import pandas as pd  # only the table needs pandas; the package imports without it
    except ImportError:
        raise ModuleNotFoundError(
            'efficiency_table needs pandas: pip install "lightning-gns[report]"', name="pandas"
        ) from None

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
