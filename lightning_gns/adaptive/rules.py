"""The growth rules of :class:`~lightning_gns.adaptive.AdaptiveBatchSize`, as pure functions.

Each rule reads one read-out of the noise scale (:class:`~lightning_gns.estimator.GNSValues`)
and the batch now, and returns a :class:`Move`: by how many factors to change the batch
(0: stay) and why, in words a user reads at once. McCandlish et al. 2018 (arXiv 1812.06162):
a step at batch B makes 1/(1 + B_noise/B) of the progress of a full-batch step (eq. 2.11),
and B_noise grows as the loss falls (§5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from lightning_gns.estimator import GNSValues

Rule = Literal["sqrt", "noise", "lower_bound", "goodput"]
LRScaling = Literal["auto", "linear", "sqrt", "adascale", "none"]
MAX_FACTOR = 16  # a larger factor per change jumps past the batch the noise scale asks for
MAX_ACCUMULATE = 2**16  # guards against a typo: no run accumulates more micro-batches
HYSTERESIS = 0.75  # sqrt rule: change when B* is more than factor**0.75 away
GOODPUT_GAIN = 1.05  # goodput rule: change when the other batch is 5% better


@dataclass(frozen=True)
class Move:
    """``steps`` factors up (> 0), down (< 0) or none (0), and the reason in plain words."""

    steps: int
    reason: str


def number(x: float) -> str:
    """A number as a user reads it: 3 significant digits, thousands separated."""
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def noise_bound(v: GNSValues) -> tuple[float, str]:
    """What is known of B_noise: the estimate once its 95% interval is tight, otherwise the
    interval's lower bound (NaN before two read-outs), and how to say it."""
    if v.precise:
        return v.b_simple, f"B_noise is {number(v.b_simple)}"
    if math.isfinite(v.b_simple_lower) and v.b_simple_lower > 0:
        return v.b_simple_lower, f"B_noise is at least {number(v.b_simple_lower)} (95% confidence)"
    return math.nan, "no estimate of B_noise yet"


def lower_bound_rule(v: GNSValues, batch: float, factor: int, margin: float, shrink: bool) -> Move:
    """One factor up when the 95% lower bound of B_noise is at least ``margin`` × the next
    batch; one down (``shrink``) when the upper bound is at most the smaller batch / margin."""
    lower, upper = v.b_simple_lower, v.b_simple_upper
    bigger = batch * factor
    need = margin * bigger
    times = "" if margin == 1 else f"{margin:g} × "
    if math.isfinite(lower) and lower >= need:
        return Move(1, f"B_noise is at least {number(lower)} (95% confidence), at least "
                       f"{times}the next batch {number(bigger)}: growing")  # fmt: skip
    smaller = batch / factor
    if shrink and upper <= smaller / margin:
        return Move(-1, f"B_noise is at most {number(upper)} (95% confidence), below the smaller "
                        f"batch {number(smaller)}{'' if margin == 1 else f' / {margin:g}'}: "
                        "shrinking")  # fmt: skip
    if not (math.isfinite(lower) and lower > 0):
        return Move(0, "no estimate of B_noise yet: waiting")
    return Move(0, f"B_noise is at least {number(lower)} (95% confidence), below "
                   f"{times}the next batch {number(bigger)}: waiting")  # fmt: skip


def bounds(v: GNSValues) -> tuple[float, float]:
    """B_noise's 95% interval (lower NaN or ≤ 0: no lower bound; upper inf: none)."""
    lower = v.b_simple_lower if math.isfinite(v.b_simple_lower) else math.nan
    upper = v.b_simple_upper if not math.isnan(v.b_simple_upper) else math.inf
    return lower, upper


def sqrt_rule(
    v: GNSValues,
    batch: float,
    factor: int,
    reference: tuple[float, float] | None,
    multiple: float = 1.0,
) -> Move:
    """B* = B₀·√(B_noise/B_noise₀) (the paper's adaptive model, B ∝ √B_noise: the batch that
    trades steps against examples at a fixed rate, §5), from the reference (B₀, B_noise₀) set
    by the first estimate within 1.5× (the probe's, or the first read's). It grows on B*
    from the 95% lower bound of B_noise and shrinks on B* from the upper bound, never on the
    point estimate; as many factors as B* is away, once it is more than factor**0.75 away.
    Before a reference it grows as :func:`lower_bound_rule` (never waits without one).

    Examples:
        >>> from lightning_gns.estimator import GNSValues
        >>> v = GNSValues(400.0, math.nan, 380.0, 420.0, 1.0, 400.0, 100, 0, 0, 100.0)
        >>> sqrt_rule(v, 32, 2, (32.0, 100.0)).steps  # B* = 32·√(380/100) = 62
        1
    """
    if reference is None:
        move = lower_bound_rule(v, batch, factor, 1.0 / multiple, False)
        return Move(move.steps, f"no reference yet (the sqrt rule takes the first estimate "
                                f"within 1.5×); {move.reason}")  # fmt: skip
    lower, upper = bounds(v)
    b0, noise0 = reference

    def star(noise: float) -> float:
        return b0 * math.sqrt(noise / noise0)

    if lower > 0:
        up = math.floor(math.log(star(lower) / batch, factor) + 1 - HYSTERESIS)
        if up > 0:
            return Move(up, f"B_noise is at least {number(lower)} (95% confidence), so B* ≥ "
                            f"{number(b0)}·√({number(lower)}/{number(noise0)}) = "
                            f"{number(star(lower))}: growing")  # fmt: skip
    if math.isfinite(upper) and upper > 0:
        down = math.ceil(math.log(star(upper) / batch, factor) - 1 + HYSTERESIS)
        if down < 0:
            return Move(down, f"B_noise is at most {number(upper)} (95% confidence), so B* ≤ "
                              f"{number(b0)}·√({number(upper)}/{number(noise0)}) = "
                              f"{number(star(upper))}: shrinking")  # fmt: skip
    if not lower > 0:
        return Move(0, "no lower bound of B_noise yet: waiting")
    return Move(0, f"B_noise is {number(lower)} to {number(upper)} (95% confidence), so B* = "
                   f"{number(star(lower))} to {number(star(upper))}, within "
                   f"{factor**HYSTERESIS:.2g}× of the batch {number(batch)} or too uncertain "
                   "to move: waiting")  # fmt: skip


def goodput(batch: float, b_noise: float, seconds_per_step: float) -> float:
    """Progress per second: B/(B + B_noise) ideal steps per step (eq. 2.11) / time per step."""
    return batch / (batch + b_noise) / seconds_per_step


def goodput_rule(
    v: GNSValues, batch: float, factor: int, timing: tuple[float, float] | None
) -> Move:
    """The neighbour (×factor, ÷factor) with at least 5% more progress per second, as Pollux.
    A step takes a + c: ``timing`` is the measured (a, c), the optimizer's part a and the
    forward and backward part c, which a batch ``factor`` × larger multiplies by ``factor``
    (more micro-batches, or larger ones: no gain from parallelism is assumed). B_noise is the
    lower bound of its 95% interval for growing, the upper bound for shrinking."""
    lower, upper = bounds(v)
    if not lower > 0:
        return Move(0, "no lower bound of B_noise yet: waiting")
    said = f"B_noise is {number(lower)} to {number(upper)} (95% confidence)"
    if timing is None:
        return Move(0, f"{said}; the time per step is not measured yet (5 steps): waiting")
    a, c = timing
    for direction, scale, noise in ((1, factor, lower), (-1, 1 / factor, upper)):
        if not math.isfinite(noise):
            continue
        now = goodput(batch, noise, a + c)
        other = goodput(batch * scale, noise, a + c * scale)
        if other >= GOODPUT_GAIN * now:
            verb = "growing" if direction > 0 else "shrinking"
            return Move(direction, f"{said}: progress per second {other / now:.3g}× higher at "
                                   f"batch {number(batch * scale)}: {verb}")  # fmt: skip
    return Move(0, f"{said}: progress per second would gain less than 5% at batch "
                   f"{number(batch * factor)} or {number(batch / factor)}: waiting")  # fmt: skip


def lr_scale(scaling: str, batch: float, base_batch: float, b_noise: float = math.nan) -> float:
    """LR multiplier at ``batch`` relative to ``base_batch``: linear (SGD, constant η/B),
    sqrt (Adam family), AdaScale's gain (1 + B_noise/B₀)/(1 + B_noise/B), or none."""
    ratio = batch / base_batch
    if scaling == "linear":
        return ratio
    if scaling == "sqrt":
        return math.sqrt(ratio)
    if scaling == "adascale":
        if not math.isfinite(b_noise) or b_noise <= 0:
            return 1.0
        return (1.0 + b_noise / base_batch) / (1.0 + b_noise / batch)
    return 1.0


def noise_rule(v: GNSValues, batch: float, factor: int, multiple: float, shrink: bool) -> Move:
    """Follow B = ``multiple`` × B_noise on the safe side of its 95% interval: grows as many
    factors as ``multiple`` × the lower bound allows, shrinks (``shrink``) when the batch is
    more than a factor above ``multiple`` × the upper bound; never on the point estimate."""
    lower, upper = bounds(v)
    times = "" if multiple == 1 else f"{multiple:g} × "
    if lower > 0:
        steps = math.floor(math.log(multiple * lower / batch) / math.log(factor) + 1e-9)
        if steps > 0:
            return Move(steps, f"B_noise is at least {number(lower)} (95% confidence), so "
                               f"{times}B_noise ≥ {number(multiple * lower)} is at least "
                               f"{number(batch * factor**steps)}: growing")  # fmt: skip
    if shrink and math.isfinite(upper) and upper > 0:
        steps = math.floor(math.log(multiple * upper / batch) / math.log(factor) + 1e-9)
        if steps < -1:
            return Move(steps + 1, f"B_noise is at most {number(upper)} (95% confidence), so "
                                   f"{times}B_noise ≤ {number(multiple * upper)} is below "
                                   f"{number(batch / factor)}: shrinking")  # fmt: skip
    if not lower > 0:
        return Move(0, "no lower bound of B_noise yet: waiting")
    return Move(0, f"B_noise is at least {number(lower)} (95% confidence), so {times}B_noise "
                   f"≥ {number(multiple * lower)}, below the next batch "
                   f"{number(batch * factor)}: waiting")  # fmt: skip


def move(
    rule: str,
    v: GNSValues,
    batch: float,
    factor: int,
    multiple: float,
    margin: float,
    shrink: bool,
    reference: tuple[float, float] | None,
    timing: tuple[float, float] | None,
) -> Move:
    """The named rule's move at this read."""
    if rule == "noise":
        return noise_rule(v, batch, factor, multiple, shrink)
    if rule == "lower_bound":
        return lower_bound_rule(v, batch, factor, margin, shrink)
    if rule == "sqrt":
        return sqrt_rule(v, batch, factor, reference, multiple)
    return goodput_rule(v, batch, factor, timing)


def probe_level(
    v: GNSValues, batch: float, base: float, factor: int, multiple: float
) -> tuple[int, str] | None:
    """After the probe: the largest level k ≥ 0 (batch ``base`` × factor**k) at most
    ``multiple`` × the 95% lower bound of B_noise (the move the interval makes safe), and why
    (None: no lower bound; the run goes on at the user's batch)."""
    lower, upper = bounds(v)
    if not lower > 0:
        return None
    target = multiple * lower
    level = max(0, math.floor(math.log(target / base, factor) + 1e-9))
    times = "" if multiple == 1 else f"{multiple:g} × "
    why = (f"{v.steps} probe steps of {number(batch)} examples measure B_noise ≈ "
           f"{number(v.b_simple)} (95% interval {number(lower)} to {number(upper)}), so "
           f"{times}B_noise ≥ {number(target)}")  # fmt: skip
    return level, why


def second_moment_ratio(b_noise: float, old: float, new: float) -> float:
    """How a gradient's expected square changes from batch ``old`` to ``new``:
    E|G_B|² = |G|²(1 + B_noise/B), so (1 + B_noise/new)/(1 + B_noise/old) (1/k far below
    B_noise, 1 far above it). 1 when B_noise is unknown."""
    if not math.isfinite(b_noise) or b_noise <= 0:
        return 1.0
    return (1.0 + b_noise / new) / (1.0 + b_noise / old)


def check_arguments(args: dict[str, Any]) -> None:
    """AdaptiveBatchSize's arguments: refuse at construction what would misbehave later,
    naming the fix."""

    def integer(name: str, low: int, high: int, none: bool = False) -> None:
        value = args[name]
        if none and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in [{low}, {high:,}], got {value!r}")

    def positive(name: str, example: str) -> None:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a positive number, e.g. {example}, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive and finite, e.g. {example}, got {value!r}")

    integer("max_accumulate", 1, MAX_ACCUMULATE)
    integer("min_accumulate", 1, args["max_accumulate"], none=True)
    integer("factor", 2, MAX_FACTOR)
    integer("min_steps_between", 0, 10**9)
    integer("max_micro_batch", 1, 2**31, none=True)
    integer("probe", 0, 2**31)
    integer("check_every_n_steps", 1, 10**9)
    for name, allowed in (("rule", Rule), ("lr_scaling", LRScaling)):
        if args[name] not in get_args(allowed):
            raise ValueError(f"{name} must be one of {get_args(allowed)}, got {args[name]!r}")
    positive("margin", "1.0")
    positive("multiple", "1.0")
    for name in ("shrink", "rescale_second_moment"):
        if not isinstance(args[name], bool):
            raise ValueError(f"{name} must be True or False, got {args[name]!r}")
