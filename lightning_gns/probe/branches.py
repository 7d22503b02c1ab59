"""The branched critical batch size as pure functions (Merrill et al. 2025, arXiv 2505.23971).

From one model and optimizer state, branches train at k·B for the same number of examples E
(E/(k·B) steps each, the learning rate scaled by the rule ``AdaptiveBatchSize`` uses) and are
scored on the same held-back batches. B_crit(branched) is the largest k·B whose loss stays
within ``tolerance`` (relative) of the k = 1 branch's. Its uncertainty is a paired bootstrap
over the evaluation batches: the same resampled batches score every branch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np

from lightning_gns.adaptive.rules import LRScaling, number

BUDGET = 0.04  # default: each probe trains on about 4% of the run's planned examples
MIN_LARGEST_STEPS, MAX_LARGEST_STEPS = 2, 32  # steps of the largest branch, default E
UNKNOWN_LARGEST_STEPS = 8  # default E when the run's length is not known
LEVEL = 0.95  # the bootstrap interval
WARN_SHARE = 0.10  # the probes' examples above this share of the run's are said


def check_arguments(args: dict[str, Any]) -> None:
    """CriticalBatchProbe's arguments: refuse at construction what would silently do
    something else (a probe that never runs, a rate rule misspelt), naming the fix."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    steps, every = list(args["at_steps"]), args["every_n_steps"]
    if not steps and every is None:
        raise ValueError("CriticalBatchProbe: give at_steps=[...] or every_n_steps=N")
    if not all(whole(s) and s >= 1 for s in steps):
        raise ValueError(f"at_steps must be optimizer steps ≥ 1 (ints), got {steps}")
    for name, low in (("every_n_steps", 1), ("examples", 1), ("eval_batches", 2), ("repeats", 1)):
        value = args[name]
        if (value is not None or name in ("eval_batches", "repeats")) and not (
            whole(value) and value >= low
        ):
            raise ValueError(f"{name} must be an int ≥ {low}, got {value!r}")
    tolerance = args["tolerance"]
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not (math.isfinite(tolerance) and tolerance >= 0)
    ):
        raise ValueError(f"tolerance must be a number ≥ 0, e.g. 0.01, got {tolerance!r}")
    if args["lr_scaling"] not in get_args(LRScaling):
        raise ValueError(
            f"lr_scaling must be one of {get_args(LRScaling)}, got {args['lr_scaling']!r}"
        )


def check_factors(factors: Sequence[int]) -> tuple[int, ...]:
    """Factors k of the branches: integers ≥ 1, 1 among them, at least two, increasing.

    Examples:
        >>> check_factors([4, 1, 2])
        (1, 2, 4)
        >>> check_factors([2, 4])
        Traceback (most recent call last):
        ...
        ValueError: factors must hold 1 (the reference branch) and at least one k > 1, got [2, 4]
    """
    ks = sorted(set(factors))
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"factors must be integers ≥ 1, e.g. (1, 2, 4, 8), got {list(factors)}")
    if len(ks) < 2 or ks[0] != 1:
        raise ValueError(
            "factors must hold 1 (the reference branch) and at least one k > 1, "
            f"got {list(factors)}"
        )
    return tuple(ks)


def branch_examples(
    examples: int | None,
    factors: Sequence[int],
    batch: int,
    planned: float,
    held: int = 0,
    repeats: int = 1,
) -> int:
    """E, the examples each branch trains on: a multiple of the largest branch's batch.

    Given (``examples``): rounded up to that multiple. Default: about ``BUDGET`` × the run's
    ``planned`` examples per probe, less the ``held`` evaluation examples of each branch,
    split over the branches and ``repeats`` data orders, between 2 and 32 steps of the
    largest branch (8 when the run's length is unknown).

    Examples:
        >>> branch_examples(None, (1, 2, 4, 8), 32, planned=10_000 * 32, held=512)  # 10 × 256
        2560
        >>> branch_examples(1000, (1, 2, 4), 32, planned=math.inf)  # 8 steps at 128
        1024
    """
    largest = max(factors) * batch
    if examples is not None:
        return max(1, math.ceil(examples / largest)) * largest
    if not math.isfinite(planned):
        return UNKNOWN_LARGEST_STEPS * largest
    steps = math.floor((BUDGET * planned / (len(factors) * repeats) - held) / largest)
    return min(max(steps, MIN_LARGEST_STEPS), MAX_LARGEST_STEPS) * largest


def within(losses: Mapping[int, float], tolerance: float) -> list[int]:
    """The factors k whose loss is at most L₁ + tolerance·|L₁| (L₁: the k = 1 branch's).

    Examples:
        >>> within({1: 1.0, 2: 1.005, 4: 1.02, 8: 1.3}, 0.01)
        [1, 2]
    """
    ref = losses[1]
    return [k for k in sorted(losses) if losses[k] <= ref + tolerance * abs(ref)]


def b_crit(losses: Mapping[int, float], batch: float, tolerance: float) -> float:
    """B_crit(branched): ``batch`` × the largest k whose loss stays within ``tolerance``
    (relative) of the k = 1 branch's (NaN when a loss is not finite).

    Examples:
        >>> b_crit({1: 2.00, 2: 2.01, 4: 2.015, 8: 2.2}, 64, 0.01)
        256.0
        >>> b_crit({1: 2.0, 2: 2.5, 4: 2.03}, 64, 0.01)  # the largest within, as Merrill
        64.0
    """
    if not all(math.isfinite(v) for v in losses.values()):
        return math.nan
    return float(batch * max(within(losses, tolerance)))


def bootstrap(
    per_batch: Mapping[int, Sequence[Any]],
    batch: float,
    tolerance: float,
    draws: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """The 95% interval of B_crit(branched) from a paired bootstrap: ``per_batch[k]`` holds
    branch k's loss per evaluation batch, or one such list per data order (``repeats``). Each
    draw resamples the data orders (when more than one) and the batches, the same for every
    branch. The interval's ends are on the k·B grid.

    Examples:
        >>> flat = {1: [1.0] * 8, 2: [1.001] * 8, 4: [1.5] * 8}
        >>> bootstrap(flat, 32, 0.01)
        (64.0, 64.0)
        >>> orders = {1: [[1.0] * 8, [1.0] * 8], 2: [[1.001] * 8, [1.05] * 8], 4: [[1.5] * 8] * 2}
        >>> bootstrap(orders, 32, 0.01)  # one order keeps k = 2 within 1%, the other not
        (32.0, 64.0)
    """
    ks = sorted(per_batch)
    table = np.asarray([per_batch[k] for k in ks], dtype=np.float64)
    if table.ndim == 2:
        table = table[:, None, :]  # (factors, data orders, batches)
    if not np.isfinite(table).all():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    _, orders, batches = table.shape
    rows = (
        rng.integers(0, orders, size=(draws, orders)) if orders > 1 else np.zeros((draws, 1), int)
    )
    cols = rng.integers(0, batches, size=(draws, batches))
    means = table[:, rows[:, :, None], cols[:, None, :]].mean(axis=(2, 3))  # (factors, draws)
    ref = means[ks.index(1)]
    ok = means <= ref + tolerance * np.abs(ref)
    factor = np.asarray(ks, dtype=np.float64)
    best = np.max(np.where(ok, factor[:, None], 0.0), axis=0) * batch
    tail = (1 - LEVEL) / 2
    lower = float(np.quantile(best, tail, method="lower"))
    upper = float(np.quantile(best, 1 - tail, method="higher"))
    return lower, upper


@dataclass
class ProbeResult:
    """One probe: at ``step``, branches at k·``batch`` for ``examples`` examples each."""

    step: int
    batch: int
    examples: int  # E per branch
    losses: dict[int, float]  # mean held-back loss after each branch
    b_crit: float
    lower: float
    upper: float
    spent: int  # examples the probe used: training and evaluation, all ranks
    seconds: float
    b_simple: float = math.nan  # GradientNoiseScale's read-out at the probe, if any
    lr_scales: dict[int, float] = field(default_factory=dict)
    repeats: int = 1  # data orders per branch

    @property
    def largest(self) -> bool:
        """B_crit is the largest branch: only a lower bound."""
        return self.b_crit >= self.batch * max(self.losses)


def verdict(r: ProbeResult) -> str:
    """Whether B_simple agrees with the branched B_crit, in words.

    It holds when B_simple lies between the interval's lower end and the branch above its
    upper end (the critical batch lies between two branches).

    Examples:
        >>> r = ProbeResult(2000, 32, 4096, {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.1, 16: 1.2},
        ...                 256.0, 128.0, 256.0, 120_000, 3.2, b_simple=210.0)
        >>> verdict(r)
        'the advice holds'
        >>> r.b_simple = 40.0
        >>> verdict(r)
        'B_simple is below it: the batch can grow past the advice'
    """
    if not math.isfinite(r.b_simple) or not math.isfinite(r.b_crit):
        return "no B_simple to compare" if math.isfinite(r.b_crit) else "not determined"
    ks = sorted(r.losses)
    above = [r.batch * k for k in ks if r.batch * k > r.upper]
    ceiling = above[0] if above else math.inf
    if r.b_simple < r.lower:
        return "B_simple is below it: the batch can grow past the advice"
    if r.b_simple > ceiling:
        return "B_simple is above it: the advice overshoots the critical batch"
    return "the advice holds"


def line(r: ProbeResult) -> str:
    """The readable line at the end of fit.

    Examples:
        >>> r = ProbeResult(2000, 32, 4096, {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.1, 16: 1.2},
        ...                 256.0, 128.0, 512.0, 120_000, 3.2, b_simple=210.0)
        >>> line(r)
        'B_crit (branched, step 2,000) 256 (128–512), B_simple 210: the advice holds'
    """
    at_least = "≥ " if r.largest else ""
    simple = f", B_simple {number(r.b_simple)}" if math.isfinite(r.b_simple) else ""
    return (
        f"B_crit (branched, step {r.step:,}) {at_least}{number(r.b_crit)} "
        f"({number(r.lower)}–{number(r.upper)}){simple}: {verdict(r)}"
    )


def cost_line(spent: int, run_examples: int) -> str:
    """The probe's examples as a fraction of the run's.

    Examples:
        >>> print(cost_line(12_288, 200_000))
        CriticalBatchProbe: 12,288 examples, 6.1% of the run's 200,000
    """
    fraction = spent / run_examples if run_examples > 0 else math.inf
    return f"CriticalBatchProbe: {spent:,} examples, {fraction:.1%} of the run's {run_examples:,}"
