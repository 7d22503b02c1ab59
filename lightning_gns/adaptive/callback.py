"""Grow the batch with the gradient noise scale: micro-batch, then accumulation; LR scaling.

McCandlish et al. 2018 (arXiv 1812.06162): the best batch tracks B_noise, which grows as the
loss falls (§5, "dynamic batch size"). :class:`AdaptiveBatchSize` measures B_noise from the
same per-step records as :class:`~lightning_gns.GradientNoiseScale`, in a window that restarts
at each change of batch, and changes the batch by factors at an optimizer-step boundary: first
the per-device micro-batch (with a
:class:`~lightning_gns.adaptive.sampler.ResizableBatchSampler`, up to ``max_micro_batch``), then
``Trainer.accumulate_grad_batches``. The rules are pure functions in
:mod:`lightning_gns.adaptive.rules`, the decision and the change in
:mod:`lightning_gns.adaptive.changes`; the learning rate and Adam's second moment are handled
around each step
(:mod:`lightning_gns.adaptive.per_step`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_gns import _compat, keys
from lightning_gns.adaptive import rules
from lightning_gns.adaptive.changes import Growing, Resumable, data_parallel
from lightning_gns.adaptive.ladder import Change, Ladder, Rules
from lightning_gns.adaptive.loop import LoopKeeper, epoch_size, warn_cannot_grow
from lightning_gns.adaptive.per_step import LRScaler, NoiseWindow, StepTimer
from lightning_gns.adaptive.rules import LRScaling, Rule
from lightning_gns.adaptive.sampler import ResizableBatchSampler, find_sampler, resume_next
from lightning_gns.adaptive.schedule import BatchSchedule
from lightning_gns.callback import GradientNoiseScale
from lightning_gns.trainer_setup import micro_batches_per_step

__all__ = ["AdaptiveBatchSize", "Change"]


class AdaptiveBatchSize(_compat.SuggestsArguments, Resumable, Growing, Callback):
    r"""Grow the batch as the gradient noise scale grows (needs a
    :class:`~lightning_gns.GradientNoiseScale` in the same ``Trainer``, before or after it).

    The first steps are a probe of at least ``probe`` examples (at the user's learning rate)
    until B_noise's interval is within 1.5× or 10 records are in; the run goes on at the
    largest batch at most ``multiple`` × its lower bound. Every rule grows on the interval's
    lower bound and shrinks on its upper bound, never on a point estimate. Every
    ``check_every_n_steps`` steps the rule (:mod:`lightning_gns.adaptive.rules`) may change
    the batch by powers of ``factor``: the micro-batch first, when the DataLoader draws with a
    :class:`~lightning_gns.adaptive.sampler.ResizableBatchSampler` and ``max_micro_batch``
    allows, then ``accumulate_grad_batches``. A change starts with a whole accumulation
    window, on every DDP rank at the same step (rank 0 decides). The optimizer steps with the
    rate the user's code set (scheduler, ``training_step``, hooks) times the LR multiplier; the
    user's code only ever sees its own rate. Logs ``gns/accumulate``, ``gns/micro_batch``,
    ``gns/lr_scale`` and ``gns/lr`` (the rate of the last step, in ``callback_metrics`` after
    every step); each change is written to the log with its reason (and TensorBoard's text
    tab) and kept in :attr:`changes`; while it waits it says why, once (:attr:`waiting`).
    Resumes exactly, also mid-epoch and with a change decided but not yet applied; reused in
    another fit (another Trainer or LightningModule), it starts afresh.

    Args:
        max_accumulate: the largest accumulation.
        min_accumulate: the smallest; default: the trainer's ``accumulate_grad_batches``.
        rule: ``sqrt`` (default), ``noise``, ``lower_bound`` or ``goodput``
            (:mod:`lightning_gns.adaptive.rules`).
        multiple: the probe starts the run at ``multiple`` × B_noise (``sqrt``, ``noise``);
            the ``sqrt`` rule follows ``multiple`` × √(B_noise₀·B_noise) from there, the
            ``noise`` rule ``multiple`` × B_noise. Default 0.55: just above ½ (least steps ×
            examples², eq. 2.11), chosen on measured tasks (docs/adaptive.md).
        factor: integer factor of each change (2: doubling), at most 16.
        margin: ``lower_bound`` rule: grow when B_noise's lower bound ≥ margin × next batch.
        lr_scaling: ``auto`` (``sqrt`` when the optimizer keeps a running scale of the
            gradient in its state: Adam-like, Adamax, Adafactor; ``linear`` otherwise),
            ``linear``, ``sqrt``, ``adascale`` or ``none``.
        min_steps_between: optimizer steps between two changes (hysteresis in time).
        shrink: also lower the batch when the noise scale falls (accumulation only).
        max_micro_batch: the largest micro-batch per device; None: the micro-batch stays as
            the DataLoader draws it (growth by accumulation only).
        probe: examples of the first measured step (accumulated micro-batches); 0: none.
        check_every_n_steps: optimizer steps between two decisions (one small host read).
        rescale_second_moment: at a change, scale Adam's (RMSprop's) running average of
            squared gradients by the expected ratio for the new batch
            (:func:`~lightning_gns.adaptive.rules.second_moment_ratio`) instead of letting it
            describe the old batch for ~1/(1 − β₂) steps.

    Raises:
        ValueError: at construction, an argument out of its range (the message names it).
        RuntimeError: at fit start, with the reason: no ``GradientNoiseScale`` in the
            trainer's callbacks, a ``GradientAccumulationScheduler`` (both would set the
            accumulation), manual optimization, DeepSpeed.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
        >>> adaptive = AdaptiveBatchSize(max_accumulate=32)  # grow up to 32 micro-batches
        >>> trainer = pl.Trainer(accumulate_grad_batches=1, logger=False,
        ...     callbacks=[GradientNoiseScale(), adaptive])
        >>> adaptive.rule, adaptive.factor, adaptive.changes
        ('sqrt', 2, [])
    """

    def __init__(
        self,
        max_accumulate: int = 64,
        min_accumulate: int | None = None,
        rule: Rule = "sqrt",
        multiple: float = 0.55,
        factor: int = 2,
        margin: float = 1.0,
        lr_scaling: LRScaling = "auto",
        min_steps_between: int = 0,
        shrink: bool = False,
        max_micro_batch: int | None = None,
        probe: int = 32,
        check_every_n_steps: int = 5,
        rescale_second_moment: bool = True,
    ) -> None:
        super().__init__()
        rules.check_arguments(locals())
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.max_accumulate, self.min_accumulate = max_accumulate, min_accumulate
        self.rule, self.factor, self.lr_scaling = rule, factor, lr_scaling
        self.max_micro_batch, self.probe = max_micro_batch, probe
        self.check_every_n_steps = check_every_n_steps
        self.rescale_second_moment = rescale_second_moment
        self.lr_scale = 1.0
        self.batches = BatchSchedule()  # accumulation and micro-batch now, changes
        self._based = False  # the user's batch (the ladder's base) is set
        self._ladder = Ladder(factor, max_accumulate, max_micro_batch, lambda: math.nan)
        self._rules = Rules(rule, factor, float(multiple), float(margin), shrink,
                            min_steps_between)  # fmt: skip
        self._probing = False
        self._gns: GradientNoiseScale | None = None
        self._window = NoiseWindow()  # B_noise since the last change
        self._sampler: ResizableBatchSampler | None = None
        self._trainer: pl.Trainer | None = None
        self._timer = StepTimer()
        self._lr: LRScaler | None = None
        self._ready = 0  # batches of this epoch fetched (from the hooks' batch_idx)
        self._loop = LoopKeeper()  # the user's epoch and validation schedule, in examples
        self._warned = False

    @property
    def accumulate(self) -> int | None:
        """The accumulation now (None before fit)."""
        return self.batches.accumulate

    @property
    def changes(self) -> list[Change]:
        """Every change so far, with its reason."""
        return self.batches.changes

    @property
    def waiting(self) -> str | None:
        """Why the batch does not change now (said once)."""
        return self.batches.waiting

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
        self._begin_run((id(trainer), id(pl_module)))
        self._gns = gns = _refuse(trainer, pl_module)
        self._trainer, ladder = trainer, self._ladder
        if self.accumulate is None:  # not resumed
            self._probing = self.rule in ("noise", "sqrt") and self.probe > 0
        accumulate = self.batches.accumulate = self.start_accumulation(trainer)
        if self.accumulate != trainer.accumulate_grad_batches and not self.changes:
            rank_zero_warn(f"AdaptiveBatchSize: Trainer(accumulate_grad_batches="
                           f"{trainer.accumulate_grad_batches}) is outside [min_accumulate, "
                           f"max_accumulate]; the run starts at {accumulate}")  # fmt: skip
        self.min_accumulate = self.min_accumulate or accumulate
        ladder.min_accumulate, ladder.world_size = self.min_accumulate, data_parallel(trainer)
        ladder.examples_per_micro = lambda: (
            gns.batch_size / (micro_batches_per_step(trainer) * data_parallel(trainer))
        )
        ladder.epoch = lambda m: epoch_size(trainer, self._loop, self._sampler, m)
        if not self._based:
            ladder.base, self._based = (accumulate, None), True
        trainer.accumulate_grad_batches = accumulate
        self._lr = LRScaler(trainer.optimizers[0], self._after_step)
        self._lr.scale = self.lr_scale
        self._window.start(pl_module.device)
        if self._window.record not in gns.step_listeners:
            gns.step_listeners.append(self._window.record)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sampler is None and self.batches.micro is not None:  # resumed mid-epoch:
            self._sampler = find_sampler(trainer)  # no epoch start before its batches

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = find_sampler(trainer)
        if self.batches.follow(sampler, self._sampler, trainer.current_epoch):
            self._ladder.base = (self._ladder.base[0], self.batches.micro)
        self._sampler = sampler
        if not self._warned:
            self._warned = warn_cannot_grow(trainer, self.max_micro_batch)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run = (id(trainer), id(pl_module))  # its next fit continues; another starts afresh
        if self._lr is not None:
            self._lr.remove()
            self._lr = None
        if self._gns is not None and self._window.record in self._gns.step_listeners:
            self._gns.step_listeners.remove(self._window.record)
        self._window.stop(trainer.world_size > 1)
        resume_next(None)

    # -- per step -------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ready = batch_idx + 1
        if (p := self.batches.due(trainer.current_epoch, batch_idx)) is not None:
            self._apply(trainer, p)
        if self._loop.loop is None and self._sampler is not None:
            self._loop.start(trainer, self._sampler, self._ladder.base[1])
        self._loop.before_batch(trainer, self._sampler)
        if self._probing and trainer.global_step == 0 and batch_idx == 0:
            self._start_probe(trainer, batch)
        if self._timer.start is None:
            self._timer.start = time.perf_counter()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._timer.before_step = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self._timer.before_step is not None:
            self._timer.observe(time.perf_counter())
        self._loop.after_batch(trainer, self._sampler, batch_idx)

    def _after_step(self, lr: float) -> None:
        """After every update (the LR scaler's post-hook: after every callback's
        ``on_before_optimizer_step``, whatever their order): ``gns/lr``, and a decision when
        one is due."""
        if (trainer := self._trainer) is None:
            return
        _compat.set_callback_metrics(trainer, {keys.LR: lr})
        done = trainer.global_step + 1  # Lightning counts this step after the hook
        if self._probing or done % self.check_every_n_steps == 0:
            self._decide(trainer, done)


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
