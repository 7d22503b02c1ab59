"""Which batch AdaptiveBatchSize runs at next: the ladder of batches it can take (the user's
batch × factor^level, micro-batch first, then accumulation) and the decision at a read-out.
No Lightning here: :mod:`lightning_gns.adaptive` feeds it numbers and applies what it says."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lightning_gns.adaptive import rules
from lightning_gns.estimator import GNSValues

PROBE_STEPS = 2  # records the probe needs at least
PROBE_MAX_STEPS = 10  # ... and at most: then it takes its interval's lower bound, or none

# A decision: (accumulation, micro-batch, reason) to change to, the reason to wait, or None.
Decision = tuple[int, int | None, str] | str | None


@dataclass(frozen=True)
class Change:
    """One change of the batch: the optimizer steps before it, accumulation and micro-batch
    before and after (micro-batch None: not resizable), the batch, the LR multiplier, why."""

    step: int
    old: int
    new: int
    batch_size: float
    lr_scale: float
    reason: str
    old_micro: int | None = None
    new_micro: int | None = None


@dataclass(frozen=True)
class Pending:
    """A decided change, applied when batch ``index`` of ``epoch`` starts."""

    accumulate: int
    micro: int | None
    reason: str
    noise: float  # what rank 0 knew of B_noise (LR gain, second moment: the same on all ranks)
    epoch: int
    index: int


@dataclass
class Ladder:
    """The batches within reach: ``base`` (the user's accumulation and micro-batch; micro None
    while not resizable) × factor^level, the micro-batch grown first (up to
    ``max_micro_batch``; it never shrinks, Lightning's epoch length depends on it), then the
    accumulation within [min_accumulate, max_accumulate]."""

    factor: int
    max_accumulate: int
    max_micro_batch: int | None
    examples_per_micro: Callable[[], float]  # measured, for a micro-batch not resizable
    world_size: int = 1
    min_accumulate: int = 1
    base: tuple[int, int | None] = (1, None)
    # (micro-batches, examples) of an epoch on one process at a micro-batch size (None: not
    # resizable); Lightning steps at an epoch's end, so no step holds more
    epoch: Callable[[int | None], tuple[float, float]] = lambda micro: (math.inf, math.inf)

    def batch(self, accumulate: int, micro: int | None) -> float:
        """Examples per optimizer step: micro-batch × accumulation × world size, or the whole
        epoch's examples where the accumulation holds all its micro-batches."""
        per_micro = float(micro) if micro is not None else self.examples_per_micro()
        batches, examples = self.epoch(micro)
        whole = accumulate >= batches  # (limit_train_batches: its batches)
        per_step = min(examples, per_micro * batches) if whole else per_micro * accumulate
        return per_step * self.world_size

    def epoch_note(self, accumulate: int, micro: int | None) -> str:
        """Why accumulating more cannot grow the step, if an epoch is why ("": it is not)."""
        batches, _ = self.epoch(micro)
        if accumulate < batches or accumulate >= self.max_accumulate:
            return ""
        return f" (each step is a whole epoch of {batches:.0f} micro-batches)"

    def base_batch(self, micro: int | None) -> float:
        acc, base_micro = self.base
        return self.batch(acc, base_micro if base_micro is not None else micro)

    def level(self, batch: float, micro: int | None) -> int:
        return round(math.log(batch / self.base_batch(micro), self.factor))

    def allocate(self, level: int, micro: int | None) -> tuple[int, int | None]:
        """The accumulation and micro-batch of level ``level`` (``micro``: the current one)."""
        base_acc, base_micro = self.base
        micro_levels = 0
        if micro is not None and base_micro is not None and self.max_micro_batch:
            while base_micro * self.factor ** (micro_levels + 1) <= self.max_micro_batch:
                micro_levels += 1
            level = max(level, round(math.log(micro / base_micro, self.factor)))
        j = min(max(level, 0), micro_levels)
        accumulate = base_acc * self.factor ** max(level - j, 0)
        accumulate = min(max(accumulate, self.min_accumulate), self.max_accumulate)
        new_micro = base_micro * self.factor**j if base_micro is not None else micro
        new_micro = new_micro if micro is not None else None
        # past the first accumulation that holds a whole epoch no step grows (Lightning steps
        # at an epoch's end)
        least = max(base_acc, self.min_accumulate, self.epoch(new_micro)[0])
        while accumulate // self.factor >= least:
            accumulate //= self.factor
        return accumulate, new_micro


@dataclass
class Rules:
    """The rule and its arguments (AdaptiveBatchSize's), and the sqrt rule's reference."""

    rule: str
    factor: int
    multiple: float
    margin: float
    shrink: bool
    min_steps_between: int
    reference: tuple[float, float] | None = None  # (B₀, B_noise₀)

    def decide(
        self,
        ladder: Ladder,
        v: GNSValues,
        now: tuple[int, int | None],
        steps_since_change: int | None,
        timing: tuple[float, float] | None,
    ) -> Decision:
        """At a read-out at the batch ``now`` = (accumulation, micro-batch); the steps since
        the last change (None: none yet)."""
        batch = ladder.batch(*now)
        if self.rule == "sqrt" and self.reference is None and v.precise:  # no probe
            self.reference = (self.multiple * v.b_simple, v.b_simple)
        left = self.min_steps_between - (steps_since_change or 0)
        if steps_since_change is not None and left > 0:
            return f"{left} more steps before the next change (min_steps_between): waiting"
        move = rules.move(self.rule, v, batch, self.factor, self.multiple, self.margin,
                           self.shrink, self.reference, timing)  # fmt: skip
        if move.steps == 0 or (move.steps < 0 and not self.shrink):
            return move.reason if move.steps == 0 else None
        target = ladder.allocate(ladder.level(batch, now[1]) + move.steps, now[1])
        if target == now:
            bound = "largest" if move.steps > 0 else "smallest"
            bound += ladder.epoch_note(*now) if move.steps > 0 else ""
            return f"{move.reason.rsplit(':', 1)[0]}, but the batch is at its {bound}: staying"
        return (*target, move.reason)

    def after_probe(self, ladder: Ladder, v: GNSValues, now: tuple[int, int | None]) -> Decision:
        """The batch to go on with once the probe's interval is within 1.5× or it has
        ``PROBE_MAX_STEPS`` records: the largest level at most ``multiple`` × the interval's
        lower bound (:func:`rules.probe_level`), the user's batch without one. None: go on
        probing. The sqrt rule's reference is the probe's estimate if it is within 1.5×."""
        if v.steps < PROBE_STEPS or (not v.precise and v.steps < PROBE_MAX_STEPS):
            return None  # not enough records yet (the per-example check step has none)
        batch = ladder.batch(*now)
        found = rules.probe_level(v, batch, ladder.base_batch(now[1]), self.factor, self.multiple)
        level, why = found or (0, f"{v.steps} probe steps give no lower bound of B_noise")
        target = ladder.allocate(level, now[1])
        if self.rule == "sqrt" and found is not None:  # the estimate, or the bound it took
            noise0 = v.b_simple if v.precise else rules.bounds(v)[0]
            self.reference = (self.multiple * noise0, noise0)
        if target == now:
            return f"{why}: staying"
        return (*target, f"{why}: going on at {batch_text(ladder.batch(*target))}")


def batch_text(x: float) -> str:
    """A batch as a user reads it (``?`` while unknown)."""
    return f"{x:,.0f}" if math.isfinite(x) else "?"
