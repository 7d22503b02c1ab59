"""Unbiased estimates of |G|² and tr(Σ), their bias-corrected EMA, and intervals (pure math).

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162),
Appendix A: for a gradient averaged over B examples, E|G_B|² = |G|² + tr(Σ)/B. Two batch
sizes b_small < b_big give two equations and so unbiased estimates of |G|² and tr(Σ).
B_simple = tr(Σ)/|G|² (eq. 2.9) is then the ratio of the smoothed estimates.

Everything here is plain ``torch`` on whatever device the inputs live on: no Lightning, no
``torch.distributed``, no host synchronisation in :func:`ema_update` or
:func:`pooled_estimates`; :func:`values_from_moments` works on host floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T", Tensor, float)  # the formulas work on floats and on tensors alike

# Layout of a state row: smoothed moments that average linearly across processes, then counts.
FIELDS = ("g", "s", "gg", "ss", "gs", "w", "w2", "steps", "skipped", "stale")
Z_95 = 1.959963984540054  # two-sided 95% normal quantile
# B_simple is precise enough to act on when its 95% interval spans at most this factor
# (upper ≤ 1.5 × lower, about ±20%); otherwise advice is given on the lower bound only.
PRECISION = 1.5
# The adaptive window: EMAs at these decays (about 100, 1,000 and 10,000 steps) run side by
# side; the read-out takes the shortest one whose interval spans at most TARGET (about ±11%),
# else the longest one that agrees with all shorter ones.
ADAPTIVE_DECAYS = (0.99, 0.999, 0.9999)
TARGET = 1.25


def grad_norm_sq(small_sq: T, big_sq: T, b_small: T | float, b_big: T | float) -> T:
    """Unbiased |G|²: (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small) (App. A, eq. A.2)."""
    return (b_big * big_sq - b_small * small_sq) / (b_big - b_small)


def trace_cov(small_sq: T, big_sq: T, b_small: T | float, b_big: T | float) -> T:
    """Unbiased tr(Σ): (|G_small|² − |G_big|²)/(1/B_small − 1/B_big) (App. A, eq. A.3)."""
    return (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)


def pooled_estimates(
    small_sum: Tensor,
    big_sq: Tensor,
    small_count: Tensor,
    small_inv: Tensor,
    big_count: Tensor,
    big_inv: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per-step unbiased |G|² and tr(Σ) from step records summed over processes
    (:mod:`lightning_gns.records`): the mean small-batch |g|² over all small batches, with
    B_small = count/Σ(1/b) and B_big = M²/Σ(1/b_j). Non-finite where a step is not usable."""
    b_small = small_count / small_inv
    b_big = big_count * big_count / big_inv
    small = small_sum / small_count
    return grad_norm_sq(small, big_sq, b_small, b_big), trace_cov(small, big_sq, b_small, b_big)


def harmonic_batch_size(sizes: list[int]) -> float:
    """The B with 1/B = mean(1/b_i): E[mean_i |G_{b_i}|²] = |G|² + tr(Σ)/B for uneven batches."""
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"batch sizes must be positive, got {sizes}")
    return len(sizes) / sum(1.0 / b for b in sizes)


def check_decay(ema_decay: object) -> float | None:
    """``ema_decay`` as a float in (0, 1), or None."""
    if ema_decay is None:
        return None
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)):
        raise ValueError(f"ema_decay must be a float in (0, 1), got {ema_decay!r}; e.g. 0.99")
    if not 0.0 < float(ema_decay) < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}; e.g. 0.99")
    return float(ema_decay)


def new_state(columns: int = 1, device: torch.device | str | None = None) -> Tensor:
    """Empty moments: one row of :data:`FIELDS` per estimated quantity (model, layers)."""
    return torch.zeros(columns, len(FIELDS), dtype=torch.float64, device=device)


def _suffix_products(x: Tensor) -> Tensor:
    """out_i = Π_{j>i} x_j along dim 0 (1 for the last row)."""
    tail = torch.flip(torch.cumprod(torch.flip(x[1:], [0]), 0), [0])
    return torch.cat([tail, torch.ones_like(x[:1])])


def ema_update(
    state: Tensor, grad_norm_sq: Tensor, trace_cov: Tensor, ema_decay: float | Tensor | None
) -> Tensor:
    """The state after one bias-corrected EMA update per row of ``(n, C)`` step estimates.

    A step counts with f = 1 (finite) or is skipped with f = 0: keep = 1 − (1 − β)f and
    add = (1 − β)f; with ``ema_decay`` None (or β = 1 in a per-column tensor of decays) every
    weight is 1 (a running mean). A few vector ops, no host sync. ``stale`` counts the steps
    since the last finite one.
    """
    g = grad_norm_sq.detach().to(state).reshape(grad_norm_sq.shape[0], -1)
    s = trace_cov.detach().to(state).reshape(g.shape)
    if g.shape[0] == 0:
        return state
    ok = torch.isfinite(g) & torch.isfinite(s)
    g, s = torch.where(ok, g, 0.0), torch.where(ok, s, 0.0)
    f = ok.to(state.dtype)
    if ema_decay is None:
        keep, add = torch.ones_like(f), f
    else:
        beta = torch.as_tensor(ema_decay, dtype=state.dtype, device=state.device)
        keep = 1.0 - (1.0 - beta) * f
        add = torch.where(beta >= 1.0, f, (1.0 - beta) * f)
    # Weight of step i in the final state: add_i · Π_{j>i} keep_j; the old state: Π keep_j.
    w = add * _suffix_products(keep)
    w2 = add * add * _suffix_products(keep * keep)
    x = torch.stack([g, s, g * g, s * s, g * s, torch.ones_like(g)])  # (6, n, C)
    out = state.clone()
    out[:, :6] = state[:, :6] * keep.prod(0).unsqueeze(1) + torch.einsum("knc,nc->ck", x, w)
    out[:, 6] = state[:, 6] * (keep * keep).prod(0) + w2.sum(0)
    out[:, 7] = state[:, 7] + f.sum(0)
    out[:, 8] = state[:, 8] + (1.0 - f).sum(0)
    n = g.shape[0]
    pos = torch.arange(n, device=g.device, dtype=state.dtype).unsqueeze(1)
    last = torch.where(ok, pos, -1.0).amax(0)  # index of the last finite step, −1 if none
    out[:, 9] = torch.where(last >= 0, n - 1 - last, state[:, 9] + n)
    return out


@dataclass(frozen=True)
class GNSValues:
    """Read-out of the smoothed estimates (host floats).

    ``b_simple`` is tr(Σ)/|G|² of the smoothed values; NaN while the smoothed |G|² is not
    positive. ``b_simple_lower``/``b_simple_upper`` bound a 95% Fieller interval for the ratio
    (``upper`` is inf while |G|² is not significantly above zero: then only the lower bound is
    known); ``b_simple_se`` is the delta-method standard error. Both need at least two
    effective steps: NaN before (unknown, never a false zero).
    """

    b_simple: float
    b_simple_se: float
    b_simple_lower: float
    b_simple_upper: float
    grad_norm_sq: float
    grad_variance: float
    steps: int
    skipped: int
    stale: int = 0
    window: float = math.nan  # effective number of steps behind the smoothed values

    @staticmethod
    def unknown(steps: int = 0, skipped: int = 0, stale: int = 0) -> GNSValues:
        nan = math.nan
        return GNSValues(nan, nan, nan, nan, nan, nan, steps, skipped, stale)

    @property
    def precise(self) -> bool:
        """Whether the 95% interval is precise enough to act on (:func:`precise`)."""
        return precise(self.b_simple_lower, self.b_simple_upper)


def precise(lower: float, upper: float) -> bool:
    """The one test of "precise enough to act on": a 95% interval of B_simple that spans at
    most :data:`PRECISION` (upper ≤ 1.5 × lower; a relative 1e-6 slack, so bounds read back
    from float32 logs such as TensorBoard's decide as the callback did)."""
    return math.isfinite(upper) and lower > 0 and upper <= PRECISION * lower * (1 + 1e-6)


def _bounds(v: GNSValues) -> tuple[float, float]:
    lo = v.b_simple_lower if math.isfinite(v.b_simple_lower) else 0.0
    hi = v.b_simple_upper if not math.isnan(v.b_simple_upper) else math.inf
    return lo, hi


def choose_window(candidates: list[GNSValues]) -> GNSValues:
    """The adaptive window, from candidates ordered from the shortest window to the longest.

    Lepski's rule: a longer window is admissible only while its interval overlaps the interval
    of every shorter one (otherwise B_simple has moved and the long window would lag). Take the
    shortest admissible window whose interval spans at most :data:`TARGET`; when none does,
    the longest admissible one (the most data: the tightest interval, the best lower bound).
    """
    chosen, seen = candidates[0], list[tuple[float, float]]()
    for values in candidates:
        lo, hi = _bounds(values)
        if any(lo > s_hi or s_lo > hi for s_lo, s_hi in seen):
            break
        chosen = values
        if lo > 0 and hi <= TARGET * lo:
            break
        seen.append((lo, hi))
    return chosen


def t_quantile(dof: float, z: float = Z_95) -> float:
    """Student-t quantile from the normal one (Cornish-Fisher, two terms; exact as dof → ∞)."""
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def fieller_interval(
    s: float, g: float, var_s: float, var_g: float, cov: float, t: float
) -> tuple[float, float]:
    """Confidence set of R = E[s]/E[g] from {R: (s − R g)² ≤ t² Var(s − R g)} (Fieller 1954),
    intersected with R > 0: (lower, upper), upper = inf when g is not significantly positive."""
    a = g * g - t * t * var_g
    b = s * g - t * t * cov
    c = s * s - t * t * var_s
    disc = b * b - a * c
    if a > 0:  # g significantly non-zero: a bounded interval
        if disc < 0:
            return math.nan, math.nan
        root = math.sqrt(disc)
        lo, hi = (b - root) / a, (b + root) / a
        if hi <= 0:
            return 0.0, 0.0
        return max(lo, 0.0), hi
    # Unbounded: the set is outside the roots (or everything); only a lower bound can be known.
    if disc <= 0 or a == 0:
        return 0.0, math.inf
    root = math.sqrt(disc)
    r1, r2 = sorted(((b - root) / a, (b + root) / a))
    return (r2 if r1 <= 0 < r2 else 0.0), math.inf


def values_from_moments(
    g: float,
    s: float,
    gg: float,
    ss: float,
    gs: float,
    w: float,
    w2: float,
    steps: float,
    skipped: float,
    stale: float = 0.0,
) -> GNSValues:
    """Bias-corrected means, B_simple = tr(Σ)/|G|², its 95% interval and standard error.

    With normalised weights w_i, Var(mean) = Σw_i² · Var(step) (steps as independent), and the
    weighted step variance is unbiased after division by 1 − Σw_i² (n_eff = 1/Σw_i² steps).
    """
    counts = int(steps), int(skipped), int(stale)
    if w <= 0:
        return GNSValues.unknown(*counts)
    window = w * w / w2 if w2 > 0 else math.nan
    mg, ms = g / w, s / w
    ratio = ms / mg if mg > 0 else math.nan
    shrink = w2 / (w * w)  # Σ (w_i/Σw)²
    if shrink >= 1.0 - 1e-12:  # one effective step: no spread to measure
        return GNSValues(ratio, math.nan, math.nan, math.nan, mg, ms, *counts, window)
    k = shrink / (1.0 - shrink)  # Var(mean) per unit biased step variance
    var_g = max(gg / w - mg * mg, 0.0) * k
    var_s = max(ss / w - ms * ms, 0.0) * k
    cov = (gs / w - mg * ms) * k
    n_eff = 1.0 / shrink
    lower, upper = fieller_interval(ms, mg, var_s, var_g, cov, t_quantile(n_eff - 1.0))
    se = math.nan
    if mg > 0:
        rel = var_s / ms**2 + var_g / mg**2 - 2 * cov / (ms * mg) if ms != 0 else math.nan
        se = abs(ratio) * math.sqrt(max(rel, 0.0))
    return GNSValues(ratio, se, lower, upper, mg, ms, *counts, window)
