"""The Lightning callback: wires norm hooks → estimator → loggers, and keeps resumable state."""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from lightning_gns import advice
from lightning_gns.estimator import GNSEstimator, GNSValues, harmonic_batch_size
from lightning_gns.estimator import grad_norm_sq as unbiased_grad_norm_sq
from lightning_gns.estimator import trace_cov as unbiased_trace_cov
from lightning_gns.norms import MicroBatchNorms, PerExampleNorms, squared_norm, trainable_parameters

SOURCES = ("auto", "micro_batch", "per_example")


def _several_gradients_per_step(trainer: pl.Trainer) -> bool:
    """Whether steps combine several micro-batch or rank gradients (now or by a schedule)."""
    if trainer.accumulate_grad_batches > 1 or trainer.world_size > 1:
        return True
    return any(
        isinstance(c, GradientAccumulationScheduler) and max(c.scheduling.values()) > 1
        for c in trainer.callbacks
    )


class GradientNoiseScale(Callback):
    r"""Measure the gradient noise scale B_simple = tr(Σ)/|G|² during training and log it.

    Small-batch squared gradient norms come from per-example norms (``source="per_example"``)
    or from each micro-batch/rank gradient under gradient accumulation and DDP
    (``source="micro_batch"``); the big batch is the gradient the optimizer steps with. Each
    optimizer step gives unbiased |G|² and tr(Σ) estimates, smoothed by bias-corrected EMAs.

    Logged keys (to every logger and ``trainer.callback_metrics``): ``gns/b_simple``,
    ``gns/b_simple_se``, ``gns/b_simple_debiased``, ``gns/grad_norm_sq``, ``gns/grad_variance``,
    ``gns/batch_size``, ``gns/optimal_batch_size``, ``gns/efficiency``, ``gns/coverage``,
    ``gns/skipped_steps``.

    Args:
        ema_decay: EMA decay per optimizer step, in (0, 1).
        source: ``"auto"``, ``"per_example"`` or ``"micro_batch"``. ``auto`` takes per-example
            norms when they cover every trainable parameter, when ``layers="norm"``, or when
            there is no second micro-batch/rank to compare with; micro-batches otherwise.
        layers: per-example layers to track: ``"all"`` or ``"norm"`` (LayerNorm/RMSNorm/
            GroupNorm only, a cheap proxy in transformers).
        loss_reduction: how the loss combines examples: ``"mean"`` (default) or ``"sum"``.
        log_every_n_steps: optimizer steps between logs; default: the trainer's.
        per_layer: also log ``gns/layer/<module>/b_simple`` (per-example source only).
        examples_per_batch: per-example norms for only the first k examples of each
            micro-batch: cost × k/B, still unbiased with shuffled batches, noisier. None: all.
        batch_size_multiple: round the recommended batch size to a multiple of this instead of
            a power of two.
    """

    def __init__(
        self,
        ema_decay: float = 0.99,
        source: str = "auto",
        layers: str = "all",
        loss_reduction: str = "mean",
        log_every_n_steps: int | None = None,
        per_layer: bool = False,
        batch_size_multiple: int | None = None,
        examples_per_batch: int | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if layers not in ("all", "norm"):
            raise ValueError(f"layers must be 'all' or 'norm', got {layers!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be a positive int, got {log_every_n_steps!r}")
        if batch_size_multiple is not None and batch_size_multiple < 1:
            raise ValueError(f"batch_size_multiple must be >= 1, got {batch_size_multiple!r}")
        if examples_per_batch is not None and examples_per_batch < 1:
            raise ValueError(f"examples_per_batch must be >= 1, got {examples_per_batch!r}")
        if per_layer and source == "micro_batch":
            raise ValueError("per_layer needs per-example norms: use source='per_example'")
        if ema_decay is None:
            raise ValueError("ema_decay must be in (0, 1), got None; e.g. 0.99")
        self.estimator = GNSEstimator(ema_decay)  # validates ema_decay
        self.ema_decay = ema_decay
        self.source = source
        self.layers = layers
        self.loss_reduction = loss_reduction
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.batch_size_multiple = batch_size_multiple
        self.examples_per_batch = examples_per_batch

        self.active_source: str | None = None
        self.values = GNSValues(*(math.nan,) * 5, 0, 0)
        self.layer_values: dict[str, GNSValues] = {}
        self._micro: MicroBatchNorms | None = None
        self._pe: PerExampleNorms | None = None
        self._layer_est: dict[str, GNSEstimator] = {}
        self._left_out: dict[str, str] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self._reset_step()
        self._opt_steps = 0  # optimizer steps seen (host counter)
        self._host_skipped = 0  # steps dropped on the host side (e.g. unusable micro-batch)
        self._recent_sizes: deque[float] = deque(maxlen=100)
        # Steps recorded on the device since the last logging step: (row, b_small, b_big, layers)
        self._pending: list[tuple[Tensor, float, float, list[str]]] = []
        self._stepped = False
        self._needs_check = False  # run the structural check on the next micro-batch
        self._check_step = False  # this step's first micro-batch was the check: drop the step
        self._mb_size = 0  # examples in the current micro-batch

    # -- public read-out ------------------------------------------------------------------
    @property
    def b_simple(self) -> float:
        """Latest B_simple = tr(Σ)/|G|² (NaN before the first estimate)."""
        return self.values.b_simple

    @property
    def grad_norm_sq(self) -> float:
        """Latest smoothed |G|²."""
        return self.values.grad_norm_sq

    @property
    def grad_variance(self) -> float:
        """Latest smoothed tr(Σ)."""
        return self.values.grad_variance

    @property
    def coverage(self) -> float:
        """Fraction of trainable parameters the estimate covers."""
        return self._pe.coverage() if self._pe is not None else 1.0

    @property
    def left_out(self) -> dict[str, str]:
        """Modules left out of the per-example estimate, with the reason."""
        return dict(self._pe.left_out) if self._pe is not None else {}

    # -- set-up ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validate_setup(trainer, pl_module)
        model: torch.nn.Module = pl_module
        params = trainable_parameters(model)
        if not params:
            raise ValueError("GradientNoiseScale: the model has no trainable parameters")
        many = _several_gradients_per_step(trainer)
        pe = PerExampleNorms(
            model,
            layers=self.layers,
            per_layer=self.per_layer,
            examples_per_batch=self.examples_per_batch,
        )
        source = self.source
        if source == "auto":
            full = pe.coverage() >= 1.0 and not pe.left_out
            wanted = full or not many or self.layers == "norm"
            source = "per_example" if wanted and pe.sites else "micro_batch"
        if source == "micro_batch":
            self._micro = MicroBatchNorms(params)
            self._micro.attach()
        else:
            if not pe.sites:
                raise ValueError(
                    "GradientNoiseScale: no layer of this model has a per-example rule; use "
                    "accumulate_grad_batches > 1 or DDP with source='micro_batch'"
                )
            self._pe = pe
            if self._left_out is not None:  # resumed: the check already ran in the first run
                for name, reason in self._left_out.items():
                    pe.leave_out(name, reason)
            else:
                self._needs_check = True
            pe.attach()
        self.active_source = source
        self.estimator.to(pl_module.device)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(self._tensorboard_layout())

    def _validate_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        supported = "single-device and DDP strategies with one optimizer and automatic optimization"
        strategy = trainer.strategy
        name = type(strategy).__name__
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or "DeepSpeed" in name:
            raise RuntimeError(f"GradientNoiseScale supports {supported}; got strategy {name}")
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"GradientNoiseScale supports {supported}; this module uses manual optimization"
            )
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"GradientNoiseScale supports {supported}; got {len(trainer.optimizers)} optimizers"
            )
        if self.source == "micro_batch" and not _several_gradients_per_step(trainer):
            raise RuntimeError(
                "GradientNoiseScale(source='micro_batch') needs two gradients per step to compare: "
                "set Trainer(accumulate_grad_batches>1) or train on several devices (DDP), "
                "or use source='per_example' (the default 'auto' picks it)"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._micro is not None:
            self._micro.detach()
            self._micro = None
        if self._pe is not None:
            self._left_out = dict(self._pe.left_out)
            self._pe.detach()

    # -- per micro-batch ------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._sizes: list[int] = []  # examples in each micro-batch
        self._pe_sum: Tensor | None = None  # per-example source: Σ_j b²|g_j|² in backward units
        self._pe_count = 0  # examples in _pe_sum
        self._pe_layers: dict[str, Tensor] = {}
        self._bad: str | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        try:
            size = int(extract_batch_size(batch))
        except Exception:  # noqa: BLE001 - an odd batch only costs this step
            size = 0
        self._mb_size = size
        if self._pe is not None:
            self._pe.start_micro_batch(size if size > 0 else None)
            if self._needs_check:
                self._pe.start_check()
                self._needs_check = False
                self._check_step = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        b = self._mb_size
        if b <= 0:
            self._bad = "could not find the batch size of a micro-batch"
            b = 1
        if self._micro is not None:
            # A sum-reduced micro-batch gradient is b × its mean gradient: weigh |g|² by 1/b².
            weight = 1.0 / (b * b) if self.loss_reduction == "sum" else 1.0
            if self._micro.close_micro_batch(weight):
                self._sizes.append(b)
        if self._pe is not None:
            acc, layers, bad = self._pe.close_micro_batch()
            if self._check_step:
                self._check_step = False
                self._bad = "structural check step"
                self._after_check()
            if bad is not None:
                self._bad = bad
            elif acc is not None:
                # A mean-reduced loss gives example j the share g_j/b of the gradient: undo 1/b.
                w = float(b * b) if self.loss_reduction == "mean" else 1.0
                part = acc.sum() * w
                self._pe_sum = part if self._pe_sum is None else self._pe_sum + part
                self._pe_count += acc.shape[0]
                self._sizes.append(b)
                for name, v in layers.items():
                    lv = v.sum() * w
                    prev = self._pe_layers.get(name)
                    self._pe_layers[name] = lv if prev is None else prev + lv

    def _after_check(self) -> None:
        assert self._pe is not None
        if self._pe.left_out:
            names = ", ".join(f"{k} ({v})" for k, v in sorted(self._pe.left_out.items()))
            self._warn_once(
                "coverage",
                f"GradientNoiseScale: per-example norms cover {self._pe.coverage():.1%} of the "
                f"trainable parameters; left out: {names}. The estimate is over the covered ones.",
            )

    # -- per optimizer step ---------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        try:
            self._step(trainer)
        except Exception as err:  # noqa: BLE001 - statistics must never stop training
            self._skip(f"{type(err).__name__}: {err}")
        finally:
            self._reset_step()

    def _step(self, trainer: pl.Trainer) -> None:
        """Record this step's small- and big-batch |g|² (device scalars, in the units of the
        mean per-example gradient); the estimator consumes them at the next logging step."""
        small_total = self._micro.take() if self._micro is not None else None
        k = trainer.accumulate_grad_batches  # Lightning divides the loss by k before backward
        m = len(self._sizes)
        if self._bad is not None or m == 0:
            if self._bad != "structural check step":
                self._skip(self._bad or "no gradient statistics were collected this step")
            return
        n = sum(self._sizes)
        world = trainer.world_size
        if self._micro is not None:
            b_small = harmonic_batch_size(self._sizes)
            b_big = world * m * b_small
            small = small_total
            params = self._micro.params
            per_small = k * k / m  # mean over micro-batches, times k² for Lightning's 1/k
        else:
            assert self._pe is not None
            b_small, b_big = 1.0, float(world * n)
            small = self._pe_sum
            params = self._pe.params
            per_small = k * k / self._pe_count  # mean over the (sampled) examples
        if b_big <= b_small or small is None:
            self._skip("only one micro-batch in this step" if m == 1 else "a one-example step")
            return
        big = squared_norm(p.grad for p in params)
        if big is None:
            self._skip("no parameter has a gradient")
            return
        # .grad is the mean of the m micro-batch gradients times m/k (sum: of n examples, ×1/k).
        big_scale = (k / n) ** 2 if self.loss_reduction == "sum" else (k / m) ** 2
        inv_scale_sq = self._inv_loss_scale_sq(trainer)
        row = [small * (per_small * inv_scale_sq), big * big_scale]
        names: list[str] = []
        if self.per_layer and self._pe is not None:
            for name, part in self._pe_layers.items():
                site = self._pe.sites.get(name)
                big_l = squared_norm(p.grad for p in site.params.values()) if site else None
                if big_l is not None:
                    row += [part * (per_small * inv_scale_sq), big_l * big_scale]
                    names.append(name)
        self._pending.append((torch.stack(row), b_small, b_big, names))
        self._recent_sizes.append(b_big)

    def _flush(self) -> None:
        """Turn the recorded steps into unbiased estimates and feed the EMAs (logging steps)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        device = pending[0][0].device
        bs = torch.tensor([(p[1], p[2]) for p in pending], dtype=torch.float64, device=device)
        raw = torch.stack([p[0][:2] for p in pending]).double()
        b_small, b_big = bs[:, 0], bs[:, 1]
        self.estimator.update_many(
            unbiased_grad_norm_sq(raw[:, 0], raw[:, 1], b_small, b_big),
            unbiased_trace_cov(raw[:, 0], raw[:, 1], b_small, b_big),
        )
        for row, _, b_big_i, names in pending:  # per-layer estimates (an option): per step
            for j, name in enumerate(names):
                est = self._layer_est.get(name)
                if est is None:
                    est = self._layer_est[name] = GNSEstimator(self.ema_decay, device=device)
                small_l, big_l = row[2 + 2 * j], row[3 + 2 * j]
                est.update(
                    unbiased_grad_norm_sq(small_l, big_l, 1.0, b_big_i),
                    unbiased_trace_cov(small_l, big_l, 1.0, b_big_i),
                )

    @staticmethod
    def _inv_loss_scale_sq(trainer: pl.Trainer) -> Tensor | float:
        """1/s² for the AMP loss scale s that the backward-time gradients carry (device tensor)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if isinstance(scale, Tensor):
            return 1.0 / scale.double().square()
        return 1.0

    def _skip(self, reason: str) -> None:
        self._host_skipped += 1
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
        self._opt_steps += 1
        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        if self._opt_steps % every == 0:
            self._sync_and_log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_and_log(trainer)

    def _sync_and_log(self, trainer: pl.Trainer) -> None:
        """The only host sync: one all-reduce of the small state vector(s), then read-out."""
        self._flush()
        states = [self.estimator.state] + [e.state for e in self._layer_est.values()]
        packed = torch.cat(states)
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="mean")
        parts = packed.split([s.numel() for s in states])
        self.values = self.estimator.read(parts[0])
        self.layer_values = {
            name: est.read(part)
            for (name, est), part in zip(self._layer_est.items(), parts[1:], strict=True)
        }
        metrics = self._metrics()
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @property
    def batch_size(self) -> float:
        """B_big of the recent steps (the most common one, so a short last window is ignored)."""
        if not self._recent_sizes:
            return math.nan
        return Counter(self._recent_sizes).most_common(1)[0][0]

    def _metrics(self) -> dict[str, float]:
        v = self.values
        batch_size = self.batch_size
        out = {
            "gns/b_simple": v.b_simple,
            "gns/b_simple_se": v.b_simple_se,
            "gns/b_simple_debiased": v.b_simple_debiased,
            "gns/grad_norm_sq": v.grad_norm_sq,
            "gns/grad_variance": v.grad_variance,
            "gns/batch_size": float(batch_size),
            "gns/coverage": self.coverage,
            "gns/skipped_steps": float(v.skipped + self._host_skipped),
        }
        out["gns/optimal_batch_size"] = out["gns/efficiency"] = math.nan  # not yet known
        if math.isfinite(v.b_simple) and v.b_simple > 0 and math.isfinite(batch_size):
            opt = advice.optimal_batch_size(v.b_simple, multiple_of=self.batch_size_multiple)
            out["gns/optimal_batch_size"] = float(opt)
            out["gns/efficiency"] = float(advice.efficiency(batch_size, v.b_simple))
        for name, lv in self.layer_values.items():
            out[f"gns/layer/{name}/b_simple"] = lv.b_simple
        return out

    @staticmethod
    def _tensorboard_layout() -> dict[str, dict[str, list[Any]]]:
        return {
            "gradient noise scale": {
                "B_simple": ["Multiline", ["gns/b_simple", "gns/optimal_batch_size"]],
                "B_simple standard error": ["Multiline", ["gns/b_simple_se"]],
                "|G|² and tr(Σ)": ["Multiline", ["gns/grad_norm_sq", "gns/grad_variance"]],
                "batch size and efficiency": ["Multiline", ["gns/batch_size", "gns/efficiency"]],
            }
        }

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        est_sd = self.estimator.state_dict()
        return {
            "estimator": est_sd,
            "layers": {name: e.state_dict() for name, e in self._layer_est.items()},
            "opt_steps": self._opt_steps,
            "host_skipped": self._host_skipped,
            "recent_sizes": list(self._recent_sizes),
            "left_out": dict(self._pe.left_out) if self._pe is not None else self._left_out,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._left_out = state_dict.get("left_out")
        if self.active_source is None:
            self._pending_state = state_dict  # applied at fit start, once the device is known
        else:
            self._apply_state(state_dict)

    def _apply_state(self, sd: dict[str, Any]) -> None:
        device = self.estimator.state.device
        self.estimator.load_state_dict(sd["estimator"])
        self.estimator.to(device)
        self._layer_est = {}
        for name, esd in sd.get("layers", {}).items():
            est = GNSEstimator(self.ema_decay, device=device)
            est.load_state_dict(esd)
            self._layer_est[name] = est.to(device)
        self._opt_steps = int(sd.get("opt_steps", 0))
        self._host_skipped = int(sd.get("host_skipped", 0))
        self._recent_sizes.clear()
        self._recent_sizes.extend(sd.get("recent_sizes", []))
        self.values = self.estimator.read()
