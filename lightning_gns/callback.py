"""The Lightning callback: picks a norm source, feeds the tracker, logs. Lightning glue only."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn
from typing_extensions import override

from lightning_gns import advice
from lightning_gns.estimator import GNSValues, check_decay
from lightning_gns.norms.hooks import BatchDimProbe
from lightning_gns.norms.preconditioner import keeps_second_moment
from lightning_gns.sources import (
    MODEL,
    PRECONDITIONED,
    PerExampleSource,
    PreconditionedSource,
    Reduction,
    SkipStep,
    Source,
    StepNorms,
    Units,
    build_source,
)
from lightning_gns.tracker import GNSTracker, read_together

SUPPORTED = "single-device and DDP strategies with one optimizer and automatic optimization"
CHOICES = {
    "source": ("auto", "micro_batch", "per_example"),
    "layers": ("all", "norm"),
    "loss_reduction": ("mean", "sum"),
}


def _check_arguments(args: dict[str, Any]) -> None:
    """Refuse at construction what would break training later (LightningCLI also checks the
    ``Literal`` choices from the signature)."""
    for name, allowed in CHOICES.items():
        if args[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {args[name]!r}")
    for name in ("log_every_n_steps", "batch_size_multiple", "examples_per_batch"):
        value = args[name]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if args["per_layer"] and args["source"] == "micro_batch":
        raise ValueError("per_layer needs per-example norms: use source='per_example'")
    if args["batch_size_fn"] is not None and not callable(args["batch_size_fn"]):
        raise ValueError("batch_size_fn must be a function batch -> number of examples")
    check_decay(args["ema_decay"])


def _check_setup(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(
        strategy, (SingleDeviceStrategy, DDPStrategy)
    ):
        got = f"strategy {type(strategy).__name__}"
    elif not pl_module.automatic_optimization:
        got = "manual optimization"
    elif len(trainer.optimizers) != 1:
        got = f"{len(trainer.optimizers)} optimizers"
    else:
        return
    raise RuntimeError(f"GradientNoiseScale supports {SUPPORTED}; got {got}")


def _units(trainer: pl.Trainer, reduction: str) -> Units:
    """This step's scale factors: accumulation, reduction, AMP loss scale, world size."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    inv = 1.0 / scale.double().square() if isinstance(scale, torch.Tensor) else 1.0
    return Units(trainer.accumulate_grad_batches, reduction, inv, trainer.world_size)  # type: ignore[arg-type]


def _batch_size(batch: Any) -> int:
    """Lightning's inference (the first tensor's dim 0), with a fast path for the usual
    ``(x, y, ...)`` of tensors."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0] if batch[0].dim() else 1
    return extract_batch_size(batch)


class _StepFeed:
    """The per-step path, on the device only: each micro-batch's size (``batch_size_fn`` or
    Lightning's inference, checked once against what the layers see) and norms from the
    source, one record per optimizer step into the tracker; a step it cannot use is recorded
    as skipped and warned about once."""

    def __init__(
        self, batch_size_fn: Callable[[Any], int] | None, warn: Callable[[str, str], None]
    ) -> None:
        self.fn, self.warn = batch_size_fn, warn
        self.recent: deque[int] = deque(maxlen=64)  # recent micro-batch sizes
        self.current = self.host_skips = 0
        self.bad: str | None = None
        self.probe: BatchDimProbe | None = None
        self.probe_model: nn.Module | None = None  # probe this model's next training forward
        self.listeners: list[Callable[[StepNorms | None], None]] = []  # each step's record
        self.source: Source | None = None
        self.tracker: GNSTracker | None = None
        self.precond: PreconditionedSource | None = None  # optional second measurement
        self.precond_tracker: GNSTracker | None = None

    @property
    def usual(self) -> float:
        return float(max(set(self.recent), key=self.recent.count)) if self.recent else math.nan

    def start(self, batch: Any) -> None:
        try:
            self.current = int(self.fn(batch) if self.fn else _batch_size(batch))
        except Exception:  # noqa: BLE001 - an odd batch only costs this step
            self.current = 0
        if self.current < 1:
            self.bad = "could not tell the batch size of a micro-batch; pass batch_size_fn"
        elif self.source is not None:
            if self.probe_model is not None:
                self.probe, self.probe_model = BatchDimProbe(self.probe_model), None
            self.recent.append(self.current)
            self.source.start_micro_batch(self.current)
            if self.precond is not None:
                self.precond.start_micro_batch(self.current)

    def after_backward(self, reduction: Reduction) -> None:
        seen = self.close_probe() if self.probe is not None else None
        if seen is not None and seen != self.current:
            self.warn(
                "batch size",
                f"GradientNoiseScale: the batch size was taken as {self.current}, but the "
                f"model's layers see {seen} examples per micro-batch; if {seen} is right, pass "
                "GradientNoiseScale(batch_size_fn=lambda batch: ...) (the estimate depends on it)",
            )
        if self.current > 0 and self.source is not None:
            self.source.end_micro_batch(self.current, reduction)
            if self.precond is not None:
                self.precond.end_micro_batch(self.current, reduction)

    def before_step(self, units: Units) -> None:
        if self.source is None or self.tracker is None:
            return
        bad, self.bad = self.bad, None
        try:
            sample = self.source.end_step(units)
            if bad is not None:
                raise SkipStep(bad)
            self.record(sample)
        except SkipStep as skip:
            if not skip.silent:
                self.skip(skip.reason)
            elif note := self.source.coverage_note():  # the check ran: say what it left out
                self.warn("coverage", f"GradientNoiseScale: {note}")
        except Exception as err:  # noqa: BLE001 - statistics must never stop training
            self.skip(f"{type(err).__name__}: {err}")
        if self.precond is not None and self.precond_tracker is not None:
            self.precondition_step(units)

    def add_preconditioned(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, ema_decay: float | None
    ) -> None:
        """Also measure the optimizer-preconditioned noise scale (its own source, tracker)."""
        stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [p for p in model.parameters() if p.requires_grad and id(p) in stepped]
        self.precond = PreconditionedSource(params, optimizer)
        self.precond.attach()
        self.precond_tracker = GNSTracker(ema_decay, [PRECONDITIONED]).to(params[0].device)

    def precondition_step(self, units: Units) -> None:
        """The preconditioned measurement of this step (its skips are not the model's)."""
        assert self.precond is not None and self.precond_tracker is not None
        try:
            self.precond_tracker.record(self.precond.end_step(units))
        except SkipStep as skip:
            if not skip.silent:
                self.precond_tracker.record(None)
            elif self.precond.steps > 1 and not keeps_second_moment(self.precond.optimizer):
                self.warn(
                    "preconditioner",
                    "GradientNoiseScale(preconditioned=True): the optimizer keeps no "
                    "second-moment estimate (exp_avg_sq, square_avg or sum in its state), so "
                    "there is no preconditioned noise scale to measure",
                )
        except Exception:  # noqa: BLE001 - statistics must never stop training
            self.precond_tracker.record(None)

    def record(self, sample: StepNorms | None) -> None:
        """Into the tracker, and to every listener (None: a skipped step)."""
        assert self.tracker is not None
        self.tracker.record(sample)
        for listener in self.listeners:
            listener(sample)

    def skip(self, reason: str) -> None:
        self.record(None)
        self.host_skips += 1
        self.warn(
            "skip:" + reason.split("'")[0],
            f"GradientNoiseScale skipped a step ({reason}); skipped steps are counted in "
            "gns/skipped_steps. Training is not affected.",
        )

    def close_probe(self) -> int | None:
        self.probe_model = None
        seen, self.probe = (self.probe.close() if self.probe else None), None
        return seen

    def check_nonfinite(self, values: GNSValues) -> None:
        """Warn once when steps were dropped for non-finite gradients (not skipped here)."""
        if values.skipped > self.host_skips:
            self.warn(
                "non-finite",
                "GradientNoiseScale: steps with non-finite gradients (an AMP overflow, or NaN/inf "
                "in the model) were left out; gns/stale_steps counts the steps since the last "
                "usable one, and gns/b_simple is that old.",
            )

    def state_dict(self) -> dict[str, Any]:
        assert self.tracker is not None
        return {
            "tracker": self.tracker.export(),
            "preconditioned": self.precond_tracker.export() if self.precond_tracker else None,
            "host_skips": self.host_skips,
            "micro_sizes": list(self.recent),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        assert self.tracker is not None
        note = self.tracker.restore(sd.get("tracker", {}))
        if self.precond_tracker is not None:
            self.precond_tracker.restore(sd.get("preconditioned") or {})
        if note:
            self.warn("decay", f"GradientNoiseScale: {note}")
        self.host_skips = int(sd.get("host_skips", 0))
        self.recent.clear()
        self.recent.extend(sd.get("micro_sizes", []))


def _compiled(pl_module: pl.LightningModule) -> bool:
    """Whether ``torch.compile`` wraps the module (Lightning's ``from_compiled``) or a part."""
    if getattr(pl_module, "_compiler_ctx", None) is not None:
        return True
    return any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in pl_module.modules())


def _several_gradients_per_step(trainer: pl.Trainer) -> bool:
    """Whether steps combine several micro-batch or rank gradients (now or by a schedule; an
    AdaptiveBatchSize's first accumulation, whichever callback's ``on_fit_start`` runs first)."""
    from lightning_gns.adaptive import AdaptiveBatchSize  # here: it imports this module

    if trainer.accumulate_grad_batches > 1 or trainer.world_size > 1:
        return True
    return any(
        (isinstance(c, GradientAccumulationScheduler) and c.going_to_accumulate_grad_batches())
        or (isinstance(c, AdaptiveBatchSize) and c.start_accumulation(trainer) > 1)
        for c in trainer.callbacks
    )


class GradientNoiseScale(Callback):
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
            micro-batch/rank gradient; micro-batches otherwise.
        layers: per-example layers: ``all`` or ``norm`` (normalization layers only, a cheap
            proxy in transformers).
        loss_reduction: how the loss combines examples: ``mean`` or ``sum``.
        log_every_n_steps: optimizer steps between logs; default: the trainer's.
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
    ) -> None:
        super().__init__()
        _check_arguments(locals())
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.source, self.layers, self.loss_reduction = source, layers, loss_reduction
        self.log_every_n_steps, self.per_layer = log_every_n_steps, per_layer
        self.batch_size_multiple, self.examples_per_batch = batch_size_multiple, examples_per_batch
        self.batch_size_fn, self.preconditioned = batch_size_fn, bool(preconditioned)

        self.values = GNSValues.unknown()
        self.preconditioned_values = GNSValues.unknown()
        self.reads = 0  # read-outs so far
        self._state_key: str | None = None
        self.layer_values: dict[str, GNSValues] = {}
        self._saved: dict[str, Any] | None = None  # checkpoint state until fit start
        self._warned: set[str] = set()
        self._feed = _StepFeed(batch_size_fn, self._warn_once)
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

    @property
    def tracker(self) -> GNSTracker | None:
        """The estimators' state (a torchmetrics ``Metric``), once fitting started."""
        return self._feed.tracker

    @property
    def _source(self) -> Source | None:
        return self._feed.source

    # -- public read-out ------------------------------------------------------------------
    @property
    def active_source(self) -> str | None:
        """``per_example`` or ``micro_batch`` once fitting started."""
        return self._source.name if self._source is not None else None

    @property
    def b_simple(self) -> float:
        """Latest B_simple = tr(Σ)/|G|²; NaN while not yet known (its 95% interval spans more
        than 1.5×: then :attr:`b_simple_lower` bounds it)."""
        return self.values.b_simple if self.values.known else math.nan

    @property
    def b_simple_lower(self) -> float:
        """Lower end of the 95% interval of B_simple (NaN before two effective steps)."""
        return self.values.b_simple_lower

    @property
    def grad_norm_sq(self) -> float:
        return self.values.grad_norm_sq

    @property
    def grad_variance(self) -> float:
        return self.values.grad_variance

    @property
    def coverage(self) -> float:
        """Fraction of trainable parameters the estimate covers."""
        return self._source.coverage if self._source is not None else math.nan

    @property
    def covered_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the estimate is over (all trainable ones unless some are left out)."""
        return list(self._source.params) if self._source is not None else []

    @property
    def left_out(self) -> dict[str, str]:
        """Modules left out of the per-example estimate, with the reason."""
        return dict(self._source.left_out) if self._source is not None else {}

    @property
    def batch_size(self) -> float:
        """Examples per optimizer step now: usual micro-batch × accumulation × world size."""
        t = self._trainer
        return self._feed.usual * t.accumulate_grad_batches * t.world_size if t else math.nan

    @property
    def step_listeners(self) -> list[Callable[[StepNorms | None], None]]:
        """Called with each optimizer step's record as the tracker gets it (None: a skipped
        step), in ``on_before_optimizer_step``; AdaptiveBatchSize keeps its own window."""
        return self._feed.listeners

    def micro_batch_resized(self, size: int) -> None:
        """The micro-batch was resized on purpose (AdaptiveBatchSize): :attr:`batch_size`
        follows at once instead of after most of the recent micro-batches."""
        self._feed.recent.clear()
        self._feed.recent.append(size)

    # -- set-up ---------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_setup(trainer, pl_module)
        saved = self._saved or {}
        try:
            source = build_source(
                pl_module,
                self.source,
                self.layers,
                _several_gradients_per_step(trainer),
                self.per_layer,
                self.examples_per_batch,
                saved.get("left_out"),
            )
        except ValueError as err:
            raise RuntimeError(f"GradientNoiseScale: {err}") from None
        sites = source.norms.sites if isinstance(source, PerExampleSource) else {}
        fallback = [name for name, site in sites.items() if site.generic]
        if _compiled(pl_module) and fallback:
            self._warn_once(
                "compile",
                "GradientNoiseScale: the model is compiled, and these layers have no per-example "
                f"rule: {', '.join(fallback[:5])}; their torch.func fallback splits the graph. "
                "The micro-batch source compiles whole: set Trainer(accumulate_grad_batches>=2) "
                "or use DDP (the default source='auto' then takes it), or register a rule "
                "(lightning_gns.norms.register_norm)",
            )
        source.attach()
        self._trainer = trainer
        self._feed.source = source
        # A fresh tracker in every process (ddp_spawn pickles the callback: no shared state).
        self._feed.tracker = GNSTracker(self.ema_decay, source.columns).to(pl_module.device)
        if self.preconditioned:
            self._attach_preconditioned(trainer, pl_module)
        if self._saved is not None:
            self._restore(self._saved)
            self._saved = None
        self._feed.probe_model = pl_module  # probed during the first training micro-batch
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(_tensorboard_layout())

    def _attach_preconditioned(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _several_gradients_per_step(trainer):
            raise RuntimeError(
                "GradientNoiseScale(preconditioned=True) measures between micro-batches: set "
                "Trainer(accumulate_grad_batches>=2) or train on 2+ devices (DDP)"
            )
        self._feed.add_preconditioned(trainer.optimizers[0], pl_module, self.ema_decay)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._source is not None and self.tracker is not None:
            self._saved = self.state_dict()  # a later fit with this callback continues
            self._source.detach()
            if self._feed.precond is not None:
                self._feed.precond.detach()
        self._feed.close_probe()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips teardown then: remove the hooks and end an eager window (batch
        # probe, structural check), or torch.compile would stay off in this process.
        self.teardown(trainer, pl_module, "fit")

    # -- per micro-batch and step ---------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._feed.start(batch)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._feed.after_backward(self.loss_reduction)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        self._feed.before_step(_units(trainer, self.loss_reduction))

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
        self._stepped = False
        self._steps += 1
        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        if self._steps % every == 0:
            self._log(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps > self._logged_at:  # the last step may already be logged
            self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        """The only host sync: one reduction of the small moments tensor, then read-out."""
        if self.tracker is None:
            return
        self._logged_at = self._steps
        trackers = [self.tracker]
        if self._feed.precond_tracker is not None:
            trackers.append(self._feed.precond_tracker)
        values, *precond = read_together(trackers, sync=trainer.world_size > 1)
        self.values = values.pop(MODEL)
        self.layer_values = {k: v for k, v in values.items() if k not in self.left_out}
        if precond:
            self.preconditioned_values = precond[0][PRECONDITIONED]
        self.reads += 1
        self._feed.check_nonfinite(self.values)
        publish(trainer, self._metrics())

    def _metrics(self) -> dict[str, float]:
        per_example = self.active_source == "per_example"
        t = self._trainer
        small = 1.0 if per_example or t is None else self.batch_size / t.accumulate_grad_batches
        out = read_out(self.values, self.batch_size, small, self.batch_size_multiple)
        out["gns/coverage"] = self.coverage
        for name, lv in self.layer_values.items():
            out[f"gns/layer/{name}/b_simple"] = lv.b_simple
        if self._feed.precond_tracker is not None:
            pv = self.preconditioned_values
            out["gns/preconditioned/b_simple"] = pv.b_simple if pv.known else math.nan
            out["gns/preconditioned/b_simple_lower"] = pv.b_simple_lower
            out["gns/preconditioned/b_simple_upper"] = pv.b_simple_upper
        return out

    # -- checkpoints ----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.tracker is None:
            return dict(self._saved or {})
        left_out = self.left_out if self.active_source == "per_example" else None
        return {"steps": self._steps, "left_out": left_out, **self._feed.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.tracker is None:
            self._saved = dict(state_dict)  # applied at fit start, once the source is known
        else:
            self._restore(state_dict)

    def _restore(self, sd: dict[str, Any]) -> None:
        self._feed.load_state_dict(sd)
        self._steps = self._logged_at = int(sd.get("steps", 0))
        self.values = self._feed.tracker.read()[MODEL]


def publish(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """To ``trainer.callback_metrics`` (EarlyStopping, sweeps) and every logger."""
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def read_out(
    v: GNSValues, batch_size: float, small_batch_size: float, multiple: int | None = None
) -> dict[str, float]:
    """The logged ``gns/*`` values of one read-out (see README for each key)."""
    out = {
        "gns/b_simple": v.b_simple if v.known else math.nan,  # not yet known: see the lower bound
        "gns/b_simple_se": v.b_simple_se,
        "gns/b_simple_lower": v.b_simple_lower,
        "gns/b_simple_upper": v.b_simple_upper if math.isfinite(v.b_simple_upper) else math.nan,
        "gns/grad_norm_sq": v.grad_norm_sq,
        "gns/grad_variance": v.grad_variance,
        "gns/batch_size": batch_size,
        "gns/small_batch_size": small_batch_size,
        "gns/skipped_steps": float(v.skipped),
        "gns/stale_steps": float(v.stale),
        "gns/window_steps": v.window,
        "gns/optimal_batch_size": math.nan,
        "gns/efficiency": math.nan,
    }
    verdict = advice.supported(v.b_simple, v.b_simple_lower, v.b_simple_upper, multiple)
    if verdict.kind == "estimate" and math.isfinite(batch_size):
        out["gns/optimal_batch_size"] = float(verdict.recommended)
        out["gns/efficiency"] = float(advice.efficiency(batch_size, v.b_simple))
    return out


def _tensorboard_layout() -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars charts: anchored tags, one scale per chart, the interval as a margin."""
    return {
        "gradient noise scale": {
            "B_simple with its 95% interval": [
                "Margin",
                ["gns/b_simple", "gns/b_simple_lower", "gns/b_simple_upper"],
            ],
            "batch size: used and recommended": [
                "Multiline",
                ["^gns/batch_size$", "^gns/optimal_batch_size$"],
            ],
            "efficiency at the batch size used": ["Multiline", ["^gns/efficiency$"]],
            "|G|² (smoothed)": ["Multiline", ["^gns/grad_norm_sq$"]],
            "tr(Σ) (smoothed)": ["Multiline", ["^gns/grad_variance$"]],
            "coverage": ["Multiline", ["^gns/coverage$"]],
            "averaging window (effective steps)": ["Multiline", ["^gns/window_steps$"]],
            "skipped and stale steps": [
                "Multiline",
                ["^gns/skipped_steps$", "^gns/stale_steps$"],
            ],
        }
    }
