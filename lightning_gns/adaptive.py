"""Grow the batch with the gradient noise scale: micro-batch, then accumulation; LR scaling.

McCandlish et al. 2018 (arXiv 1812.06162): the best batch tracks B_noise, which grows as the
loss falls (§5, "dynamic batch size"). :class:`AdaptiveBatchSize` reads
:class:`~lightning_gns.GradientNoiseScale`'s estimate at each of its read-outs and changes the
batch by factors at an optimizer-step boundary: first the per-device micro-batch (with a
:class:`~lightning_gns.batching.ResizableBatchSampler` in the DataLoader, up to
``max_micro_batch``), then ``Trainer.accumulate_grad_batches``. The rules are pure functions in
:mod:`lightning_gns.growth`. The learning rate the optimizer steps with is the one the user's
code set (scheduler, ``training_step``, hooks) times the rule's multiplier.
"""

from __future__ import annotations

import math
import re
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

from lightning_gns import batching
from lightning_gns.callback import GradientNoiseScale, publish
from lightning_gns.estimator import GNSValues
from lightning_gns.growth import (
    Move,
    goodput,
    goodput_rule,
    lower_bound_rule,
    lr_scale,
    noise_rule,
    second_moment_ratio,
    sqrt_rule,
)
from lightning_gns.norms.preconditioner import keeps_second_moment

__all__ = ["AdaptiveBatchSize", "Change", "goodput", "goodput_rule", "lower_bound_rule",
           "lr_scale", "sqrt_rule"]  # fmt: skip

Rule = Literal["noise", "lower_bound", "sqrt", "goodput"]
LRScaling = Literal["auto", "linear", "sqrt", "adascale", "none"]
MAX_FACTOR = 16  # a larger factor per change jumps past the batch the noise scale asks for
MAX_ACCUMULATE = 2**16  # guards against a typo: no run accumulates more micro-batches


@dataclass(frozen=True)
class Change:
    """One change of the batch: the optimizer step it starts at, accumulation and micro-batch
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
    epoch: int
    index: int


class _LRScaler:
    """Multiplies every parameter group's rate by ``scale`` for the optimizer's update only.

    Lightning runs ``training_step``, backward and ``on_before_optimizer_step`` inside
    ``optimizer.step(closure)``, so the step's pre-hook wraps the closure: the rates are
    scaled after the closure (after every line of the user's code), just before the update,
    and put back to the user's values by the post-hook. Without a closure (AMP with a
    GradScaler runs it first) the pre-hook scales at once."""

    def __init__(self, optimizer: torch.optim.Optimizer, on_step: Any) -> None:
        self.scale = 1.0
        self.applied = math.nan  # group 0's rate in the last update
        self._saved: list[Any] | None = None
        self._on_step = on_step
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        self._restore(optimizer)  # a step that raised left the scaled rates
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:
            self._apply(optimizer)
            return None

        def scaled_closure() -> Any:
            out = closure()
            self._apply(optimizer)
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": scaled_closure}
        return (scaled_closure, *args[1:]), kwargs

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        if self._saved is not None:  # a closure called twice (LBFGS): scale once
            return
        self._saved = [g["lr"] for g in optimizer.param_groups]
        if self.scale != 1.0:
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.scale
        self.applied = float(optimizer.param_groups[0]["lr"])

    def _post(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._restore(optimizer)
        self._on_step(self.applied)

    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        if self._saved is not None:
            for g, lr in zip(optimizer.param_groups, self._saved, strict=False):
                g["lr"] = lr
            self._saved = None


class _Timer:
    """Host time per optimizer step: forward and backward (c) and the rest (a), smoothed."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.before_step: float | None = None
        self.a = self.c = math.nan
        self.n = 0

    def observe(self, now: float) -> None:
        if self.start is None or self.before_step is None:
            return
        a, c = now - self.before_step, self.before_step - self.start
        w = max(0.05, 1.0 / (self.n + 1))  # running mean, then an EMA of about 20 steps
        self.a = a if self.n == 0 else (1 - w) * self.a + w * a
        self.c = c if self.n == 0 else (1 - w) * self.c + w * c
        self.n += 1
        self.start = self.before_step = None

    def reset(self) -> None:
        """A new batch: the old timing does not describe it."""
        self.n = 0

    @property
    def timing(self) -> tuple[float, float] | None:
        return (self.a, self.c) if self.n >= 5 else None


class AdaptiveBatchSize(Callback):
    r"""Grow the batch as the gradient noise scale grows (needs a
    :class:`~lightning_gns.GradientNoiseScale` in the same ``Trainer``; the order of the two
    in ``callbacks`` does not matter).

    At each read-out of the noise scale the rule (:mod:`lightning_gns.growth`) may change the
    batch by ``factor``: the micro-batch first, when the DataLoader draws with a
    :class:`~lightning_gns.batching.ResizableBatchSampler` and ``max_micro_batch`` allows, then
    ``accumulate_grad_batches``. A change starts with a whole accumulation window, on every DDP
    rank at the same step (rank 0 decides). The optimizer steps with the rate the user's code
    set (scheduler, ``training_step``, hooks) times the LR multiplier; the scheduler and the
    user's code only ever see their own rate. Logs ``gns/accumulate``, ``gns/micro_batch``,
    ``gns/lr_scale`` and ``gns/lr`` (the rate of the last step, in ``callback_metrics`` after
    every step); each change is written to the log with its reason (and TensorBoard's text
    tab) and kept in :attr:`changes`; while it waits, it says why once (:attr:`waiting`).
    Resumes exactly, also mid-epoch and with a change decided but not yet applied.

    Args:
        max_accumulate: the largest accumulation.
        min_accumulate: the smallest; default: the trainer's ``accumulate_grad_batches``.
        rule: ``lower_bound``, ``sqrt`` or ``goodput`` (:mod:`lightning_gns.growth`).
        factor: integer factor of each change (2: doubling), at most 16.
        margin: ``lower_bound`` rule: grow when B_noise's lower bound ≥ margin × next batch.
        lr_scaling: ``auto`` (``sqrt`` when the optimizer keeps a second moment in its state,
            ``linear`` otherwise), ``linear``, ``sqrt``, ``adascale`` or ``none``.
        min_steps_between: optimizer steps between two changes (hysteresis in time).
        shrink: also lower the batch when the noise scale falls (accumulation only).
        max_micro_batch: the largest micro-batch per device; None: the micro-batch stays as
            the DataLoader draws it (growth by accumulation only).
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
        max_micro_batch: int | None = None,
        scale: float = 1.0,
        second_moment: bool = False,
    ) -> None:
        super().__init__()
        _check_arguments(locals())
        self.max_accumulate, self.min_accumulate = max_accumulate, min_accumulate
        self.rule, self.factor, self.margin = rule, factor, float(margin)
        self.lr_scaling, self.min_steps_between, self.shrink = lr_scaling, min_steps_between, shrink
        self.max_micro_batch, self.scale = max_micro_batch, float(scale)
        self.second_moment = second_moment

        self.accumulate: int | None = None  # current accumulation (None before fit)
        self.micro: int | None = None  # current micro-batch, with a ResizableBatchSampler
        self.base_batch: float | None = None  # the batch at the start: LR scale 1
        self.lr_scale = 1.0
        self.changes: list[Change] = []
        self.waiting: str | None = None  # why the batch does not change now (said once)
        self.reference: tuple[float, float] | None = None  # (B₀, B_noise₀), sqrt rule
        self._pending: _Pending | None = None
        self._steps = self._last_change = 0
        self._said: set[str] = set()
        self._gns: GradientNoiseScale | None = None
        self._sampler: batching.ResizableBatchSampler | None = None
        self._trainer: pl.Trainer | None = None
        self._timer = _Timer()
        self._lr: _LRScaler | None = None

    # -- set-up ---------------------------------------------------------------------------
    def start_accumulation(self, trainer: pl.Trainer) -> int:
        """The accumulation of the first step: the trainer's, within the bounds (or the
        resumed one)."""
        if self.accumulate is not None:
            return self.accumulate
        start = max(trainer.accumulate_grad_batches, self.min_accumulate or 1)
        return min(start, self.max_accumulate)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._gns = _refuse(trainer, pl_module)
        self._trainer = trainer
        self.accumulate = self.start_accumulation(trainer)
        if self.min_accumulate is None:
            self.min_accumulate = min(trainer.accumulate_grad_batches, self.accumulate)
        trainer.accumulate_grad_batches = self.accumulate
        self._lr = _LRScaler(trainer.optimizers[0], self._stepped)
        self._lr.scale = self.lr_scale
        if self._decide not in self._gns.read_listeners:
            self._gns.read_listeners.append(self._decide)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = batching.find_sampler(trainer)
        if sampler is not None and sampler is not self._sampler:  # first epoch, or reloaded
            if self.micro is None:
                self.micro = sampler.batch_size
            elif not sampler.resumed:  # a reloaded DataLoader: its sampler starts as built
                p = self._pending
                due = p is not None and p.micro is not None and p.epoch <= trainer.current_epoch
                sampler.batch_size = p.micro if due and p.micro else self.micro
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
        if self._gns is not None and self._decide in self._gns.read_listeners:
            self._gns.read_listeners.remove(self._decide)
        batching.resume_next(None)

    # -- per step -------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        p = self._pending
        index = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        if p is not None and (trainer.current_epoch, index) >= (p.epoch, p.index):
            self._apply(trainer, p)
        if self._timer.start is None:
            self._timer.start = time.perf_counter()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._timer.before_step = time.perf_counter()

    def _stepped(self, lr: float) -> None:
        """After every optimizer step (the LR scaler's post-hook)."""
        if self._trainer is not None:
            self._trainer.callback_metrics["gns/lr"] = torch.tensor(lr)

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
        self._timer.observe(time.perf_counter())
        self._steps += 1

    # -- decisions ------------------------------------------------------------------------
    def _decide(self, trainer: pl.Trainer) -> None:
        """At each read-out of the noise scale: rank 0 picks the next batch, every rank takes
        it (one broadcast), and schedules it for the same batch index."""
        assert self._gns is not None and self.accumulate is not None
        if self.base_batch is None:  # the first read-out: the monitor knows the micro-batch
            self.base_batch = self._batch_now()
        if self.lr_scaling == "adascale":  # the gain follows the estimate at every read-out
            self._set_lr_scale(trainer, self._batch(self.accumulate, self.micro))
        choice = self._choose(self._gns.values) if trainer.is_global_zero else None
        choice = trainer.strategy.broadcast(choice, src=0)
        if isinstance(choice, str):
            self._wait(choice)
        elif choice is not None:
            accumulate, micro, reason = choice
            self._schedule(trainer, accumulate, micro, reason)
        self._publish(trainer)

    def _choose(self, v: GNSValues) -> tuple[int, int | None, str] | str | None:
        """(accumulation, micro-batch, reason) to change to, the reason to wait, or None."""
        assert self.accumulate is not None and self.min_accumulate is not None
        if self._pending is not None:
            return None
        batch = self._batch(self.accumulate, self.micro)
        if self.rule == "sqrt" and self.reference is None and v.known:
            self.reference = (batch, v.b_simple)
        left = self.min_steps_between - (self._steps - self._last_change)
        if self.changes and left > 0:
            return f"{left} more steps before the next change (min_steps_between): waiting"
        move = self._move(v, batch)
        if move.steps == 0 or (move.steps < 0 and not self.shrink):
            return move.reason if move.steps == 0 else None
        accumulate, micro = self._split(move.steps)
        if (accumulate, micro) == (self.accumulate, self.micro):
            bound = "largest" if move.steps > 0 else "smallest"
            return f"{move.reason.rsplit(':', 1)[0]}, but the batch is at its {bound}: staying"
        return accumulate, micro, move.reason

    def _move(self, v: GNSValues, batch: float) -> Move:
        if self.rule == "noise":
            return noise_rule(v, batch, self.factor, self.scale, self.shrink)
        if self.rule == "lower_bound":
            return lower_bound_rule(v, batch, self.factor, self.margin, self.shrink)
        if self.rule == "sqrt":
            return sqrt_rule(v, batch, self.factor, self.reference)
        return goodput_rule(v, batch, self.factor, self._timer.timing)

    def _split(self, steps: int) -> tuple[int, int | None]:
        """The accumulation and micro-batch ``steps`` factors away: the micro-batch grows first
        (up to ``max_micro_batch``), accumulation shrinks first (micro-batches never shrink)."""
        assert self.accumulate is not None and self.min_accumulate is not None
        accumulate, micro, f = self.accumulate, self.micro, self.factor
        for _ in range(abs(steps)):
            if steps > 0 and micro is not None and self._micro_fits(micro * f):
                micro *= f
            elif steps > 0 and accumulate * f <= self.max_accumulate:
                accumulate *= f
            elif steps < 0 and accumulate // f >= self.min_accumulate and accumulate % f == 0:
                accumulate //= f
            else:
                break
        return accumulate, micro

    def _micro_fits(self, micro: int) -> bool:
        return self.max_micro_batch is not None and micro <= self.max_micro_batch

    def _schedule(self, trainer: pl.Trainer, accumulate: int, micro: int | None, why: str) -> None:
        """The first batch that starts a whole window of both the old and the new accumulation
        and that no DataLoader worker has drawn yet (every rank agrees): the change starts
        there, or with the next epoch."""
        assert self.accumulate is not None
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        drawn = ready
        if micro != self.micro and self._sampler is not None:
            drawn = _max_over_ranks(trainer, max(ready, self._sampler.drawn))
        window = max(self.accumulate, accumulate)
        at = -(-drawn // window) * window
        epoch = trainer.current_epoch
        if micro != self.micro and self._sampler is not None and micro is not None:
            epoch, at = self._sampler.resize(micro, at)
            batching.sync_epoch_length(trainer)
        elif at >= trainer.num_training_batches:
            epoch, at = epoch + 1, 0
        self._pending = _Pending(accumulate, micro, why, epoch, at)

    def _apply(self, trainer: pl.Trainer, p: _Pending) -> None:
        assert self.accumulate is not None
        old, old_micro = self.accumulate, self.micro
        self.accumulate, self.micro, self._pending = p.accumulate, p.micro, None
        trainer.accumulate_grad_batches = p.accumulate
        if p.micro != old_micro and self._gns is not None and p.micro is not None:
            self._gns.micro_batch_resized(p.micro)
        self._last_change, self.waiting = self._steps, None
        self._said.clear()
        self._timer.reset()
        batch = self._batch(p.accumulate, p.micro)
        if self.second_moment:
            self._rescale_second_moment(trainer, self._batch(old, old_micro), batch)
        self._set_lr_scale(trainer, batch)
        change = Change(self._steps, old, p.accumulate, batch, self.lr_scale, p.reason,
                        old_micro, p.micro)  # fmt: skip
        self.changes.append(change)
        parts = [f"accumulate_grad_batches {old} -> {p.accumulate}"] if old != p.accumulate else []
        if p.micro != old_micro:
            parts.insert(0, f"micro-batch {old_micro} -> {p.micro}")
        message = (
            f"AdaptiveBatchSize: step {change.step}: batch {_int(self._batch(old, old_micro))} "
            f"-> {_int(batch)} ({', '.join(parts)}), learning rate × {self.lr_scale:.4g} "
            f"({self._scaling(trainer)}) because {p.reason}"
        )
        rank_zero_info(message)
        for logger in trainer.loggers:  # the reason, where a logger takes text
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text("gns/batch_size_change", message, trainer.global_step)
        self._publish(trainer)

    def _rescale_second_moment(self, trainer: pl.Trainer, old: float, new: float) -> None:
        """Adam's v averages squared gradients over ~1/(1 − β₂) steps: after a change it would
        describe the old batch's noise for that long. Scale it to the new batch at once."""
        assert self._gns is not None
        v = self._gns.values
        noise = v.b_simple if v.known else v.b_simple_lower
        ratio = second_moment_ratio(noise, old, new)
        for state in trainer.optimizers[0].state.values():
            for key in ("exp_avg_sq", "max_exp_avg_sq", "square_avg"):
                if isinstance(state.get(key), torch.Tensor):
                    state[key].mul_(ratio)

    def _wait(self, reason: str) -> None:
        """Say once why the batch stays (again after a change, or for another kind of reason:
        the same words with other numbers are the same kind)."""
        self.waiting = reason
        kind = re.sub(r"[0-9][0-9,.]*", "#", reason)
        if kind not in self._said:
            self._said.add(kind)
            rank_zero_info(f"AdaptiveBatchSize: batch {_int(self._batch_now())}: {reason}")

    # -- batch and learning rate ----------------------------------------------------------
    def _batch_now(self) -> float:
        return self._batch(self.accumulate or 1, self.micro)

    def _batch(self, accumulate: int, micro: int | None) -> float:
        """Examples per optimizer step: micro-batch × accumulation × world size (the
        monitor's usual micro-batch when no resizable sampler says it)."""
        gns, trainer = self._gns, self._trainer
        assert gns is not None and trainer is not None
        if micro is not None:
            return float(micro * accumulate * trainer.world_size)
        now = self.accumulate or trainer.accumulate_grad_batches
        return gns.batch_size / now * accumulate

    def _set_lr_scale(self, trainer: pl.Trainer, batch: float) -> None:
        assert self._gns is not None
        v = self._gns.values
        noise = v.b_simple if v.known else v.b_simple_lower
        base = self.base_batch if self.base_batch is not None else batch
        self.lr_scale = lr_scale(self._scaling(trainer), batch, base, noise)
        if self._lr is not None:
            self._lr.scale = self.lr_scale

    def _scaling(self, trainer: pl.Trainer) -> str:
        if self.lr_scaling != "auto":
            return self.lr_scaling
        return "sqrt" if keeps_second_moment(trainer.optimizers[0]) else "linear"

    def _publish(self, trainer: pl.Trainer) -> None:
        assert self.accumulate is not None
        metrics = {"gns/accumulate": float(self.accumulate), "gns/lr_scale": self.lr_scale}
        if self.micro is not None:
            metrics["gns/micro_batch"] = float(self.micro)
        if self._lr is not None and math.isfinite(self._lr.applied):
            metrics["gns/lr"] = self._lr.applied
        publish(trainer, metrics)

    # -- checkpoints ----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        sampler = None
        if self._sampler is not None and self._trainer is not None:
            consumed = self._trainer.fit_loop.epoch_loop.batch_progress.current.ready
            sampler = self._sampler.state_dict(consumed)
        return {
            "accumulate": self.accumulate,
            "micro": self.micro,
            "base_batch": self.base_batch,
            "min_accumulate": self.min_accumulate,
            "lr_scale": self.lr_scale,
            "reference": self.reference,
            "steps": self._steps,
            "last_change": self._last_change,
            "changes": [asdict(c) for c in self.changes],
            "pending": asdict(self._pending) if self._pending is not None else None,
            "sampler": sampler,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accumulate = state_dict.get("accumulate")
        self.micro = state_dict.get("micro")
        self.base_batch = state_dict.get("base_batch")
        self.min_accumulate = self.min_accumulate or state_dict.get("min_accumulate")
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        ref = state_dict.get("reference")
        self.reference = tuple(ref) if ref else None  # type: ignore[assignment]
        self._steps = int(state_dict.get("steps", 0))
        self._last_change = int(state_dict.get("last_change", 0))
        self.changes = [Change(**c) for c in state_dict.get("changes", [])]
        pending = state_dict.get("pending")
        self._pending = _Pending(**pending) if pending else None
        batching.resume_next(state_dict.get("sampler"))


def _int(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "?"


def _max_over_ranks(trainer: pl.Trainer, value: int) -> int:
    """The largest ``value`` of all ranks (batches drawn ahead can differ by rank)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _check_arguments(args: dict[str, Any]) -> None:
    """Refuse at construction what would misbehave later, naming the fix."""

    def integer(name: str, low: int, high: int, none: bool = False) -> None:
        value = args[name]
        if none and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in [{low}, {high:,}], got {value!r}")

    integer("max_accumulate", 1, MAX_ACCUMULATE)
    integer("min_accumulate", 1, args["max_accumulate"], none=True)
    integer("factor", 2, MAX_FACTOR)
    integer("min_steps_between", 0, 10**9)
    integer("max_micro_batch", 1, 2**31, none=True)
    for name, allowed in (("rule", Rule), ("lr_scaling", LRScaling)):
        if args[name] not in get_args(allowed):
            raise ValueError(f"{name} must be one of {get_args(allowed)}, got {args[name]!r}")
    margin = args["margin"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"margin must be a positive number, e.g. 1.0, got {margin!r}")
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive, finite number, e.g. 1.0, got {margin!r}")
    if not isinstance(args["shrink"], bool):
        raise ValueError(f"shrink must be True or False, got {args['shrink']!r}")


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
