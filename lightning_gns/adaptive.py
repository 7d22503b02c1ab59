"""Grow the batch with the gradient noise scale: micro-batch, then accumulation; LR scaling.

McCandlish et al. 2018 (arXiv 1812.06162): the best batch tracks B_noise, which grows as the
loss falls (§5, "dynamic batch size"). :class:`AdaptiveBatchSize` measures B_noise from the
same per-step records as :class:`~lightning_gns.GradientNoiseScale`, in a window that restarts
at each change of batch, and changes the batch by factors at an optimizer-step boundary: first
the per-device micro-batch (with a :class:`~lightning_gns.batching.ResizableBatchSampler`, up to
``max_micro_batch``), then ``Trainer.accumulate_grad_batches``. The rules are pure functions in
:mod:`lightning_gns.growth`; the learning rate and Adam's second moment are handled around each
step (:mod:`lightning_gns.stepping`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from lightning_gns import _compat, batching, growth, keys
from lightning_gns.callback import GradientNoiseScale
from lightning_gns.estimator import GNSValues
from lightning_gns.growth import (
    LRScaling,
    Rule,
    goodput,
    goodput_rule,
    lower_bound_rule,
    lr_scale,
    sqrt_rule,
)
from lightning_gns.norms.preconditioner import keeps_second_moment
from lightning_gns.publish import publish
from lightning_gns.records import MODEL, StepNorms
from lightning_gns.stepping import (
    LRScaler,
    StepTimer,
    max_over_ranks,
    rescale_second_moment,
    window_tracker,
)
from lightning_gns.tracker import GNSTracker, read_together

__all__ = ["AdaptiveBatchSize", "Change", "goodput", "goodput_rule", "lower_bound_rule",
           "lr_scale", "sqrt_rule"]  # fmt: skip

PROBE_STEPS = 2  # records the probe averages


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
class _Pending:
    """A decided change, applied when batch ``index`` of ``epoch`` starts."""

    accumulate: int
    micro: int | None
    reason: str
    noise: float  # what rank 0 knew of B_noise (LR gain, second moment: the same on all ranks)
    epoch: int
    index: int


class AdaptiveBatchSize(Callback):
    r"""Grow the batch as the gradient noise scale grows (needs a
    :class:`~lightning_gns.GradientNoiseScale` in the same ``Trainer``, before or after it).

    The first step is a probe of at least ``probe`` examples (at the user's learning rate);
    its noise scale sets the batch the run continues with. Every ``check_every_n_steps``
    steps the rule (:mod:`lightning_gns.growth`) may change the batch by powers of ``factor``:
    the micro-batch first, when the DataLoader draws with a
    :class:`~lightning_gns.batching.ResizableBatchSampler` and ``max_micro_batch`` allows, then
    ``accumulate_grad_batches``. A change starts with a whole accumulation window, on every DDP
    rank at the same step (rank 0 decides). The optimizer steps with the rate the user's code
    set (scheduler, ``training_step``, hooks) times the LR multiplier; the user's code only ever
    sees its own rate. Logs ``gns/accumulate``, ``gns/micro_batch``, ``gns/lr_scale`` and
    ``gns/lr`` (the rate of the last step, in ``callback_metrics`` after every step); each
    change is written to the log with its reason (and TensorBoard's text tab) and kept in
    :attr:`changes`; while it waits it says why, once (:attr:`waiting`). Resumes exactly, also
    mid-epoch and with a change decided but not yet applied.

    Args:
        max_accumulate: the largest accumulation.
        min_accumulate: the smallest; default: the trainer's ``accumulate_grad_batches``.
        rule: ``sqrt`` (default), ``noise``, ``lower_bound`` or ``goodput``
            (:mod:`lightning_gns.growth`).
        multiple: the probe starts the run at ``multiple`` × B_noise (``sqrt``, ``noise``);
            the ``noise`` rule follows ``multiple`` × B_noise from there.
        factor: integer factor of each change (2: doubling), at most 16.
        margin: ``lower_bound`` rule: grow when B_noise's lower bound ≥ margin × next batch.
        lr_scaling: ``auto`` (``sqrt`` when the optimizer keeps a second moment in its state,
            ``linear`` otherwise), ``linear``, ``sqrt``, ``adascale`` or ``none``.
        min_steps_between: optimizer steps between two changes (hysteresis in time).
        shrink: also lower the batch when the noise scale falls (accumulation only).
        max_micro_batch: the largest micro-batch per device; None: the micro-batch stays as
            the DataLoader draws it (growth by accumulation only).
        probe: examples of the first measured step (accumulated micro-batches); 0: none.
        check_every_n_steps: optimizer steps between two decisions (one small host read).
        rescale_second_moment: at a change, scale Adam's (RMSprop's) running average of
            squared gradients by the expected ratio for the new batch
            (:func:`~lightning_gns.growth.second_moment_ratio`) instead of letting it describe
            the old batch for ~1/(1 − β₂) steps.
    """

    def __init__(
        self,
        max_accumulate: int = 64,
        min_accumulate: int | None = None,
        rule: Rule = "sqrt",
        multiple: float = 1.0,
        factor: int = 2,
        margin: float = 1.0,
        lr_scaling: LRScaling = "auto",
        min_steps_between: int = 0,
        shrink: bool = False,
        max_micro_batch: int | None = None,
        probe: int = 128,
        check_every_n_steps: int = 5,
        rescale_second_moment: bool = True,
    ) -> None:
        super().__init__()
        growth.check_arguments(locals())
        self.max_accumulate, self.min_accumulate = max_accumulate, min_accumulate
        self.rule, self.multiple, self.factor = rule, float(multiple), factor
        self.margin, self.lr_scaling = float(margin), lr_scaling
        self.min_steps_between, self.shrink = min_steps_between, shrink
        self.max_micro_batch, self.probe = max_micro_batch, probe
        self.check_every_n_steps = check_every_n_steps
        self.rescale_second_moment = rescale_second_moment

        self.accumulate: int | None = None  # current accumulation (None before fit)
        self.micro: int | None = None  # current micro-batch, with a ResizableBatchSampler
        self.base: tuple[int, int | None] | None = None  # the user's (accumulation, micro)
        self.lr_scale = 1.0
        self.changes: list[Change] = []
        self.waiting: str | None = None  # why the batch does not change now (said once)
        self.reference: tuple[float, float] | None = None  # (B₀, B_noise₀), sqrt rule
        self._pending: _Pending | None = None
        self._probing = False
        self._last_change = 0
        self._said: set[str] = set()
        self._gns: GradientNoiseScale | None = None
        self._tracker: GNSTracker | None = None  # B_noise since the last change
        self._saved_tracker: dict[str, Any] | None = None
        self._sampler: batching.ResizableBatchSampler | None = None
        self._trainer: pl.Trainer | None = None
        self._timer = StepTimer()
        self._lr: LRScaler | None = None
        self._ready = 0  # batches of this epoch fetched (from the hooks' batch_idx)

    # -- set-up ---------------------------------------------------------------------------
    def start_accumulation(self, trainer: pl.Trainer) -> int:
        """The accumulation the run starts from: the trainer's within the bounds (or the
        resumed one). The probe may raise it for the first step only."""
        if self.accumulate is not None:
            return self.accumulate
        return min(max(trainer.accumulate_grad_batches, self.min_accumulate or 1),
                   self.max_accumulate)  # fmt: skip

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._gns = _refuse(trainer, pl_module)
        self._trainer = trainer
        fresh = self.accumulate is None
        self.accumulate = self.start_accumulation(trainer)
        if self.min_accumulate is None:
            self.min_accumulate = self.accumulate
        if fresh:
            self.base = (self.accumulate, None)
            self._probing = self.rule in ("noise", "sqrt") and self.probe > 0
        trainer.accumulate_grad_batches = self.accumulate
        self._lr = LRScaler(trainer.optimizers[0], self._after_step)
        self._lr.scale = self.lr_scale
        self._tracker = window_tracker(pl_module.device)
        if self._saved_tracker:
            self._tracker.load_state_dict(self._saved_tracker)
        if self._record not in self._gns.step_listeners:
            self._gns.step_listeners.append(self._record)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = batching.find_sampler(trainer)
        if sampler is not None and sampler is not self._sampler:  # first epoch, or reloaded
            if self.micro is None:
                self.micro = sampler.batch_size
                assert self.base is not None
                self.base = (self.base[0], self.micro)
            elif not sampler.resumed:  # a reloaded DataLoader: its sampler starts as built
                p = self._pending
                due = p is not None and p.micro is not None and p.epoch <= trainer.current_epoch
                sampler.batch_size = p.micro if due and p is not None and p.micro else self.micro
        if sampler is None:
            self.micro = None
        else:
            sampler.set_epoch(trainer.current_epoch)
        self._sampler = sampler

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._lr is not None:
            self._lr.remove()
            self._lr = None
        if self._gns is not None and self._record in self._gns.step_listeners:
            self._gns.step_listeners.remove(self._record)
        if self._tracker is not None:
            self._saved_tracker = self._tracker.state_dict(trainer.world_size > 1)
        batching.resume_next(None)

    # -- per step -------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        p, index = self._pending, batch_idx
        self._ready = batch_idx + 1
        if p is not None and (trainer.current_epoch, index) >= (p.epoch, p.index):
            self._apply(trainer, p)
        if self._probing and trainer.global_step == 0 and index == 0:
            self._start_probe(trainer, batch)
        if self._timer.start is None:
            self._timer.start = time.perf_counter()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._timer.before_step = time.perf_counter()

    def _start_probe(self, trainer: pl.Trainer, batch: Any) -> None:
        """The first steps accumulate at least ``probe`` examples (at the user's rate) until
        one gives a record: its noise scale picks the batch to go on with."""
        assert self._gns is not None and self.accumulate is not None
        fn = self._gns.batch_size_fn
        micro = int(fn(batch) if fn else extract_batch_size(batch)) * trainer.world_size
        accumulate = self.accumulate
        while micro * accumulate < self.probe and accumulate * self.factor <= self.max_accumulate:
            accumulate *= self.factor
        self.accumulate = trainer.accumulate_grad_batches = accumulate

    def _record(self, sample: StepNorms | None) -> None:
        """Each step's record from GradientNoiseScale (in its on_before_optimizer_step)."""
        if self._tracker is not None:
            self._tracker.record(sample)

    def _after_step(self, lr: float) -> None:
        """After every update (the LR scaler's post-hook: after every callback's
        ``on_before_optimizer_step``, whatever their order): ``gns/lr``, and a decision when
        one is due."""
        trainer = self._trainer
        if trainer is None:
            return
        _compat.set_callback_metrics(trainer, {keys.LR: lr})
        done = trainer.global_step + 1  # Lightning counts this step after the hook
        if self._probing or done % self.check_every_n_steps == 0:
            self._decide(trainer, done)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._timer.before_step is not None:
            self._timer.observe(time.perf_counter())

    # -- decisions ------------------------------------------------------------------------
    def _decide(self, trainer: pl.Trainer, done: int) -> None:
        """Read the window (one reduction across ranks), let rank 0 choose, every rank takes
        its choice (one broadcast) and schedules it for the same batch index."""
        assert self._tracker is not None and self.accumulate is not None
        values = read_together([self._tracker], sync=trainer.world_size > 1)[0][MODEL]
        noise, _ = growth.noise_bound(values)
        if self.lr_scaling == "adascale":  # the gain follows the estimate at every read
            self._set_lr_scale(trainer, self._batch(self.accumulate, self.micro), noise)
        choice = self._choose(values, done) if trainer.is_global_zero else None
        choice = trainer.strategy.broadcast(choice, src=0)
        finite = math.isfinite(values.b_simple) and values.b_simple > 0
        if self._probing and values.steps >= PROBE_STEPS and finite:
            noise, self._probing = values.b_simple, False  # the probe's record is in
            self._restart_window()
            self._set_lr_scale(trainer, self._batch(self.accumulate, self.micro), noise)
            if self.rule == "sqrt":
                target = choice[:2] if isinstance(choice, tuple) else (self.accumulate, self.micro)
                self.reference = (self._batch(*target), noise)
        if isinstance(choice, str):
            self._wait(choice)
        elif choice is not None:
            accumulate, micro, reason = choice
            self._schedule(trainer, accumulate, micro, reason, noise)
        self._publish(trainer)

    def _choose(self, v: GNSValues, done: int) -> tuple[int, int | None, str] | str | None:
        """(accumulation, micro-batch, reason) to change to, the reason to wait, or None."""
        assert self.accumulate is not None
        if self._pending is not None:
            return None
        batch = self._batch(self.accumulate, self.micro)
        if self._probing:
            return self._after_probe(v, batch)
        if self.rule == "sqrt" and self.reference is None and v.known:  # no probe
            self.reference = (batch, v.b_simple)
        left = self.min_steps_between - (done - self._last_change)
        if self.changes and left > 0:
            return f"{left} more steps before the next change (min_steps_between): waiting"
        move = self._move(v, batch)
        if move.steps == 0 or (move.steps < 0 and not self.shrink):
            return move.reason if move.steps == 0 else None
        accumulate, micro = self._allocate(self._level(batch) + move.steps)
        if (accumulate, micro) == (self.accumulate, self.micro):
            bound = "largest" if move.steps > 0 else "smallest"
            return f"{move.reason.rsplit(':', 1)[0]}, but the batch is at its {bound}: staying"
        return accumulate, micro, move.reason

    def _after_probe(self, v: GNSValues, batch: float) -> tuple[int, int | None, str] | str | None:
        """The probe's records set the batch to go on with (:func:`growth.probe_level`)."""
        if v.steps < PROBE_STEPS:
            return None  # not enough records yet (the per-example check step has none)
        found = growth.probe_level(v, batch, self._base_batch(), self.factor, self.multiple)
        if found is None:
            return None
        accumulate, micro = self._allocate(found[0])
        if (accumulate, micro) == (self.accumulate, self.micro):
            return f"{found[1]}: staying"
        return accumulate, micro, f"{found[1]}: going on at {_int(self._batch(accumulate, micro))}"

    def _move(self, v: GNSValues, batch: float) -> growth.Move:
        return growth.move(self.rule, v, batch, self.factor, self.multiple, self.margin,
                           self.shrink, self.reference, self._timer.timing)  # fmt: skip

    def _level(self, batch: float) -> int:
        return round(math.log(batch / self._base_batch(), self.factor))

    def _allocate(self, level: int) -> tuple[int, int | None]:
        """The accumulation and micro-batch of the batch ``factor**level`` × the user's: the
        micro-batch first (up to ``max_micro_batch``; it never shrinks), then accumulation,
        within the bounds."""
        assert self.base is not None and self.min_accumulate is not None
        base_acc, base_micro = self.base
        micro_levels = 0
        if self.micro is not None and base_micro is not None and self.max_micro_batch:
            while base_micro * self.factor ** (micro_levels + 1) <= self.max_micro_batch:
                micro_levels += 1
            now = round(math.log(self.micro / base_micro, self.factor))
            level = max(level, now)  # a micro-batch never shrinks (Lightning's epoch length)
        j = min(max(level, 0), micro_levels)
        accumulate = base_acc * self.factor ** max(level - j, 0)
        accumulate = min(max(accumulate, self.min_accumulate), self.max_accumulate)
        micro = base_micro * self.factor**j if base_micro is not None else self.micro
        return accumulate, micro if self.micro is not None else None

    def _schedule(
        self, trainer: pl.Trainer, accumulate: int, micro: int | None, why: str, noise: float
    ) -> None:
        """The first batch that starts a whole window of both the old and the new accumulation
        and that no DataLoader worker has drawn yet (the largest over ranks): the change
        starts there, or with the next epoch."""
        assert self.accumulate is not None
        ready = _compat.batches_ready(trainer, self._ready)
        sampler = self._sampler if micro != self.micro and micro is not None else None
        resize = sampler is not None
        drawn = max_over_ranks(trainer, max(ready, sampler.drawn)) if sampler else ready
        window = max(self.accumulate, accumulate)
        at = -(-drawn // window) * window
        epoch = trainer.current_epoch
        if resize:
            assert self._sampler is not None and micro is not None
            epoch, at = self._sampler.resize(micro, at)
            _compat.sync_epoch_length(trainer)
        elif at >= trainer.num_training_batches:
            epoch, at = epoch + 1, 0
        self._pending = _Pending(accumulate, micro, why, noise, epoch, at)

    def _apply(self, trainer: pl.Trainer, p: _Pending) -> None:
        assert self.accumulate is not None and self._gns is not None
        old, old_micro = self.accumulate, self.micro
        old_batch = self._batch(old, old_micro)
        self.accumulate, self.micro, self._pending = p.accumulate, p.micro, None
        trainer.accumulate_grad_batches = p.accumulate
        if p.micro != old_micro and p.micro is not None:
            self._gns.micro_batch_resized(p.micro)
        self._last_change, self.waiting = trainer.global_step, None
        self._said.clear()
        self._timer.reset()
        batch = self._batch(p.accumulate, p.micro)
        adam = ""
        if self.rescale_second_moment:
            ratio = growth.second_moment_ratio(p.noise, old_batch, batch)
            if ratio != 1.0 and rescale_second_moment(trainer.optimizers[0], ratio):
                adam = f", second moment × {ratio:.3g}"
        self._set_lr_scale(trainer, batch, p.noise)
        self._restart_window()
        change = Change(trainer.global_step, old, p.accumulate, batch, self.lr_scale, p.reason,
                        old_micro, p.micro)  # fmt: skip
        self.changes.append(change)
        parts = [f"accumulate_grad_batches {old} -> {p.accumulate}"] if old != p.accumulate else []
        if p.micro != old_micro:
            parts.insert(0, f"micro-batch {old_micro} -> {p.micro}")
        message = (
            f"AdaptiveBatchSize: step {change.step}: batch {_int(old_batch)} -> {_int(batch)} "
            f"({', '.join(parts)}), learning rate × {self.lr_scale:.4g} "
            f"({self._scaling(trainer)}{adam}) because {p.reason}"
        )
        rank_zero_info(message)
        for logger in trainer.loggers:  # the reason, where a logger takes text
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text(keys.BATCH_SIZE_CHANGE, message, trainer.global_step)
        self._publish(trainer)

    def _wait(self, reason: str) -> None:
        """Say once why the batch stays (again after a change, or for another kind of reason:
        the same words with other numbers are the same kind)."""
        self.waiting = reason
        kind = re.sub(r"[0-9][0-9,.]*", "#", reason)
        if kind not in self._said:
            self._said.add(kind)
            batch = self._batch(self.accumulate or 1, self.micro)
            rank_zero_info(f"AdaptiveBatchSize: batch {_int(batch)}: {reason}")

    # -- batch and learning rate ----------------------------------------------------------
    def _restart_window(self) -> None:
        """B_noise from here on: measured at the new batch, and later in training."""
        assert self._tracker is not None
        self._tracker = window_tracker(self._tracker.moments.device)

    def _base_batch(self) -> float:
        assert self.base is not None
        acc, micro = self.base
        return self._batch(acc, micro if micro is not None else self.micro)

    def _batch(self, accumulate: int, micro: int | None) -> float:
        """Examples per optimizer step: micro-batch × accumulation × world size (the
        monitor's usual micro-batch when no resizable sampler says it)."""
        gns, trainer = self._gns, self._trainer
        assert gns is not None and trainer is not None
        if micro is not None:
            return float(micro * accumulate * trainer.world_size)
        return gns.batch_size / trainer.accumulate_grad_batches * accumulate

    def _set_lr_scale(self, trainer: pl.Trainer, batch: float, noise: float) -> None:
        base = self._base_batch()
        self.lr_scale = lr_scale(self._scaling(trainer), batch, base, noise)
        if self._lr is not None:
            self._lr.scale = self.lr_scale

    def _scaling(self, trainer: pl.Trainer) -> str:
        if self.lr_scaling != "auto":
            return self.lr_scaling
        return "sqrt" if keeps_second_moment(trainer.optimizers[0]) else "linear"

    def _publish(self, trainer: pl.Trainer) -> None:
        assert self.accumulate is not None
        metrics = {keys.ACCUMULATE: float(self.accumulate), keys.LR_SCALE: self.lr_scale}
        if self.micro is not None:
            metrics[keys.MICRO_BATCH] = float(self.micro)
        if self._lr is not None and math.isfinite(self._lr.applied):
            metrics[keys.LR] = self._lr.applied
        publish(trainer, None, metrics)

    # -- checkpoints ----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        sampler = None
        if self._sampler is not None and self._trainer is not None:
            consumed = _compat.batches_ready(self._trainer, self._ready)
            sampler = self._sampler.state_dict(consumed)
        tracker = self._saved_tracker
        if self._tracker is not None:
            t = self._trainer
            tracker = self._tracker.state_dict(t is not None and t.world_size > 1)
        return {
            "accumulate": self.accumulate,
            "micro": self.micro,
            "base": list(self.base) if self.base is not None else None,
            "min_accumulate": self.min_accumulate,
            "lr_scale": self.lr_scale,
            "reference": self.reference,
            "last_change": self._last_change,
            "probing": self._probing,
            "changes": [asdict(c) for c in self.changes],
            "pending": asdict(self._pending) if self._pending is not None else None,
            "tracker": tracker,
            "sampler": sampler,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accumulate = state_dict.get("accumulate")
        self.micro = state_dict.get("micro")
        base = state_dict.get("base")
        self.base = (int(base[0]), base[1]) if base else None
        self.min_accumulate = self.min_accumulate or state_dict.get("min_accumulate")
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        ref = state_dict.get("reference")
        self.reference = (float(ref[0]), float(ref[1])) if ref else None
        self._last_change = int(state_dict.get("last_change", 0))
        self._probing = bool(state_dict.get("probing", False))
        self.changes = [Change(**c) for c in state_dict.get("changes", [])]
        pending = state_dict.get("pending")
        self._pending = _Pending(**pending) if pending else None
        self._saved_tracker = state_dict.get("tracker")
        batching.resume_next(state_dict.get("sampler"))


def _int(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "?"


def _refuse(trainer: pl.Trainer, pl_module: pl.LightningModule) -> GradientNoiseScale:
    """The GradientNoiseScale to act on, or a clear error for what this cannot drive."""
    name = "AdaptiveBatchSize"
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise RuntimeError(f"{name}: DeepSpeed owns gradient accumulation; it is not supported")
    if not pl_module.automatic_optimization:
        raise RuntimeError(f"{name}: manual optimization steps on its own schedule; unsupported")
    callbacks = list(getattr(trainer, "callbacks", []))
    if any(isinstance(c, GradientAccumulationScheduler) for c in callbacks):
        raise RuntimeError(
            f"{name}: a GradientAccumulationScheduler is attached; both would set "
            "accumulate_grad_batches. Remove one of them"
        )
    found = [c for c in callbacks if isinstance(c, GradientNoiseScale)]
    if not found:
        raise RuntimeError(
            f"{name} acts on the measured noise scale: add GradientNoiseScale() to the "
            "Trainer's callbacks as well"
        )
    return found[0]
