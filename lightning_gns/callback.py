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
from typing_extensions import override

from lightning_gns import advice
from lightning_gns.estimator import GNSValues, check_decay
from lightning_gns.norms.hooks import BatchDimProbe
from lightning_gns.sources import MODEL, SkipStep, Source, Units, build_source
from lightning_gns.tracker import GNSTracker

SUPPORTED = "single-device and DDP strategies with one optimizer and automatic optimization"


def _positive_int(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _several_gradients_per_step(trainer: pl.Trainer) -> bool:
    """Whether steps combine several micro-batch or rank gradients (now or by a schedule)."""
    if trainer.accumulate_grad_batches > 1 or trainer.world_size > 1:
        return True
    return any(
        isinstance(c, GradientAccumulationScheduler) and max(c.scheduling.values(), default=1) > 1
        for c in trainer.callbacks
    )


class GradientNoiseScale(Callback):
    r"""Measure the gradient noise scale B_simple = tr(Σ)/|G|² during training and log it.

    Small-batch squared norms come from per-example norms or from each micro-batch/rank
    gradient (:mod:`lightning_gns.sources`); the big batch is the gradient the optimizer steps
    with. Each optimizer step gives unbiased |G|² and tr(Σ) estimates, smoothed by
    bias-corrected EMAs (:mod:`lightning_gns.tracker`). Logged keys: see README.

    Args:
        ema_decay: EMA decay per optimizer step, in (0, 1); the window is about 1/(1 − β) steps.
            A resumed run keeps this value (not the checkpoint's) and warns if they differ.
        source: ``auto`` takes per-example norms when they cover every trainable parameter,
            with ``layers="norm"``, or when a step has no second micro-batch/rank gradient;
            micro-batches otherwise.
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
    """

    def __init__(
        self,
        ema_decay: float = 0.99,
        source: Literal["auto", "micro_batch", "per_example"] = "auto",
        layers: Literal["all", "norm"] = "all",
        loss_reduction: Literal["mean", "sum"] = "mean",
        log_every_n_steps: int | None = None,
        per_layer: bool = False,
        batch_size_multiple: int | None = None,
        examples_per_batch: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("source", source, ("auto", "micro_batch", "per_example")),
            ("layers", layers, ("all", "norm")),
            ("loss_reduction", loss_reduction, ("mean", "sum")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value in (
            ("log_every_n_steps", log_every_n_steps),
            ("batch_size_multiple", batch_size_multiple),
            ("examples_per_batch", examples_per_batch),
        ):
            _positive_int(name, value)
        if per_layer and source == "micro_batch":
            raise ValueError("per_layer needs per-example norms: use source='per_example'")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ValueError("batch_size_fn must be a function batch -> number of examples")
        self.ema_decay = check_decay(ema_decay if ema_decay is not None else "None")
        self.source, self.layers, self.loss_reduction = source, layers, loss_reduction
        self.log_every_n_steps, self.per_layer = log_every_n_steps, per_layer
        self.batch_size_multiple, self.examples_per_batch = batch_size_multiple, examples_per_batch
        self.batch_size_fn = batch_size_fn

        self.values = GNSValues.unknown()
        self.layer_values: dict[str, GNSValues] = {}
        self.tracker: GNSTracker | None = None
        self._source: Source | None = None
        self._saved: dict[str, Any] | None = None  # checkpoint state until fit start
        self._warned: set[str] = set()
        self._steps = self._logged_at = self._host_skips = self._nonfinite = 0
        self._micro_sizes: deque[int] = deque(maxlen=64)
        self._probe: BatchDimProbe | None = None
        self._mb_size, self._stepped, self._bad = 0, False, None
        self._trainer: pl.Trainer | None = None

    # -- public read-out ------------------------------------------------------------------
    @property
    def active_source(self) -> str | None:
        """``per_example`` or ``micro_batch`` once fitting started."""
        return self._source.name if self._source is not None else None

    @property
    def b_simple(self) -> float:
        """Latest B_simple = tr(Σ)/|G|² (NaN before the first estimate)."""
        return self.values.b_simple

    @property
    def grad_norm_sq(self) -> float:
        return self.values.grad_norm_sq

    @property
    def grad_variance(self) -> float:
        return self.values.grad_variance

    @property
    def coverage(self) -> float:
        """Fraction of trainable parameters the estimate covers."""
        norms = getattr(self._source, "norms", None)
        return norms.coverage() if hasattr(norms, "coverage") else 1.0

    @property
    def left_out(self) -> dict[str, str]:
        """Modules left out of the per-example estimate, with the reason."""
        return dict(getattr(getattr(self._source, "norms", None), "left_out", {}))

    @property
    def batch_size(self) -> float:
        """Examples per optimizer step now: usual micro-batch × accumulation × world size."""
        if not self._micro_sizes or self._trainer is None:
            return math.nan
        usual = max(set(self._micro_sizes), key=self._micro_sizes.count)
        return float(usual * self._trainer.accumulate_grad_batches * self._trainer.world_size)

    # -- set-up ---------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        name = type(strategy).__name__
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(
            strategy, (SingleDeviceStrategy, DDPStrategy)
        ):
            raise RuntimeError(f"GradientNoiseScale supports {SUPPORTED}; got strategy {name}")
        if not pl_module.automatic_optimization:
            raise RuntimeError(f"GradientNoiseScale supports {SUPPORTED}; got manual optimization")
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"GradientNoiseScale supports {SUPPORTED}; got {len(trainer.optimizers)} optimizers"
            )
        saved = self._saved or {}
        try:
            self._source = build_source(
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
        self._source.attach()
        self._trainer = trainer
        # A fresh tracker in every process (ddp_spawn pickles the callback: no shared state).
        self.tracker = GNSTracker(self.ema_decay, self._source.columns).to(pl_module.device)
        if self._saved is not None:
            self._restore(self._saved)
            self._saved = None
        self._probe = BatchDimProbe(pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(_tensorboard_layout())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._source is not None and self.tracker is not None:
            self._saved = self.state_dict()  # a later fit with this callback continues
            self._source.detach()
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    # -- per micro-batch and step ---------------------------------------------------------
    def _units(self, trainer: pl.Trainer) -> Units:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        inv = 1.0 / scale.double().square() if isinstance(scale, torch.Tensor) else 1.0
        return Units(trainer.accumulate_grad_batches, self.loss_reduction, inv, trainer.world_size)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        try:
            size = int(
                self.batch_size_fn(batch) if self.batch_size_fn else extract_batch_size(batch)
            )
        except Exception:  # noqa: BLE001 - an odd batch only costs this step
            size = 0
        self._mb_size = size
        if size < 1:
            self._bad = "could not tell the batch size of a micro-batch; pass batch_size_fn"
        elif self._source is not None:
            self._micro_sizes.append(size)
            self._source.start_micro_batch(size)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe is not None:
            seen, self._probe = self._probe.close(), None
            if seen is not None and seen != self._mb_size:
                self._warn_once(
                    "batch size",
                    f"GradientNoiseScale: the batch size was taken as {self._mb_size}, but the "
                    f"model's layers see {seen} examples per micro-batch; if {seen} is right, "
                    "pass GradientNoiseScale(batch_size_fn=lambda batch: ...) (the estimate "
                    "depends on it)",
                )
        if self._mb_size > 0 and self._source is not None:
            self._source.end_micro_batch(self._mb_size, self._units(trainer))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        if self._source is None or self.tracker is None:
            return
        bad, self._bad = self._bad, None
        try:
            sample = self._source.end_step(self._units(trainer))
            if bad is not None:
                raise SkipStep(bad)
            self.tracker.record(sample)
        except SkipStep as skip:
            if skip.silent:  # the structural check: say what it left out
                self._warn_coverage()
            else:
                self._skip(skip.reason)
        except Exception as err:  # noqa: BLE001 - statistics must never stop training
            self._skip(f"{type(err).__name__}: {err}")

    def _warn_coverage(self) -> None:
        if self.left_out:
            names = ", ".join(f"{k} ({v})" for k, v in sorted(self.left_out.items()))
            self._warn_once(
                "coverage",
                f"GradientNoiseScale: per-example norms cover {self.coverage:.1%} of the "
                f"trainable parameters; left out: {names}. The estimate is over the covered ones.",
            )

    def _skip(self, reason: str) -> None:
        assert self.tracker is not None
        self.tracker.record(None)
        self._host_skips += 1
        self._warn_once(
            "skip:" + reason.split("'")[0],
            f"GradientNoiseScale skipped a step ({reason}); skipped steps are counted in "
            "gns/skipped_steps. Training is not affected.",
        )

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
        values = self.tracker.read(sync=trainer.world_size > 1)
        self.values = values.pop(MODEL)
        self.layer_values = {k: v for k, v in values.items() if k not in self.left_out}
        nonfinite = self.values.skipped - self._host_skips
        if nonfinite > self._nonfinite:
            self._nonfinite = nonfinite
            self._warn_once(
                "non-finite",
                "GradientNoiseScale: steps with non-finite gradients (an AMP overflow, or NaN/inf "
                "in the model) were left out; gns/stale_steps counts the steps since the last "
                "usable one, and gns/b_simple is that old.",
            )
        metrics = self._metrics()
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _metrics(self) -> dict[str, float]:
        v, batch = self.values, self.batch_size
        small = 1.0 if self.active_source == "per_example" else batch / max(1, self._accumulated())
        upper = v.b_simple_upper if math.isfinite(v.b_simple_upper) else math.nan
        out = {
            "gns/b_simple": v.b_simple,
            "gns/b_simple_se": v.b_simple_se,
            "gns/b_simple_lower": v.b_simple_lower,
            "gns/b_simple_upper": upper,
            "gns/grad_norm_sq": v.grad_norm_sq,
            "gns/grad_variance": v.grad_variance,
            "gns/batch_size": batch,
            "gns/small_batch_size": small,
            "gns/coverage": self.coverage,
            "gns/skipped_steps": float(v.skipped),
            "gns/stale_steps": float(v.stale),
            "gns/optimal_batch_size": math.nan,
            "gns/efficiency": math.nan,
        }
        if math.isfinite(v.b_simple) and v.b_simple > 0 and math.isfinite(batch):
            opt = advice.optimal_batch_size(v.b_simple, multiple_of=self.batch_size_multiple)
            out["gns/optimal_batch_size"] = float(opt)
            out["gns/efficiency"] = float(advice.efficiency(batch, v.b_simple))
        for name, lv in self.layer_values.items():
            out[f"gns/layer/{name}/b_simple"] = lv.b_simple
        return out

    def _accumulated(self) -> int:
        t = self._trainer
        return t.accumulate_grad_batches * t.world_size if t is not None else 1

    # -- checkpoints ----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.tracker is None:
            return dict(self._saved or {})
        return {
            "tracker": self.tracker.export(),
            "steps": self._steps,
            "host_skips": self._host_skips,
            "micro_sizes": list(self._micro_sizes),
            "left_out": self.left_out if self.active_source == "per_example" else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.tracker is None:
            self._saved = dict(state_dict)  # applied at fit start, once the source is known
        else:
            self._restore(state_dict)

    def _restore(self, sd: dict[str, Any]) -> None:
        assert self.tracker is not None
        saved = sd.get("tracker", {})
        old = saved.get("ema_decay", self.ema_decay)
        if old != self.ema_decay:
            self._warn_once(
                "decay",
                f"GradientNoiseScale: resuming with ema_decay={self.ema_decay} from a checkpoint "
                f"written with {old}; the smoothed state is kept and {self.ema_decay} applies "
                "from here on.",
            )
        self.tracker.restore(saved)
        self._steps = self._logged_at = int(sd.get("steps", 0))
        self._host_skips = int(sd.get("host_skips", 0))
        self._micro_sizes.clear()
        self._micro_sizes.extend(sd.get("micro_sizes", []))
        self.values = self.tracker.read()[MODEL]


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
            "skipped and stale steps": [
                "Multiline",
                ["^gns/skipped_steps$", "^gns/stale_steps$"],
            ],
        }
    }
