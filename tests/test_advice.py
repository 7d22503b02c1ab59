"""The batch-size model of McCandlish et al. 2018 against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_gns import advice


def test_balanced_point_b_equals_b_noise() -> None:
    for b_noise in (1.0, 16.07, 300.0, 1e5):
        assert advice.efficiency(b_noise, b_noise) == pytest.approx(1.0)
        assert advice.time_efficiency(b_noise, b_noise) == pytest.approx(0.5)
        assert advice.compute_efficiency(b_noise, b_noise) == pytest.approx(0.5)
        assert advice.steps_ratio(b_noise, b_noise) == pytest.approx(2.0)
        assert advice.examples_ratio(b_noise, b_noise) == pytest.approx(2.0)
        assert advice.step_size_ratio(b_noise, b_noise) == pytest.approx(0.5)


def test_hand_values() -> None:
    assert advice.steps_ratio(32, 16) == pytest.approx(1.5)
    assert advice.examples_ratio(32, 16) == pytest.approx(3.0)
    assert advice.time_efficiency(32, 16) == pytest.approx(2 / 3)
    assert advice.compute_efficiency(32, 16) == pytest.approx(1 / 3)
    assert advice.efficiency(32, 16) == pytest.approx(4 * 32 * 16 / 48**2)  # 8/9
    assert advice.step_size_ratio(3, 1) == pytest.approx(0.75)
    assert advice.critical_batch_size(16.07) == pytest.approx(16.07)
    assert advice.temperature(0.1, 32) == pytest.approx(0.1 / 32)


def test_pareto_identity_and_reciprocals_on_random_values() -> None:
    rng = np.random.default_rng(0)
    b = 10 ** rng.uniform(-1, 5, size=500)
    n = 10 ** rng.uniform(-1, 5, size=500)
    s, e = advice.steps_ratio(b, n), advice.examples_ratio(b, n)
    np.testing.assert_allclose((s - 1) * (e - 1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(advice.time_efficiency(b, n) * s, 1.0, rtol=1e-12)
    np.testing.assert_allclose(advice.compute_efficiency(b, n) * e, 1.0, rtol=1e-12)
    np.testing.assert_allclose(advice.step_size_ratio(b, n), advice.time_efficiency(b, n))
    eff = advice.efficiency(b, n)
    np.testing.assert_allclose(
        eff, 4 * advice.time_efficiency(b, n) * advice.compute_efficiency(b, n), rtol=1e-12
    )
    assert np.all((eff > 0) & (eff <= 1))
    # symmetric in log(B/B_noise)
    np.testing.assert_allclose(advice.efficiency(n * 7.0, n), advice.efficiency(n / 7.0, n))


def test_scalars_give_floats_and_arrays_give_arrays() -> None:
    assert type(advice.efficiency(8, 16)) is float
    out = advice.efficiency(np.array([8, 16, 32]), 16)
    assert isinstance(out, np.ndarray) and out.shape == (3,)
    assert out[1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "value, expected",
    [(16.07, 16), (16, 16), (22, 16), (23, 32), (0.3, 1), (1.0, 1), (1000, 1024), (1e6, 2**20)],
)
def test_optimal_batch_size_power_of_two(value: float, expected: int) -> None:
    result = advice.optimal_batch_size(value)
    assert result == expected and isinstance(result, int)


def test_optimal_batch_size_multiple_of_and_clamping() -> None:
    assert advice.optimal_batch_size(16.07, multiple_of=8) == 16
    assert advice.optimal_batch_size(21, multiple_of=8) == 24
    assert advice.optimal_batch_size(19.9, multiple_of=8) == 16
    assert advice.optimal_batch_size(3, multiple_of=8) == 8  # smallest positive multiple
    assert advice.optimal_batch_size(100, multiple_of=1) == 100
    assert advice.optimal_batch_size(1000, max_size=256) == 256
    assert advice.optimal_batch_size(2, min_size=32) == 32
    assert advice.optimal_batch_size(5000, multiple_of=64, max_size=4096) == 4096


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -3.0, "abc"])
def test_optimal_batch_size_rejects_unusable_noise_scale(bad: object) -> None:
    with pytest.raises(ValueError, match="b_noise"):
        advice.optimal_batch_size(bad)  # type: ignore[arg-type]


def test_optimal_batch_size_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="multiple_of"):
        advice.optimal_batch_size(16, multiple_of=0)
    with pytest.raises(ValueError, match="min_size"):
        advice.optimal_batch_size(16, min_size=0)
    with pytest.raises(ValueError, match="max_size"):
        advice.optimal_batch_size(16, min_size=8, max_size=4)


@pytest.mark.parametrize(
    "func", [advice.steps_ratio, advice.examples_ratio, advice.efficiency, advice.step_size_ratio]
)
def test_bad_inputs_raise_value_error_saying_what_to_pass(func) -> None:
    with pytest.raises(ValueError, match="batch_size.*examples per optimizer step"):
        func(0, 16)
    with pytest.raises(ValueError, match="batch_size"):
        func(np.array([8, -1]), 16)
    with pytest.raises(ValueError, match="b_noise.*noise scale"):
        func(8, -2.0)
    with pytest.raises(ValueError, match="b_noise"):
        func(8, math.nan)
    with pytest.raises(ValueError, match="batch_size"):
        func("eight", 16)


def test_wasted_relative_to_recommendation() -> None:
    at_rec = advice.wasted(16, 16.07)
    assert at_rec["recommended_batch_size"] == 16
    assert at_rec["extra_steps_pct"] == pytest.approx(0.0)
    assert at_rec["extra_examples_pct"] == pytest.approx(0.0)
    # B = 32, B_noise = 16, recommended 16: S ratio 1.5/2, E ratio 3/2
    big = advice.wasted(32, 16.0)
    assert big["extra_steps_pct"] == pytest.approx(-25.0)
    assert big["extra_examples_pct"] == pytest.approx(50.0)
    small = advice.wasted(4, 16.0, recommended=16)
    assert small["extra_steps_pct"] == pytest.approx(100 * (5 / 2 - 1))
    assert small["extra_examples_pct"] == pytest.approx(100 * (1.25 / 2 - 1))
    arr = advice.wasted(np.array([4, 16, 64]), 16.0)
    assert arr["extra_steps_pct"].shape == (3,)


def test_efficiency_table() -> None:
    table = advice.efficiency_table(16.0, [4, 16, 64])
    assert list(table.columns) == [
        "batch_size",
        "steps_ratio",
        "examples_ratio",
        "time_efficiency",
        "compute_efficiency",
        "efficiency",
    ]
    row = table.iloc[1]
    assert row["batch_size"] == 16 and row["efficiency"] == pytest.approx(1.0)
    assert table["efficiency"].iloc[0] == pytest.approx(table["efficiency"].iloc[2])
    with pytest.raises(ValueError, match="b_noise"):
        advice.efficiency_table(0.0, [4])


def test_decide_follows_the_interval() -> None:
    from lightning_gns.advice import MAX_SPREAD, decide

    assert decide(100.0, 85.0, 120.0, 32).recommended == 128  # tight: the rounded estimate
    wide = decide(100.0, 85.0, 120.0 * MAX_SPREAD, 32)
    assert wide.kind == "grow" and wide.size == 64  # too wide: only the bound 85, above 32
    assert decide(100.0, 85.0, 120.0 * MAX_SPREAD, 128).kind == "none"
    assert decide(math.nan, 400.0, math.inf, 32).grow_to == 256  # only a lower bound
    nothing = decide(math.nan, math.nan, math.nan, 16)
    assert (nothing.kind, nothing.size, nothing.known) == ("none", 16, False)
    # never above twice the lower bound: 46 rounds to 64 > 2 × 31, so the bound's rounding
    assert decide(46.0, 31.0, 46.0, 8).recommended == 32
    # a value with an unbounded interval is not known, whatever the raw ratio says
    assert not decide(100.0, 85.0, math.inf, 32).known


def test_the_summary_says_why_nothing_is_known() -> None:
    """No step measured, or an exactly zero gradient: the headline says so (not "too few
    steps, or all noise"); the structural check's step is named, not silently missing."""
    from lightning_gns.estimator import GNSValues
    from lightning_gns.publish import summary

    nan = math.nan
    skipped = summary(GNSValues.unknown(steps=0, skipped=12), 1, "per_example", "auto", 1.0)
    assert "no step measured; all 12 steps were skipped" in skipped
    zero = GNSValues(nan, nan, 0.0, math.inf, 0.0, 0.0, steps=9, skipped=0)
    assert "the gradient is exactly zero" in summary(zero, 16, "per_example", "auto", 1.0)
    noisy = GNSValues(nan, nan, 3.0, math.inf, 0.5, 40.0, steps=9, skipped=0)
    text = summary(noisy, 16, "per_example", "auto", 1.0, checked=1)
    assert "at least 3 (95%)" in text and "exactly zero" not in text
    assert "9 steps measured (and 1 checking the per-example rules), 0 skipped" in text
    for line in (skipped, text):
        assert "nan" not in line.lower()


def test_the_spread_is_printed_with_the_digits_that_show_it_too_wide() -> None:
    reason = advice.decide(58.0, 46.88, 70.53, batch_size=32).reason
    assert "spans 1.504x, more than the 1.5x" in reason


def test_batchnorm_per_example_names_the_fix_the_run_can_take() -> None:
    """source='per_example' on a BatchNorm model with accumulation already set: the fix is
    the micro-batch source, not "set accumulate_grad_batches>=2"."""
    from torch import nn

    from lightning_gns.sources import choose_source

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="source='micro_batch'") as said:
        choose_source(model, "per_example", several_gradients=True)
    assert "accumulate_grad_batches" not in str(said.value)
    with pytest.raises(ValueError, match="accumulate_grad_batches>=2"):
        choose_source(model, "per_example", several_gradients=False)
    frozen = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="unfreeze the layers you train"):
        choose_source(frozen)
