"""Unbiased estimates of |G|² and tr(Σ), and their bias-corrected EMA (pure math).

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162),
Appendix A: for a gradient averaged over B examples, E|G_B|² = |G|² + tr(Σ)/B. Two batch
sizes b_small < b_big give two equations and so unbiased estimates of |G|² and tr(Σ).
B_simple = tr(Σ)/|G|² (eq. 2.9) is then the ratio of the smoothed estimates.

Everything here is plain ``torch`` on whatever device the inputs live on: no Lightning, no
``torch.distributed``, no host synchronisation in :meth:`GNSEstimator.update`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def grad_norm_sq(
    small_sq: Tensor | float, big_sq: Tensor | float, b_small: float, b_big: float
) -> Tensor | float:
    """Unbiased |G|²: (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small) (App. A, eq. A.2)."""
    return (b_big * big_sq - b_small * small_sq) / (b_big - b_small)


def trace_cov(
    small_sq: Tensor | float, big_sq: Tensor | float, b_small: float, b_big: float
) -> Tensor | float:
    """Unbiased tr(Σ): (|G_small|² − |G_big|²)/(1/B_small − 1/B_big) (App. A, eq. A.3)."""
    return (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)


def harmonic_batch_size(sizes: list[int]) -> float:
    """The B with 1/B = mean(1/b_i): E[mean_i |G_{b_i}|²] = |G|² + tr(Σ)/B for uneven batches."""
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"batch sizes must be positive, got {sizes}")
    return len(sizes) / sum(1.0 / b for b in sizes)


@dataclass(frozen=True)
class GNSValues:
    """Read-out of the smoothed estimates (host floats).

    ``b_simple`` is tr(Σ)/|G|² of the smoothed values; NaN while the smoothed |G|² is not
    positive (not yet known). ``b_simple_se`` is its delta-method standard error and
    ``b_simple_debiased`` the ratio with the first-order bias E[S/G] − E[S]/E[G] removed.
    """

    b_simple: float
    b_simple_se: float
    b_simple_debiased: float
    grad_norm_sq: float
    grad_variance: float
    steps: int
    skipped: int


# Layout of the state vector: smoothed moments that average linearly across processes.
_FIELDS = ("g", "s", "gg", "ss", "gs", "w", "w2", "steps", "skipped")


class GNSEstimator:
    """Bias-corrected exponential moving averages of per-step |G|² and tr(Σ) estimates.

    The state is one small float64 tensor on the device, updated with masked arithmetic so a
    step whose inputs are not finite (e.g. an AMP overflow) is dropped and counted without a
    host sync. Per-step estimates are never clamped; only :meth:`read` handles |G|² ≤ 0.

    Args:
        ema_decay: decay β per update, in (0, 1). The effective window is about 1/(1 − β).
            ``None`` weighs all updates equally (a plain running mean).
        device: where the state lives.
    """

    def __init__(
        self, ema_decay: float | None = 0.99, device: torch.device | str | None = None
    ) -> None:
        if ema_decay is not None and not (
            isinstance(ema_decay, (int, float)) and 0.0 < float(ema_decay) < 1.0
        ):
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}; e.g. 0.99")
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.state = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)

    def to(self, device: torch.device | str) -> GNSEstimator:
        self.state = self.state.to(device)
        return self

    def reset(self) -> None:
        self.state.zero_()

    def update(self, grad_norm_sq: Tensor, trace_cov: Tensor) -> None:
        """Add one step's unbiased estimates; non-finite ones are skipped and counted."""
        self.update_many(grad_norm_sq.reshape(1), trace_cov.reshape(1))

    def update_many(self, grad_norm_sq: Tensor, trace_cov: Tensor) -> None:
        """One EMA update per element of two 1-D tensors, in order, in a few vector ops.

        A step counts with f = 1 (finite) or is skipped with f = 0: keep = 1 − (1 − β)f and
        add = (1 − β)f; with ``ema_decay`` None every weight is 1 (a running mean).
        """
        g = grad_norm_sq.detach().to(self.state).reshape(-1)
        s = trace_cov.detach().to(self.state).reshape(-1)
        if g.numel() == 0:
            return
        ok = torch.isfinite(g) & torch.isfinite(s)
        g = torch.where(ok, g, torch.zeros_like(g))
        s = torch.where(ok, s, torch.zeros_like(s))
        f = ok.to(self.state.dtype)
        if self.ema_decay is None:  # running mean: every weight 1
            keep, add = torch.ones_like(f), f
        else:
            keep = 1.0 - (1.0 - self.ema_decay) * f
            add = (1.0 - self.ema_decay) * f
        # Weight of step i in the final state: add_i · Π_{j>i} keep_j; the old state: Π keep_j.
        after, after2 = _suffix_products(keep), _suffix_products(keep * keep)
        w = add * after
        x = torch.stack([g, s, g * g, s * s, g * s, torch.ones_like(g)])
        st = self.state
        st[:6].mul_(keep.prod()).add_(x @ w)
        st[6].mul_((keep**2).prod()).add_((add * add * after2).sum())
        st[7].add_(f.sum())
        st[8].add_((1.0 - f).sum())

    def read(self, state: Tensor | None = None) -> GNSValues:
        """Host read-out (one device-to-host copy). ``state`` may be an all-reduced copy."""
        v = dict(zip(_FIELDS, (state if state is not None else self.state).tolist(), strict=True))
        return values_from_moments(**v)

    def state_dict(self) -> dict[str, float | list[float] | None]:
        return {"ema_decay": self.ema_decay, "state": self.state.tolist()}

    def load_state_dict(self, sd: dict[str, float | list[float] | None]) -> None:
        decay = sd["ema_decay"]
        self.ema_decay = None if decay is None else float(decay)  # type: ignore[arg-type]
        self.state = torch.tensor(sd["state"], dtype=torch.float64, device=self.state.device)


def _suffix_products(x: Tensor) -> Tensor:
    """out_i = Π_{j>i} x_j (1 for the last element)."""
    tail = torch.flip(torch.cumprod(torch.flip(x[1:], [0]), 0), [0])
    return torch.cat([tail, torch.ones_like(x[:1])])


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
) -> GNSValues:
    """Bias-corrected means, then B_simple = tr(Σ)/|G|² with a delta-method error (host math).

    With normalised EMA weights w_i, Var(mean) = Σw_i² · Var(step) (steps taken as independent),
    and E[S/G] ≈ (μ_S/μ_G)(1 + Var G/μ_G² − Cov(S,G)/(μ_S μ_G)).
    """
    nan = math.nan
    if w <= 0:
        return GNSValues(nan, nan, nan, nan, nan, int(steps), int(skipped))
    mg, ms = g / w, s / w
    var_g = max(gg / w - mg * mg, 0.0)
    var_s = max(ss / w - ms * ms, 0.0)
    cov = gs / w - mg * ms
    shrink = w2 / (w * w)  # Σ (w_i/Σw)²: variance of the smoothed mean per unit step variance
    if mg > 0:
        ratio = ms / mg
        rel_g, rel_s = shrink * var_g / mg**2, shrink * var_s / ms**2 if ms != 0 else 0.0
        rel_gs = shrink * cov / (ms * mg) if ms != 0 else 0.0
        se = abs(ratio) * math.sqrt(max(rel_s + rel_g - 2 * rel_gs, 0.0))
        debiased = ratio * (1.0 - rel_g + rel_gs)
    else:
        ratio = se = debiased = nan
    return GNSValues(ratio, se, debiased, mg, ms, int(steps), int(skipped))
