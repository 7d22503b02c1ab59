"""The growth rules of AdaptiveBatchSize as pure functions (lightning_gns/adaptive/rules.py)."""

from __future__ import annotations

import math
from unittest.mock import ANY

import pytest

from lightning_gns.adaptive.ladder import PROBE_MAX_STEPS, Ladder, Rules
from lightning_gns.adaptive.rules import (
    goodput_rule,
    lower_bound_rule,
    lr_scale,
    noise_rule,
    probe_level,
    second_moment_ratio,
    sqrt_rule,
)
from lightning_gns.estimator import GNSValues


def values(b: float, lower: float, upper: float, steps: int = 100) -> GNSValues:
    return GNSValues(b, math.nan, lower, upper, 1.0, b, steps, 0, 0, 100.0)


UNKNOWN = values(math.nan, math.nan, math.nan)


def test_lower_bound_rule_grows_on_the_bound_and_has_a_dead_band() -> None:
    assert lower_bound_rule(values(900, 300, 2000), 128, 2, 1.0, shrink=True).steps == 1
    assert lower_bound_rule(values(900, 200, 2000), 128, 2, 1.0, shrink=True).steps == 0
    assert lower_bound_rule(values(900, 300, 2000), 128, 2, 2.0, shrink=True).steps == 0  # margin
    assert lower_bound_rule(values(40, 30, 60), 128, 2, 1.0, shrink=True).steps == -1
    assert lower_bound_rule(values(40, 30, 60), 128, 2, 1.0, shrink=False).steps == 0
    # between B/2 and 2B: no change either way (no flapping)
    assert lower_bound_rule(values(128, 100, 200), 128, 2, 1.0, shrink=True).steps == 0
    move = lower_bound_rule(UNKNOWN, 128, 2, 1.0, shrink=True)
    assert move.steps == 0 and "no estimate" in move.reason


def test_sqrt_rule_follows_the_square_root_of_the_noise_scale() -> None:
    ref = (32.0, 100.0)
    assert sqrt_rule(values(400, 380, 420), 32, 2, ref).steps == 1  # B* = 64
    assert sqrt_rule(values(1600, 1500, 1700), 32, 2, ref).steps == 2  # B* = 128: two factors
    assert sqrt_rule(values(150, 140, 160), 32, 2, ref).steps == 0  # B* = 39: within the band
    assert sqrt_rule(values(20, 19, 21), 32, 2, ref).steps == -1  # B* = 14
    # an interval wide enough to allow either move allows none (B* from 16 to 101 here);
    # the point estimate (B* = 64) is never acted on
    move = sqrt_rule(values(400, 25, 1000), 32, 2, ref)
    assert move.steps == 0 and "too uncertain" in move.reason
    # it grows on the lower bound (B* ≥ 32·√(400/100) = 64), not on the estimate (B* = 143)
    assert sqrt_rule(values(2000, 400, 10_000), 32, 2, ref).steps == 1
    # ... and shrinks on the upper bound only (B* ≤ 32·√(20/100) = 14)
    assert sqrt_rule(values(5, 1, 20), 32, 2, ref).steps == -1
    assert sqrt_rule(values(5, 1, 200), 32, 2, ref).steps == 0


def test_sqrt_rule_without_a_reference_grows_on_the_lower_bound() -> None:
    """No estimate within 1.5× yet, so no reference: it never waits on that alone."""
    move = sqrt_rule(values(900, 300, 5000), 128, 2, None)
    assert move.steps == 1 and "no reference yet" in move.reason and "growing" in move.reason
    move = sqrt_rule(values(900, 200, 5000), 128, 2, None)  # 200 < the next batch 256
    assert move.steps == 0 and "at least 200" in move.reason
    assert sqrt_rule(UNKNOWN, 128, 2, None).steps == 0


def test_noise_rule_follows_a_multiple_of_the_noise_scale() -> None:
    assert noise_rule(values(300, 290, 310), 32, 2, 1.0, shrink=False).steps == 3  # 256 ≤ 300
    assert noise_rule(values(300, 290, 310), 32, 2, 0.5, shrink=False).steps == 2  # 128 ≤ 150
    assert noise_rule(values(40, 38, 42), 32, 2, 1.0, shrink=False).steps == 0
    assert noise_rule(values(5, 4, 6), 64, 2, 1.0, shrink=True).steps < 0
    assert noise_rule(values(5, 4, 6), 64, 2, 1.0, shrink=False).steps == 0
    assert noise_rule(UNKNOWN, 32, 2, 1.0, shrink=True).steps == 0
    # on the safe side of the interval: grows to the lower bound 100 (64), not 1,000 (512);
    # shrinks only when the upper bound is more than a factor below
    assert noise_rule(values(1000, 100, 5000), 32, 2, 1.0, shrink=False).steps == 1
    assert noise_rule(values(5, 1, 100), 64, 2, 1.0, shrink=True).steps == 0


def test_goodput_rule_weighs_statistical_efficiency_against_time() -> None:
    big_noise = values(10_000, 9_000, 11_000)
    # a larger batch only repeats or enlarges passes: without a fixed cost per step no gain
    assert goodput_rule(big_noise, 32, 2, timing=(0.0, 1.0)).steps == 0
    # a fixed cost per step (optimizer, communication) makes a larger batch worth it
    assert goodput_rule(big_noise, 32, 2, timing=(5.0, 1.0)).steps == 1
    # ... unless the batch is already beyond the noise scale
    assert goodput_rule(values(16, 15, 17), 32, 2, timing=(5.0, 1.0)).steps <= 0
    assert goodput_rule(big_noise, 32, 2, timing=None).steps == 0


def test_probe_goes_on_at_the_largest_level_its_lower_bound_allows() -> None:
    found = probe_level(values(300, 200, 500, steps=2), 128, 8, 2, 1.0)
    assert found is not None and found[0] == 4  # 8·2⁴ = 128 ≤ 200 < 256; not 256 (≈ 300)
    assert "B_noise ≈ 300 (95% interval 200 to 500)" in found[1]
    assert probe_level(values(3, 2, 5, steps=2), 128, 8, 2, 1.0)[0] == 0  # never below base
    assert probe_level(UNKNOWN, 128, 8, 2, 1.0) is None
    assert probe_level(values(900, -5, 4000, steps=2), 128, 8, 2, 1.0) is None


def test_the_probe_waits_for_a_tight_interval_or_takes_its_bound() -> None:
    """The issue's case: a few probe steps measure B_noise ≈ 1,449 with an interval of 20 to
    4,000: the probe does not jump on the point estimate; it probes on, then takes the bound."""
    ladder = Ladder(2, 64, None, lambda: 8.0, base=(1, None))
    rules = Rules("sqrt", 2, 1.0, 1.0, False, 0)
    wide = values(1449, 20, 4000, steps=3)
    assert rules.after_probe(ladder, wide, (16, None)) is None  # probing on
    late = values(1449, 20, 4000, steps=PROBE_MAX_STEPS)
    decision = rules.after_probe(ladder, late, (16, None))
    assert decision == (2, None, decision[2])  # 16 ≤ 20 < 32
    assert rules.reference == (20.0, 20)  # the bound it took is the sqrt rule's reference too
    tight = values(300, 250, 360, steps=3)  # within 1.5×: goes on at once, sets the reference
    decision = rules.after_probe(ladder, tight, (16, None))
    assert isinstance(decision, str) and decision.endswith("staying")  # 128 ≤ 250 < 256
    assert rules.reference == (300.0, 300)  # multiple × B_noise₀, not the rung 128 below it
    none = values(math.nan, math.nan, math.nan, steps=PROBE_MAX_STEPS)
    assert rules.after_probe(ladder, none, (16, None)) == (1, None, ANY)  # the user's batch


def test_a_step_holds_at_most_an_epoch() -> None:
    """Lightning steps at an epoch's end: with 10 micro-batches of 8 (80 examples) an epoch,
    an accumulation of 16 is a step of the epoch's 80 examples, the ladder climbs no further
    than that, and at the top says why. A short last micro-batch is counted as it is."""
    ladder = Ladder(2, 64, None, lambda: 8.0, base=(1, None), epoch=lambda m: (10, 80))
    assert ladder.batch(16, None) == 80 and ladder.batch(8, None) == 64
    assert ladder.allocate(6, None) == (16, None)  # 512 wanted: 16 holds the whole epoch
    rules = Rules("noise", 2, 1.0, 1.0, False, 0)
    decision = rules.decide(ladder, values(1e6, 9e5, 1.1e6), (16, None), 10, None)
    assert isinstance(decision, str) and "a whole epoch of 10 micro-batches" in decision
    # a resizable micro-batch: 80 examples are 3 micro-batches of 32 (32, 32, 16)
    grown = Ladder(2, 64, 32, lambda: 8.0, base=(1, 8), epoch=lambda m: (-(-80 // m), 80))
    assert grown.allocate(6, 8) == (4, 32) and grown.batch(4, 32) == 80
    assert grown.batch(2, 32) == 64  # (then a step of 16 ends the epoch, as in any run)
    limited = Ladder(2, 64, None, lambda: 8.0, epoch=lambda m: (5, 80))  # limit_train_batches
    assert limited.batch(8, None) == 40


def test_lr_scale_rules() -> None:
    assert lr_scale("linear", 256, 32) == 8
    assert lr_scale("sqrt", 128, 32) == 2
    assert lr_scale("none", 256, 32) == 1
    # AdaScale's gain: ≈ the batch ratio far below B_noise, ≈ 1 far above it
    assert lr_scale("adascale", 256, 32, b_noise=1e9) == pytest.approx(8, rel=1e-6)
    assert lr_scale("adascale", 256, 32, b_noise=1e-6) == pytest.approx(1, rel=1e-6)
    assert 1 < lr_scale("adascale", 256, 32, b_noise=100) < 8


def test_second_moment_ratio_is_the_expected_square_of_the_batch_gradient() -> None:
    # E|G_B|² = |G|²(1 + B_noise/B): far below B_noise a k× batch divides it by k
    assert second_moment_ratio(1e9, 32, 128) == pytest.approx(0.25, rel=1e-6)
    assert second_moment_ratio(1e-9, 32, 128) == pytest.approx(1.0, rel=1e-6)
    assert second_moment_ratio(100, 100, 200) == pytest.approx(1.5 / 2.0)
    assert second_moment_ratio(math.nan, 32, 128) == 1.0


def test_the_sqrt_rule_follows_half_the_geometric_mean_by_default() -> None:
    """Default ``multiple`` ½: B* = ½·√(B_noise₀·B_noise) from the probe's estimate, whatever
    rung the probe's floor went on at (before: B₀ was that rung, so two probes that both go on
    at 128 grew alike later, up to a factor 2 below B*)."""
    ladder = Ladder(2, 256, None, lambda: 8.0, base=(1, None))
    grown = {}
    for noise0, lower0, upper0 in ((300.0, 260.0, 380.0), (450.0, 400.0, 590.0)):
        rules = Rules("sqrt", 2, 0.5, 1.0, False, 0)
        decision = rules.after_probe(ladder, values(noise0, lower0, upper0, steps=3), (16, None))
        assert isinstance(decision, str) and decision.endswith("staying")  # ½ × lower: 128 rung
        assert rules.reference == (0.5 * noise0, noise0)
        later = values(16 * noise0, 15 * noise0, 17 * noise0)
        b_star = 0.5 * math.sqrt(noise0 * 15 * noise0)  # on the lower bound: 581 and 871
        decision = rules.decide(ladder, later, (16, None), 10, None)
        assert not isinstance(decision, str) and decision is not None
        grown[noise0] = decision[0] * 8
        assert grown[noise0] == 128 * 2 ** math.floor(math.log2(b_star / 128) + 0.25)
    assert grown == {300.0: 512, 450.0: 1024}
