"""The Lightning callback: Lightning glue around the step driver (:mod:`lightning_gns.driver`).

It chooses a source (:mod:`lightning_gns.sources`), sizes each micro-batch, hands every
optimizer step to the driver, reads the tracker at logging steps (one all-reduce) and
publishes the values (:mod:`lightning_gns.publish`).
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

from lightning_gns import host_sync, keys
from lightning_gns.driver import StepDriver
from lightning_gns.estimator import GNSValues
from lightning_gns.norms.sites import Site
from lightning_gns.publish import (
    point_estimate,
    publish,
    read_out,
    record_failure,
    summary,
    tensorboard_layout,
)
from lightning_gns.records import MODEL, PRECONDITIONED, StepNorms
from lightning_gns.tracker import GNSTracker, read_together
from lightning_gns.trainer_setup import (
    build_driver,
    check_arguments,
    check_setup,
    units,
    warn_if_no_second_moment,
)


class Readings:
    """What a fitted :class:`GradientNoiseScale` tells you (its latest read-out)."""

    values: GNSValues
    layer_values: dict[str, GNSValues]
    preconditioned_values: GNSValues
    batch_size_multiple: int | None
    _driver: StepDriver | None
    _trainer: pl.Trainer | None

    @property
    def tracker(self) -> GNSTracker | None:
        """The estimators' state, once fitting started."""
        return self._driver.tracker if self._driver is not None else None

    @property
    def chosen_source(self) -> str | None:
        """``per_example`` or ``micro_batch`` once fitting started (:attr:`source_reason`)."""
        return self._driver.source.name if self._driver is not None else None

    @property
    def b_simple(self) -> float:
        """Latest B_simple = tr(Σ)/|G|²; NaN while not yet known (|G|² not significantly above
        zero: then :attr:`b_simple_lower` bounds it)."""
        return point_estimate(self.values)

    @property
    def b_simple_lower(self) -> float:
        """Lower end of the 95% interval of B_simple (NaN before two effective steps)."""
        return self.values.b_simple_lower

    @property
    def b_simple_upper(self) -> float:
        """Upper end of the 95% interval (inf while only the lower bound is known)."""
        return self.values.b_simple_upper

    @property
    def grad_norm_sq(self) -> float:
        """The smoothed unbiased |G|²."""
        return self.values.grad_norm_sq

    @property
    def grad_variance(self) -> float:
        """The smoothed unbiased tr(Σ)."""
        return self.values.grad_variance

    @property
    def coverage(self) -> float:
        """Fraction of trainable parameters the estimate covers."""
        return self._driver.source.coverage if self._driver is not None else math.nan

    @property
    def sites(self) -> dict[str, Site]:
        """The modules measured per example, by name (empty under micro-batches)."""
        norms = getattr(self._driver.source, "norms", None) if self._driver is not None else None
        return dict(getattr(norms, "sites", {}))

    @property
    def covered_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the estimate is over (all trainable ones unless some are left out)."""
        return list(self._driver.source.params) if self._driver is not None else []

    @property
    def left_out(self) -> dict[str, str]:
        """Modules left out of the per-example estimate, with the reason."""
        return dict(self._driver.source.left_out) if self._driver is not None else {}

    def micro_batch_resized(self, size: int) -> None:
        """The micro-batch was resized on purpose (AdaptiveBatchSize): :attr:`batch_size`
        follows at once instead of after most of the recent micro-batches."""
        if self._driver is not None:
            self._driver.resized(size)

    @property
    def batch_size(self) -> float:
        """Examples per optimizer step now: usual micro-batch × accumulation × world size."""
        t, d = self._trainer, self._driver
        if t is None or d is None:
            return math.nan
        return d.usual * t.accumulate_grad_batches * t.world_size

    def summary_text(self) -> str:
        """The end-of-fit summary (:func:`lightning_gns.publish.summary`)."""
        if self._driver is None:
            return "GradientNoiseScale: not fitted"
        src = self._driver.source
        reason = getattr(self, "source_reason", "")
        multiple = self.batch_size_multiple
        return summary(self.values, self.batch_size, src.name, reason, src.coverage, multiple)

    def metrics(self) -> dict[str, float]:
        """The logged ``gns/*`` values of the latest read-out (README: "What is logged")."""
        t = self._trainer
        per_example = self.chosen_source == "per_example"
        small = 1.0 if per_example or t is None else self.batch_size / t.accumulate_grad_batches
        if not per_example and t is not None:
            small /= t.world_size  # one micro-batch of one process
        out = read_out(self.values, self.batch_size, small, self.batch_size_multiple)
        out[keys.COVERAGE] = self.coverage
        for name, lv in self.layer_values.items():
            out[keys.layer_b_simple(name)] = point_estimate(lv)
        if self._driver is not None and self._driver.followers:
            pv = self.preconditioned_values
            out[keys.PRECONDITIONED_B_SIMPLE] = point_estimate(pv)
            out[keys.PRECONDITIONED_LOWER] = pv.b_simple_lower
            out[keys.PRECONDITIONED_UPPER] = pv.b_simple_upper
        return out


class GradientNoiseScale(Readings, Callback):
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

    Example:
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
        super().__init__()
        check_arguments(locals())
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.source, self.layers, self.loss_reduction = source, layers, loss_reduction
        self.log_every_n_steps, self.per_layer = log_every_n_steps, per_layer
        self.batch_size_multiple, self.examples_per_batch = batch_size_multiple, examples_per_batch
        self.batch_size_fn, self.preconditioned = batch_size_fn, preconditioned
        self.summary = summary

        self.values = GNSValues.unknown()
        self.preconditioned_values = GNSValues.unknown()
        self.layer_values: dict[str, GNSValues] = {}
        self.reads = 0  # read-outs so far (AdaptiveBatchSize acts on each new one)
        self.source_reason = ""
        self._driver: StepDriver | None = None
        # Called with each step's record as the tracker gets it (None: skipped), in
        # on_before_optimizer_step; AdaptiveBatchSize keeps its own window from them.
        self.step_listeners: list[Callable[[StepNorms | None], None]] = []
        self._state_key: str | None = None
        self._saved: dict[str, Any] | None = None  # checkpoint state until fit start
        self._warned: set[str] = set()
        self._steps = self._logged_at = 0
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
            self._saved = self.state_dict()  # a later fit with this callback continues
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
            with host_sync.watched():
                self._driver.start_micro_batch(batch)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver is not None:
            with host_sync.watched():
                self._driver.end_micro_batch(self.loss_reduction)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._driver is not None:
            self._stepped = True
            with host_sync.watched():
                self._driver.end_step(units(trainer, self.loss_reduction))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

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
        with host_sync.watched():
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
        """The only host sync: one reduction of the pending steps, then read-out."""
        driver = self._driver
        if driver is None:
            return
        self._logged_at = self._steps
        followers = [f.tracker for f in driver.followers]
        values, *precond = read_together([driver.tracker, *followers], trainer.world_size > 1)
        self.values = values.pop(MODEL)
        self.layer_values = {k: v for k, v in values.items() if k not in self.left_out}
        if precond:
            self.preconditioned_values = precond[0][PRECONDITIONED]
            warn_if_no_second_moment(trainer, driver, self._warn_once)
        self.reads += 1
        driver.check_nonfinite(self.values)
        publish(trainer, pl_module, self.metrics())

    # -- checkpoints ----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._driver is None:
            return dict(self._saved or {})
        t = self._trainer
        left_out = self.left_out if self.chosen_source == "per_example" else None
        state = self._driver.state_dict(t is not None and t.world_size > 1)
        return {"steps": self._steps, "left_out": left_out, **state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._driver is None:
            self._saved = dict(state_dict)  # applied at fit start, once the source is known
        else:
            self._restore(state_dict)

    def _restore(self, sd: dict[str, Any]) -> None:
        assert self._driver is not None
        self._driver.load_state_dict(sd)
        self._steps = self._logged_at = int(sd.get("steps", 0))
        self.values = self._driver.tracker.read()[MODEL]
