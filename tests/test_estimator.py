"""The math: unbiased |G|² and tr(Σ) on synthetic gradients with a known covariance."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gns.estimator import (
    GNSValues,
    grad_norm_sq,
    harmonic_batch_size,
    pooled_estimates,
    precise,
    trace_cov,
)
from lightning_gns.tracker import GNSTracker

D = 50


def synthetic(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A mean gradient G and a diagonal covariance Σ with known |G|² and tr(Σ)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(D, generator=gen, dtype=torch.float64) * 0.3
    var = torch.rand(D, generator=gen, dtype=torch.float64) * 2.0
    return g, var


class Ema:
    """One column of the tracker: a bias-corrected EMA (``decay``) or a running mean (None)."""

    def __init__(self, decay: float | None = 0.99) -> None:
        self.tracker = GNSTracker(decay, running_mean=decay is None)

    def update(self, g2: torch.Tensor, tr: torch.Tensor) -> None:
        self.tracker.update(g2.reshape(-1, 1), tr.reshape(-1, 1))

    @property
    def state(self) -> torch.Tensor:
        return self.tracker.moments[0]

    def read(self) -> GNSValues:
        return self.tracker.read()["model"]


def sample_batch_means(g, var, b: int, n: int, gen) -> torch.Tensor:
    """n batch means of b examples each: rows ~ N(G, Σ/b) built from per-example draws."""
    x = g + torch.randn(n, b, D, generator=gen, dtype=torch.float64) * var.sqrt()
    return x.mean(1)


@pytest.mark.parametrize("b_small,k", [(1, 8), (4, 4), (16, 2)])
def test_per_step_estimates_are_unbiased(b_small: int, k: int) -> None:
    g, var = synthetic()
    true_g2, true_tr = float(g.square().sum()), float(var.sum())
    gen = torch.Generator().manual_seed(1)
    trials = 4000
    x = g + torch.randn(trials, k, b_small, D, generator=gen, dtype=torch.float64) * var.sqrt()
    small = x.mean(2)  # (trials, k, D): k small batches per step
    big = small.mean(1)  # the big batch is their mean
    small_sq = small.square().sum(-1).mean(1)
    big_sq = big.square().sum(-1)
    b_big = k * b_small
    est_g2 = grad_norm_sq(small_sq, big_sq, b_small, b_big)
    est_tr = trace_cov(small_sq, big_sq, b_small, b_big)
    for est, truth in ((est_g2, true_g2), (est_tr, true_tr)):
        se = float(est.std() / math.sqrt(trials))
        assert abs(float(est.mean()) - truth) < 4 * se, (float(est.mean()), truth, se)
    # A biased alternative (plain |G_big|²) is detectably off: the test can fail.
    se_big = float(big_sq.std() / math.sqrt(trials))
    assert abs(float(big_sq.mean()) - true_g2) > 4 * se_big


def test_harmonic_batch_size_makes_uneven_batches_unbiased() -> None:
    g, var = synthetic(2)
    gen = torch.Generator().manual_seed(3)
    sizes, trials = [8, 8, 8, 3], 6000
    means = [sample_batch_means(g, var, b, trials, gen) for b in sizes]
    small_sq = torch.stack([m.square().sum(-1) for m in means]).mean(0)
    big = torch.stack(means).mean(0)  # Lightning averages micro-batch means
    b_small = harmonic_batch_size(sizes)
    b_big = len(sizes) * b_small
    est = trace_cov(small_sq, big.square().sum(-1), b_small, b_big)
    se = float(est.std() / math.sqrt(trials))
    assert abs(float(est.mean()) - float(var.sum())) < 4 * se
    with pytest.raises(ValueError):
        harmonic_batch_size([4, 0])


def test_ema_bias_correction_and_ratio_after_smoothing() -> None:
    est = Ema(0.9)
    est.update(torch.tensor(2.0), torch.tensor(10.0))
    v = est.read()
    # One update: the bias-corrected EMA equals the value itself (no shrink towards 0).
    assert v.grad_norm_sq == pytest.approx(2.0) and v.grad_variance == pytest.approx(10.0)
    est.update(torch.tensor(-1.0), torch.tensor(20.0))
    v = est.read()
    w1, w2 = 0.1 * 0.9, 0.1
    mg = (2.0 * w1 - 1.0 * w2) / (w1 + w2)
    ms = (10.0 * w1 + 20.0 * w2) / (w1 + w2)
    assert v.grad_norm_sq == pytest.approx(mg)  # a negative step value is kept, not clamped
    assert v.b_simple == pytest.approx(ms / mg)  # ratio of the smoothed values
    assert v.steps == 2 and v.skipped == 0


def test_non_positive_grad_norm_reads_as_unknown_and_never_raises() -> None:
    est = Ema(0.5)
    est.update(torch.tensor(-3.0), torch.tensor(5.0))
    v = est.read()
    assert v.grad_norm_sq == pytest.approx(-3.0)
    assert math.isnan(v.b_simple) and math.isnan(v.b_simple_se)
    assert math.isnan(Ema().read().b_simple)  # before any step


def test_non_finite_steps_are_skipped_and_counted() -> None:
    est = Ema(0.9)
    est.update(torch.tensor(1.0), torch.tensor(4.0))
    before = est.state.clone()
    est.update(torch.tensor(float("inf")), torch.tensor(4.0))
    est.update(torch.tensor(1.0), torch.tensor(float("nan")))
    assert torch.equal(est.state[:7], before[:7])
    v = est.read()
    assert v.steps == 1 and v.skipped == 2 and v.b_simple == pytest.approx(4.0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5, "0.9"])
def test_invalid_decay_is_rejected(bad) -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        GNSTracker(ema_decay=bad)


def test_standard_error_matches_spread_across_runs() -> None:
    """The delta-method SE of the smoothed ratio predicts the spread over independent runs."""
    g, var = synthetic(4)
    gen = torch.Generator().manual_seed(5)
    b_small, k, steps, runs = 4, 4, 300, 120
    ratios, ses = [], []
    x = g + torch.randn(runs, steps, k, b_small, D, generator=gen, dtype=torch.float64) * var.sqrt()
    small = x.mean(3)
    small_sq = small.square().sum(-1).mean(2)
    big_sq = small.mean(2).square().sum(-1)
    g2 = grad_norm_sq(small_sq, big_sq, b_small, k * b_small)
    tr = trace_cov(small_sq, big_sq, b_small, k * b_small)
    for r in range(runs):
        est = Ema(0.98)
        est.update(g2[r], tr[r])  # the run's steps in one call (equal to one by one, below)
        v = est.read()
        ratios.append(v.b_simple)
        ses.append(v.b_simple_se)
    spread = torch.tensor(ratios).std().item()
    mean_se = sum(ses) / len(ses)
    assert 0.7 < mean_se / spread < 1.4, (mean_se, spread)


def test_tracker_state_round_trip() -> None:
    tracker = GNSTracker(ema_decay=0.95, columns=["model", "layer"])
    gen = torch.Generator().manual_seed(0)
    tracker.update(torch.rand(5, 2, generator=gen, dtype=torch.float64) + 1, torch.rand(5, 2) * 3)
    other = GNSTracker(ema_decay=0.5, columns=["layer", "model", "new"])
    other.load_state_dict(tracker.state_dict())
    assert other.ema_decay == 0.5  # the decay is the new tracker's own
    assert torch.equal(other.moments[0], tracker.moments[1])
    assert torch.equal(other.moments[1], tracker.moments[0])
    assert other.read()["new"] == GNSValues.unknown()
    assert other.read()["model"] == tracker.read()["model"]


@pytest.mark.parametrize("decay", [0.9, None])
def test_batched_updates_equal_sequential_updates(decay) -> None:
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(37, generator=gen, dtype=torch.float64)
    s = torch.randn(37, generator=gen, dtype=torch.float64) + 3
    g[5] = float("inf")
    s[11] = float("nan")
    one, many = Ema(decay), Ema(decay)
    one.update(torch.tensor(0.5), torch.tensor(2.0))
    many.update(torch.tensor(0.5), torch.tensor(2.0))
    for gi, si in zip(g, s, strict=True):
        one.update(gi, si)
    many.update(g[:20], s[:20])
    many.update(g[20:], s[20:])
    torch.testing.assert_close(many.state, one.state, rtol=1e-12, atol=1e-12)
    assert many.read().skipped == 2


def test_adaptive_window_does_not_lag_behind_a_moving_noise_scale() -> None:
    """B_simple jumps from 50 to 150; the short window is imprecise, the long one precise but
    mostly old: the read-out must not report the old value as known (Lepski's rule)."""
    gen = torch.Generator().manual_seed(0)
    before, after = 2000, 300
    ratio = torch.cat([torch.full((before,), 50.0), torch.full((after,), 150.0)]).double()
    g = 1.0 + 1.8 * torch.randn(before + after, generator=gen, dtype=torch.float64)
    s = ratio * (1.0 + 0.3 * torch.randn(before + after, generator=gen, dtype=torch.float64))
    tracker = GNSTracker(columns=["model"])  # the adaptive default
    tracker.update(g.unsqueeze(1), s.unsqueeze(1))
    v = tracker.read()["model"]
    assert not (v.precise and abs(v.b_simple / 150 - 1) > 0.25), v
    assert not v.precise and v.b_simple_lower > 100  # the bound says: far above the old 50
    # A fixed long window lags: it reports a precise, wrong value.
    long = GNSTracker(ema_decay=0.999, columns=["model"])
    long.update(g.unsqueeze(1), s.unsqueeze(1))
    lagging = long.read()["model"]
    assert lagging.precise and lagging.b_simple < 100


def test_precise_is_the_one_bar_for_acting() -> None:
    assert precise(10.0, 15.0) and not precise(10.0, 15.01)
    assert not precise(0.0, 1.0) and not precise(10.0, math.inf) and not precise(math.nan, 3.0)
    assert GNSValues(12, 1, 10.0, 14.0, 1, 12, 5, 0).precise
    assert not GNSValues(12, 1, 10.0, 16.0, 1, 12, 5, 0).precise


def test_pooled_records_give_the_estimates_of_all_small_batches_together() -> None:
    """Two processes' sums of squared small-batch norms pooled = one process holding all."""
    g, var = synthetic(6)
    gen = torch.Generator().manual_seed(7)
    sizes = [[8, 8, 3], [8, 5, 8]]  # micro-batches on two processes
    means = [[sample_batch_means(g, var, b, 1, gen)[0] for b in ranks] for ranks in sizes]
    flat = [m for ranks in means for m in ranks]
    big = torch.stack(flat).mean(0).square().sum()  # DDP: the mean of all micro-batch means
    rows = []
    for ranks, ms in zip(sizes, means, strict=True):
        small_sum = sum(float(m.square().sum()) for m in ms)
        inv = sum(1.0 / b for b in ranks)
        rows.append([small_sum, float(big) / 2, len(ranks), inv, len(ranks), inv])
    pooled = torch.tensor(rows, dtype=torch.float64).sum(0, keepdim=True)
    g2, tr = pooled_estimates(*(pooled[:, i : i + 1] for i in range(6)))
    all_sizes = [b for ranks in sizes for b in ranks]
    small_sq = sum(float(m.square().sum()) for m in flat) / len(flat)
    b_small = harmonic_batch_size(all_sizes)
    b_big = len(all_sizes) * b_small
    assert float(g2) == pytest.approx(grad_norm_sq(small_sq, float(big), b_small, b_big))
    assert float(tr) == pytest.approx(trace_cov(small_sq, float(big), b_small, b_big))
