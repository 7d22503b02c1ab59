"""The Lightning callback: Lightning glue around the step driver (:mod:`lightning_gns.driver`).

It chooses a source (:mod:`lightning_gns.sources`), sizes each micro-batch, hands every
optimizer step to the driver, reads out at logging steps (one all-reduce) through the
read-out it shares with :class:`~lightning_gns.GradientNoiseMeter`
(:class:`lightning_gns.meter.Readings`) and publishes the values (:mod:`lightning_gns.publish`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_gns import host_sync
from lightning_gns._compat import SuggestsArguments
from lightning_gns.meter import Readings
from lightning_gns.norms.tensor_parallel import data_parallel_size
from lightning_gns.publish import (
    publish,
    record_failure,
    tensorboard_layout,
)
from lightning_gns.records import StepNorms
from lightning_gns.trainer_setup import (
    build_driver,
    check_arguments,
    check_setup,
    micro_batches_per_step,
    units,
    warn_if_no_second_moment,
)


class GradientNoiseScale(SuggestsArguments, Readings, Callback):
    r"""Measure the gradient noise scale B_simple = tr(Σ)/|G|² during training and log it.

    Small-batch squared norms come from per-example norms or from each micro-batch/rank
    gradient (:mod:`lightning_gns.sources`); the big batch is the gradient the optimizer steps
    with. Each optimizer step gives unbiased |G|² and tr(Σ) estimates, smoothed by
    bias-corrected EMAs (:mod:`lightning_gns.tracker`). Logged keys: see README.

    Args:
        ema_decay: ``None`` (default): the adaptive window, the shortest of about 100, 1,000
            and 10,000 steps whose 95% interval is precise; a float in (0, 1): a fixed EMA
            window of about 1/(1 − β) steps. A resumed run keeps this choice (warned if the
            checkpoint's differs).
        source: ``auto`` takes per-example norms when layer rules cover every trainable
            parameter (compiled or not), with ``layers="norm"``, or when a step has no second
            micro-batch/rank gradient; micro-batches otherwise (:attr:`chosen_source` and
            :attr:`source_reason` say which, and why).
        layers: per-example layers: ``all`` or ``norm`` (normalization layers only, a cheap
            proxy in transformers).
        loss_reduction: how the loss combines examples: ``mean`` or ``sum``.
        log_every_n_steps: optimizer steps between read-outs; default: the trainer's (the
            values then share the row of the user's own ``self.log`` values).
        per_layer: also log ``gns/layer/<module>/b_simple`` (per-example source only).
        batch_size_multiple: round the recommended batch size to a multiple of this instead of
            a power of two.
        examples_per_batch: per-example norms for only the first k examples of each
            micro-batch: cost × k/B, still unbiased with shuffled batches, noisier. None: all.
        batch_size_fn: ``batch -> number of examples`` for batches whose size Lightning cannot
            infer (e.g. a first tensor that is not the batch); default: Lightning's inference.
        preconditioned: also measure the noise scale of the optimizer's preconditioned
            gradients g/(√v̂ + ε) (Adam family, RMSprop, Adagrad; read from the optimizer's
            state, never changed), logged as ``gns/preconditioned/*``. Measured between
            micro-batches: needs ``accumulate_grad_batches >= 2`` or DDP.
        summary: print a short summary at the end of each fit (rank zero).

    Raises:
        ValueError: at construction, an argument out of its range (the message names it).
        RuntimeError: at fit start, a set-up it cannot measure, with the fix: FSDP, DeepSpeed,
            manual optimization, several optimizers; BatchNorm in train mode on one device
            without accumulation; a model without any layer it has a per-example rule for and
            one gradient per step; ``layers="norm"`` without a normalization layer;
            ``preconditioned=True`` without a second micro-batch. During training it never
            raises: a step it cannot use is skipped, counted and warned about once.

    Examples:
        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_gns import GradientNoiseScale
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 2)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self.layer(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        >>> data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
        >>> gns = GradientNoiseScale(log_every_n_steps=4)
        >>> trainer = pl.Trainer(max_epochs=4, callbacks=[gns], logger=False,
        ...     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        >>> trainer.fit(Net(), data)
        >>> gns.batch_size, gns.chosen_source
        (8.0, 'per_example')
        >>> gns.b_simple_lower > 0  # B_noise is at least this (95%); b_simple may be NaN
        True
        >>> GradientNoiseScale(source="fast")
        Traceback (most recent call last):
        ...
        ValueError: source must be one of ('auto', 'micro_batch', 'per_example'), got 'fast'
    """

    def __init__(
        self,
        ema_decay: float | None = None,
        source: Literal["auto", "micro_batch", "per_example"] = "auto",
        layers: Literal["all", "norm"] = "all",
        loss_reduction: Literal["mean", "sum"] = "mean",
        log_every_n_steps: int | None = None,
        per_layer: bool = False,
        batch_size_multiple: int | None = None,
        examples_per_batch: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        preconditioned: bool = False,
        summary: bool = True,
    ) -> None:
        check_arguments(locals())
        super().__init__()
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.source, self.layers, self.loss_reduction = source, layers, loss_reduction
        self.log_every_n_steps, self.per_layer = log_every_n_steps, per_layer
        self.batch_size_multiple, self.examples_per_batch = batch_size_multiple, examples_per_batch
        self.batch_size_fn, self.preconditioned = batch_size_fn, preconditioned
        self.summary = summary
        # Called with each step's record as the tracker gets it (None: skipped), in
        # on_before_optimizer_step; AdaptiveBatchSize keeps its own window from them.
        self.step_listeners: list[Callable[[StepNorms | None], None]] = []
        self._state_key: str | None = None
        self._stepped = False
        self._trainer: pl.Trainer | None = None

    @property
    @override
    def state_key(self) -> str:
        """One checkpoint entry per configuration, so e.g. ``layers="all"`` and ``"norm"`` can
        run side by side in one Trainer."""
        if self._state_key is None:  # Lightning asks on every hook call: build it once
            self._state_key = self._generate_state_key(source=self.source, layers=self.layers)
        return self._state_key

    # -- set-up ---------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_setup(trainer, pl_module)
        self._begin_run((id(trainer), id(pl_module)))
        # A fresh driver in every process (ddp_spawn pickles the callback: no shared state).
        left_out = (self._saved or {}).get("left_out")
        self._driver, self.source_reason = build_driver(
            trainer, pl_module, self, left_out, self._warn_once
        )
        self._driver.listeners = self.step_listeners
        self._trainer = trainer
        if self._saved is not None:
            self._restore(self._saved)
            self._saved = None
        self._driver.probe_model = pl_module  # probed during the first training micro-batch
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(tensorboard_layout())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._driver is not None:
            self._end_run((id(trainer), id(pl_module)))
            self._driver.detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips teardown then: remove the hooks and end an eager window (batch
        # probe, structural check), or torch.compile would stay off in this process.
        if self._driver is not None:
            self._driver.detach()
        record_failure(trainer, exception)  # `lightning-gns report` lists the run with it

    # -- per micro-batch and step ---------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._driver is not None:
            _watched(self._driver.start_micro_batch, batch)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver is not None:
            _watched(self._driver.end_micro_batch, self.loss_reduction)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        driver = self._driver
        if driver is not None:
            self._stepped = True
            _watched(lambda: driver.end_step(units(trainer, self.loss_reduction)))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _accumulate(self) -> float:
        return math.nan if self._trainer is None else micro_batches_per_step(self._trainer)

    def _world_size(self) -> int:
        return 1 if self._trainer is None else self._trainer.world_size

    def _data_parallel(self) -> int:
        t = self._trainer
        return 1 if t is None else data_parallel_size(t.strategy, t.world_size)

    # -- logging --------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._stepped:
            return
        self._stepped = False
        self._steps += 1
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 50
        if trainer.global_step % every == 0:
            with host_sync.allowed():
                self._log(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps > self._logged_at:  # the last step may already be logged
            with host_sync.allowed():
                self._log(trainer, None)
        if self.summary and self._driver is not None:
            rank_zero_info(self.summary_text())

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None) -> None:
        """The only host sync: the shared read-out, then to the loggers."""
        if self._driver is None:
            return
        if self._read_out():
            warn_if_no_second_moment(trainer, self._driver, self._warn_once)
        publish(trainer, pl_module, self.metrics())


def _watched(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` as a per-step region: watched only while a host-sync check runs (outside
    one, a context manager per hook is measurable on a small model's micro-batch)."""
    if host_sync.CHECK.enabled:
        with host_sync.watched():
            fn(*args)
    else:
        fn(*args)
