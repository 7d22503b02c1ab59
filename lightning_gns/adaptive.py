"""Grow the batch with the gradient noise scale: accumulation by integer factors, LR scaling.

McCandlish et al. 2018 (arXiv 1812.06162): the best batch tracks B_noise, which grows as the
loss falls (§5, "dynamic batch size"); with a batch near B_noise each step buys almost the
full speed-up of a larger batch and little compute is wasted (eq. 2.11). This callback reads
:class:`~lightning_gns.GradientNoiseScale`'s estimate at each of its read-outs and raises (or,
if allowed, lowers) ``Trainer.accumulate_grad_batches`` by a factor at an optimizer-step
boundary. The learning rate follows a named rule, applied around each optimizer step, so a
user's LR scheduler keeps working on the unscaled rate.

The rules (pure functions below, one per name):

* ``lower_bound`` (default): grow when the 95% interval's lower bound of B_noise is at least
  ``margin`` × the next batch size; shrink (``shrink=True``) when its upper bound is below
  the next smaller batch / ``margin``. Acts on what is known even in the hard regime.
* ``sqrt``: B*(t) = B₀·√(B_noise(t)/B_noise(t₀)) from the first known estimate (the paper's
  adaptive-batch model: B ∝ √B_noise); a change when B* is more than ``factor**0.75`` away.
  It keeps B/√B_noise where it started: a run started far below B_noise stays below it.
* ``goodput``: the batch with the most progress per second, progress per step
  B/(B + B_noise) (eq. 2.11) over the measured time per step a + c·k (optimizer part a,
  c per micro-batch), as Pollux does; more than 5% better to change.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_gns import keys
from lightning_gns.callback import GradientNoiseScale
from lightning_gns.estimator import GNSValues
from lightning_gns.norms.preconditioner import keeps_second_moment
from lightning_gns.publish import publish

Rule = Literal["lower_bound", "sqrt", "goodput"]
LRScaling = Literal["auto", "linear", "sqrt", "adascale", "none"]
HYSTERESIS = 0.75  # sqrt rule: change when B* is more than factor**0.75 away
GOODPUT_GAIN = 1.05  # goodput rule: change when the other batch is 5% better


@dataclass(frozen=True)
class Change:
    """One change of the batch: at which optimizer step, from/to accumulation, why."""

    step: int
    old: int
    new: int
    batch_size: float
    lr_scale: float
    reason: str


def lower_bound_rule(
    v: GNSValues, batch: float, factor: int, margin: float, shrink: bool
) -> tuple[int, str] | None:
    """±1 factor step from the interval: grow if lower ≥ margin·factor·B; shrink if upper ≤
    B/(factor·margin)."""
    if math.isfinite(v.b_simple_lower) and v.b_simple_lower >= margin * factor * batch:
        return 1, f"B_simple ≥ {v.b_simple_lower:.4g} (95% lower bound) ≥ {margin:g} × {factor}B"
    if shrink and v.b_simple_upper <= batch / (factor * margin):
        return -1, f"B_simple ≤ {v.b_simple_upper:.4g} (95% upper bound) ≤ B/({factor}·{margin:g})"
    return None


def sqrt_rule(
    v: GNSValues, batch: float, factor: int, reference: tuple[float, float] | None
) -> tuple[int, str] | None:
    """B* = B₀·√(B_noise/B_noise₀) (known estimates only); a step when B* is off by
    factor**0.75."""
    if not v.known or reference is None:
        return None
    b0, noise0 = reference
    target = b0 * math.sqrt(v.b_simple / noise0)
    why = f"B* = {b0:g}·√({v.b_simple:.4g}/{noise0:.4g}) = {target:.4g}"
    if target >= batch * factor**HYSTERESIS:
        return 1, why
    if target <= batch / factor**HYSTERESIS:
        return -1, why
    return None


def goodput(batch: float, b_noise: float, seconds_per_step: float) -> float:
    """Progress per second: B/(B + B_noise) ideal steps per step (eq. 2.11) / time per step."""
    return batch / (batch + b_noise) / seconds_per_step


def goodput_rule(
    v: GNSValues, batch: float, accumulate: int, factor: int, timing: tuple[float, float] | None
) -> tuple[int, str] | None:
    """The neighbour (×factor, ÷factor) with ≥5% more goodput under t(k) = a + c·k; B_noise is
    the estimate when known, else its lower bound (cautious about growing)."""
    noise = v.b_simple if v.known else v.b_simple_lower
    if timing is None or not math.isfinite(noise) or noise <= 0:
        return None
    a, c = timing
    now = goodput(batch, noise, a + c * accumulate)
    for direction in (1, -1):
        k = accumulate * factor if direction > 0 else accumulate / factor
        other = goodput(batch * k / accumulate, noise, a + c * k)
        if other >= GOODPUT_GAIN * now:
            return direction, f"goodput ×{other / now:.3g} at B_simple {noise:.4g}"
    return None


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


class _Timer:
    """Host time per optimizer step split into micro-batches (c each) and the rest (a)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.before_step: float | None = None
        self.a = self.c = math.nan
        self.n = 0

    def observe(self, now: float, accumulate: int) -> None:
        if self.start is None or self.before_step is None:
            return
        a, c = now - self.before_step, (self.before_step - self.start) / accumulate
        w = max(0.05, 1.0 / (self.n + 1))  # running mean, then an EMA of about 20 steps
        self.a = a if self.n == 0 else (1 - w) * self.a + w * a
        self.c = c if self.n == 0 else (1 - w) * self.c + w * c
        self.n += 1
        self.start = self.before_step = None

    @property
    def timing(self) -> tuple[float, float] | None:
        return (self.a, self.c) if self.n >= 5 else None


class AdaptiveBatchSize(Callback):
    r"""Grow the effective batch as the gradient noise scale grows (needs a
    :class:`~lightning_gns.GradientNoiseScale` in the same ``Trainer``).

    Changes ``accumulate_grad_batches`` by ``factor`` at optimizer-step boundaries (all DDP
    ranks together: rank 0 decides, one broadcast per read-out), and scales the learning rate
    of every parameter group around each optimizer step (the scheduler sees the unscaled rate).
    Logs ``gns/accumulate``, ``gns/lr_scale`` and ``gns/lr``; each change is also written to
    the log with its reason (and to TensorBoard's text tab) and kept in :attr:`changes`.
    Resumes with the same batch and rate.

    Args:
        max_accumulate: the largest accumulation (batch = micro-batch × this × devices).
        min_accumulate: the smallest; default: the trainer's ``accumulate_grad_batches``.
        rule: ``lower_bound``, ``sqrt`` or ``goodput`` (module docstring).
        factor: integer factor of each change (2: doubling).
        margin: ``lower_bound`` rule: grow when B_noise's lower bound ≥ margin × next batch.
        lr_scaling: ``auto`` (``sqrt`` when the optimizer keeps a second moment in its state,
            ``linear`` otherwise), ``linear``, ``sqrt``, ``adascale`` or ``none``.
        min_steps_between: optimizer steps between two changes (hysteresis in time).
        shrink: also lower the batch when the noise scale falls (default: only grow).

    Raises:
        ValueError: at construction, an argument out of its range (the message names it).
        RuntimeError: at fit start, with the reason: no ``GradientNoiseScale`` in the
            trainer's callbacks, a ``GradientAccumulationScheduler`` (both would set the
            accumulation), manual optimization, DeepSpeed.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
        >>> adaptive = AdaptiveBatchSize(max_accumulate=32)  # grow up to 32 micro-batches
        >>> trainer = pl.Trainer(accumulate_grad_batches=1, logger=False,
        ...     callbacks=[GradientNoiseScale(), adaptive])
        >>> adaptive.rule, adaptive.factor, adaptive.changes
        ('lower_bound', 2, [])
        >>> AdaptiveBatchSize(factor=1)
        Traceback (most recent call last):
        ...
        ValueError: factor must be an int ≥ 2 (2: doubling), got 1
    """

    def __init__(
        self,
        max_accumulate: int = 64,
        min_accumulate: int | None = None,
        rule: Rule = "lower_bound",
        factor: int = 2,
        margin: float = 1.0,
        lr_scaling: LRScaling = "auto",
        min_steps_between: int = 50,
        shrink: bool = False,
    ) -> None:
        super().__init__()
        _check(max_accumulate, min_accumulate, rule, factor, margin, lr_scaling, min_steps_between)
        self.max_accumulate, self.min_accumulate = max_accumulate, min_accumulate
        self.rule, self.factor, self.margin = rule, factor, float(margin)
        self.lr_scaling, self.min_steps_between, self.shrink = lr_scaling, min_steps_between, shrink

        self.accumulate: int | None = None  # current accumulation (None before fit)
        self.base_accumulate: int | None = None  # at the start: LR scale 1
        self.lr_scale = 1.0
        self.changes: list[Change] = []
        self.reference: tuple[float, float] | None = None  # (B₀, B_noise₀), sqrt rule
        self._pending: int | None = None  # decided, waiting for an aligned step boundary
        self._reason = ""
        self._reads = 0
        self._steps = 0
        self._last_change = 0
        self._gns: GradientNoiseScale | None = None
        self._timer = _Timer()
        self._saved_lrs: list[Any] = []
        self._handles: list[Any] = []

    # -- set-up ---------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._gns = _refuse(trainer, pl_module)
        if self.accumulate is None:  # not resumed: start at the trainer's, within the bounds
            start = trainer.accumulate_grad_batches
            start = min(max(start, self.min_accumulate or 1), self.max_accumulate)
            self.accumulate = self.base_accumulate = start
        if self.min_accumulate is None:
            self.min_accumulate = min(trainer.accumulate_grad_batches, self.accumulate)
        trainer.accumulate_grad_batches = self.accumulate
        optimizer = trainer.optimizers[0]
        self._handles = [
            optimizer.register_step_pre_hook(self._scale_lr),
            optimizer.register_step_post_hook(self._restore_lr),
        ]

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:  # an epoch starts a whole accumulation window
            self._apply(trainer, self._pending)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- the learning rate, around each optimizer step ------------------------------------
    def _scale_lr(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._saved_lrs = [g["lr"] for g in optimizer.param_groups]
        if self.lr_scale != 1.0:
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.lr_scale

    def _restore_lr(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for g, lr in zip(optimizer.param_groups, self._saved_lrs, strict=False):
            g["lr"] = lr

    # -- per step -------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._timer.start is None:
            self._timer.start = time.perf_counter()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._timer.before_step = time.perf_counter()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._timer.before_step is None:  # no optimizer step in this batch
            return
        assert self.accumulate is not None and self._gns is not None
        self._timer.observe(time.perf_counter(), self.accumulate)
        self._steps += 1
        if self._gns.reads > self._reads:
            self._reads = self._gns.reads
            self._decide(trainer)
        if self._pending is not None:
            ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            if ready % self._pending == 0:  # the next step starts a whole new window
                self._apply(trainer, self._pending)

    def _decide(self, trainer: pl.Trainer) -> None:
        """At a new read-out: rank 0 picks the next accumulation; every rank takes it."""
        assert self._gns is not None and self.accumulate is not None
        v = self._gns.values
        if self.lr_scaling == "adascale":  # the gain follows the estimate at every read-out
            self.lr_scale = self._lr_scale(trainer, self.accumulate)
        decision = None
        if trainer.is_global_zero:
            decision = self._choose(v)
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision is not None:
            self._pending, self._reason = decision
        self._publish(trainer)

    def _choose(self, v: GNSValues) -> tuple[int, str] | None:
        assert self.accumulate is not None and self.min_accumulate is not None
        batch = self._batch(self.accumulate)
        if self.rule == "sqrt" and self.reference is None and v.known:
            self.reference = (batch, v.b_simple)
        if self._steps - self._last_change < self.min_steps_between:
            return None
        if self.rule == "lower_bound":
            move = lower_bound_rule(v, batch, self.factor, self.margin, self.shrink)
        elif self.rule == "sqrt":
            move = sqrt_rule(v, batch, self.factor, self.reference)
        else:
            move = goodput_rule(v, batch, self.accumulate, self.factor, self._timer.timing)
        if move is None or (move[0] < 0 and not self.shrink):
            return None
        new = self.accumulate * self.factor if move[0] > 0 else self.accumulate // self.factor
        if not self.min_accumulate <= new <= self.max_accumulate:
            return None
        return new, move[1]

    def _batch(self, accumulate: int) -> float:
        gns = self._gns
        assert gns is not None and self.accumulate is not None
        return gns.batch_size / self.accumulate * accumulate

    def _apply(self, trainer: pl.Trainer, new: int) -> None:
        assert self.accumulate is not None and self.base_accumulate is not None
        old, self.accumulate, self._pending = self.accumulate, new, None
        trainer.accumulate_grad_batches = new
        self._last_change = self._steps
        batch = self._batch(new)
        self.lr_scale = self._lr_scale(trainer, new)
        change = Change(self._steps, old, new, batch, self.lr_scale, self._reason)
        self.changes.append(change)
        message = (
            f"AdaptiveBatchSize: step {change.step}: accumulate_grad_batches {old} -> {new} "
            f"(batch {batch:g}), learning rate × {self.lr_scale:.4g} ({self._scaling(trainer)}): "
            f"{change.reason}"
        )
        rank_zero_info(message)
        for logger in trainer.loggers:  # the reason, where a logger takes text
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text(keys.BATCH_SIZE_CHANGE, message, trainer.global_step)
        self._publish(trainer)

    def _lr_scale(self, trainer: pl.Trainer, accumulate: int) -> float:
        assert self._gns is not None and self.base_accumulate is not None
        v = self._gns.values
        noise = v.b_simple if v.known else v.b_simple_lower
        base = self._batch(self.base_accumulate)
        return lr_scale(self._scaling(trainer), self._batch(accumulate), base, noise)

    def _scaling(self, trainer: pl.Trainer) -> str:
        if self.lr_scaling != "auto":
            return self.lr_scaling
        adam_like = keeps_second_moment(trainer.optimizers[0])
        return "sqrt" if adam_like else "linear"

    def _publish(self, trainer: pl.Trainer) -> None:
        assert self.accumulate is not None
        group = trainer.optimizers[0].param_groups[0]
        metrics = {
            keys.ACCUMULATE: float(self.accumulate),
            keys.LR_SCALE: self.lr_scale,
            keys.LR: float(group["lr"]) * self.lr_scale,
        }
        publish(trainer, None, metrics)

    # -- checkpoints ----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "accumulate": self.accumulate,
            "base_accumulate": self.base_accumulate,
            "min_accumulate": self.min_accumulate,
            "lr_scale": self.lr_scale,
            "reference": self.reference,
            "steps": self._steps,
            "last_change": self._last_change,
            "changes": [asdict(c) for c in self.changes],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accumulate = state_dict.get("accumulate")
        self.base_accumulate = state_dict.get("base_accumulate", self.accumulate)
        self.min_accumulate = self.min_accumulate or state_dict.get("min_accumulate")
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        ref = state_dict.get("reference")
        self.reference = tuple(ref) if ref else None  # type: ignore[assignment]
        self._steps = int(state_dict.get("steps", 0))
        self._last_change = int(state_dict.get("last_change", 0))
        self.changes = [Change(**c) for c in state_dict.get("changes", [])]


def _check(
    max_accumulate: int,
    min_accumulate: int | None,
    rule: str,
    factor: int,
    margin: float,
    lr_scaling: str,
    min_steps_between: int,
) -> None:
    for name, value in (("max_accumulate", max_accumulate), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if factor < 2:
        raise ValueError(f"factor must be an int ≥ 2 (2: doubling), got {factor!r}")
    if min_accumulate is not None and not 1 <= min_accumulate <= max_accumulate:
        raise ValueError(
            f"min_accumulate must be in [1, max_accumulate={max_accumulate}], got {min_accumulate}"
        )
    for name, value, allowed in (("rule", rule, Rule), ("lr_scaling", lr_scaling, LRScaling)):
        if value not in get_args(allowed):
            raise ValueError(f"{name} must be one of {get_args(allowed)}, got {value!r}")
    if not (isinstance(margin, (int, float)) and margin > 0):
        raise ValueError(f"margin must be a positive number, got {margin!r}")
    if isinstance(min_steps_between, bool) or not isinstance(min_steps_between, int):
        raise ValueError(f"min_steps_between must be an int ≥ 0, got {min_steps_between!r}")
    if min_steps_between < 0:
        raise ValueError(f"min_steps_between must be an int ≥ 0, got {min_steps_between!r}")


def _refuse(trainer: pl.Trainer, pl_module: pl.LightningModule) -> GradientNoiseScale:
    """The GradientNoiseScale to act on, or a clear error for what this cannot drive."""
    name = "AdaptiveBatchSize"
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise RuntimeError(f"{name}: DeepSpeed owns gradient accumulation; it is not supported")
    if not pl_module.automatic_optimization:
        raise RuntimeError(f"{name}: manual optimization steps on its own schedule; unsupported")
    if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
        raise RuntimeError(
            f"{name}: a GradientAccumulationScheduler is attached; both would set "
            "accumulate_grad_batches. Remove one of them"
        )
    found = [c for c in trainer.callbacks if isinstance(c, GradientNoiseScale)]
    if not found:
        raise RuntimeError(
            f"{name} acts on the measured noise scale: add GradientNoiseScale() to the "
            "Trainer's callbacks as well"
        )
    return found[0]
