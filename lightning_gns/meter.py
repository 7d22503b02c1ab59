"""The gradient noise scale in a loop you write: :class:`GradientNoiseMeter`.

For Lightning Fabric and plain PyTorch loops (litgpt, nanoGPT, torchtitan or Accelerate
style). It drives the same step driver, sources and tracker as the Lightning callback
(:mod:`lightning_gns.driver`): one path from backward to the estimate. :class:`Readings`, the
latest read-out and its checkpoint state, is shared by the meter and
:class:`~lightning_gns.GradientNoiseScale`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_gns import host_sync, keys
from lightning_gns._compat import SuggestsArguments
from lightning_gns.driver import StepDriver
from lightning_gns.estimator import GNSValues
from lightning_gns.norms.sharded import refusal
from lightning_gns.norms.sites import Site
from lightning_gns.publish import point_estimate, read_out, summary
from lightning_gns.records import MODEL, PRECONDITIONED, Units
from lightning_gns.sources import PerExampleSource, SourceName, choose_source
from lightning_gns.tracker import GNSTracker, flush_together, read_together
from lightning_gns.trainer_setup import check_arguments

# The Trainer's fixes, as a meter user applies them (messages shared with the callback).
DIFFER = (
    "{}: the first step (the structural check) left out other modules on other processes: "
    "{}. They are left out on every process from here, and the steps measured before, which "
    "mixed them, are dropped"
)
_FIXES = {
    "Trainer(accumulate_grad_batches>=2)": "GradientNoiseMeter(accumulate=2) (2+ micro-batches "
    "per step)",
    "Trainer(accumulate_grad_batches>1)": "GradientNoiseMeter(accumulate=2) (2+ micro-batches "
    "per step)",
    "GradientNoiseScale": "GradientNoiseMeter",
}


def for_meter(message: str) -> str:
    """A message written for the callback, with the fixes a meter user applies."""
    for old, new in _FIXES.items():
        message = message.replace(old, new)
    return message


class Readings:
    """The latest read-out of a meter or callback, and the state to resume it from."""

    batch_size_multiple: int | None
    source_reason: str

    def __init__(self) -> None:
        super().__init__()
        self.values = GNSValues.unknown()
        self.preconditioned_values = GNSValues.unknown()
        self.layer_values: dict[str, GNSValues] = {}
        self.reads = 0  # read-outs so far (AdaptiveBatchSize acts on each new one)
        self._agreed = False  # the processes agreed on the modules covered (agree_once)
        self.source_reason = ""
        self._driver: StepDriver | None = None
        self._saved: dict[str, Any] | None = None  # checkpoint state until the driver exists
        self._warned: set[str] = set()
        self._steps = self._logged_at = 0  # optimizer steps; the step of the last read-out
        self._carried: tuple[int, ...] | None = None  # the run whose state _saved keeps

    def _accumulate(self) -> float:
        """Micro-batches per optimizer step on one process (NaN: not known yet)."""
        raise NotImplementedError

    def _world_size(self) -> int:
        """Processes whose gradients each step averages."""
        raise NotImplementedError

    def _data_parallel(self) -> int:
        """Processes that see different examples (tensor parallel: world / TP)."""
        return self._world_size()

    @property
    def tracker(self) -> GNSTracker | None:
        """The estimators' state, once measuring started."""
        return self._driver.tracker if self._driver is not None else None

    @property
    def chosen_source(self) -> str | None:
        """``per_example`` or ``micro_batch`` once measuring started (:attr:`source_reason`)."""
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
        """Examples per optimizer step now: usual micro-batch × accumulation × data-parallel
        size (the processes that see different examples)."""
        if self._driver is None:
            return math.nan
        return self._driver.usual * self._accumulate() * self._data_parallel()

    def summary_text(self) -> str:
        """The end-of-run summary (:func:`lightning_gns.publish.summary`)."""
        if self._driver is None:
            return f"{type(self).__name__}: not fitted"
        src, multiple = self._driver.source, self.batch_size_multiple
        d = self._driver
        return summary(
            self.values,
            self.batch_size,
            src.name,
            self.source_reason,
            src.coverage,
            multiple,
            d.checked,
        )

    def metrics(self) -> dict[str, float]:
        """The ``gns/*`` values of the latest read-out (README: "What is logged")."""
        d = self._driver
        small = 1.0 if d is None or self.chosen_source == "per_example" else d.usual
        out = read_out(self.values, self.batch_size, small, self.batch_size_multiple)
        out[keys.COVERAGE] = self.coverage
        for name, lv in self.layer_values.items():
            out[keys.layer_b_simple(name)] = point_estimate(lv)
        if d is not None and d.followers:
            pv = self.preconditioned_values
            out[keys.PRECONDITIONED_B_SIMPLE] = point_estimate(pv)
            out[keys.PRECONDITIONED_LOWER] = pv.b_simple_lower
            out[keys.PRECONDITIONED_UPPER] = pv.b_simple_upper
        return out

    def _read_out(self) -> bool:
        """The only host sync: one reduction of every process's pending steps, then the values;
        whether a preconditioned measurement was read too."""
        driver = self._driver
        assert driver is not None
        self._logged_at = self._steps
        self.agree_once()  # (its reduction pools the pending steps: the read's one collective)
        values, *precond = read_together(driver.trackers, self._world_size() > 1)
        self.values = values.pop(MODEL)
        self.layer_values = {k: v for k, v in values.items() if k not in self.left_out}
        if precond:
            self.preconditioned_values = precond[0][PRECONDITIONED]
        self.reads += 1
        driver.check_nonfinite(self.values)
        return bool(precond)

    def agree_once(self) -> bool:
        """Once the structural check has run on several processes (a collective: call it on
        every process): sum which modules each one covers, with the pending steps. Where the
        checks disagreed (a module the first batch calls on one process only), those modules
        are left out everywhere and the steps so far, which mixed them, are dropped. Whether
        any were."""
        d = self._driver
        if self._agreed or d is None or self._world_size() < 2 or d.checked == 0:
            return False
        self._agreed, source = True, d.source
        if not isinstance(source, PerExampleSource):
            return False
        mask = torch.tensor(source.covered_mask()).to(d.tracker.moments)
        flush_together(d.trackers, True, mask)
        if differ := source.agree(mask.tolist(), dist.get_world_size()):
            d.warn("processes", DIFFER.format(type(self).__name__, ", ".join(differ)))
            d.tracker.reset()  # (a follower measures micro-batches: every parameter)
        return bool(differ)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain numbers to resume from (under DDP a collective: call it on every process)."""
        if self._driver is None:
            return dict(self._saved or {})
        self.agree_once()
        left_out = self.left_out if self.chosen_source == "per_example" else None
        state = self._driver.state_dict(self._world_size() > 1)
        return {"steps": self._steps, "left_out": left_out, **state}

    def _end_run(self, run: tuple[int, ...]) -> None:
        """Keep the state at the end of a run (a fit): the same run continues from it."""
        self._saved, self._carried = self.state_dict(), run

    def _begin_run(self, run: tuple[int, ...]) -> None:
        """Another run than the one kept starts afresh: its own estimate, not the last one's."""
        if self._carried not in (None, run):
            Readings.__init__(self)
        self._carried = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the latest read-out is restored with it)."""
        if self._driver is None or self._carried is not None:  # a checkpoint wins
            self._saved, self._carried = dict(state_dict), None  # applied once the source is known
        else:
            self._restore(state_dict)

    def _restore(self, sd: dict[str, Any]) -> None:
        """Resumed per-example norms keep the checked layers: no second structural check
        (FSDP restores callback state after the source is built, on the first step)."""
        assert self._driver is not None
        source, left_out = self._driver.source, sd.get("left_out")
        if isinstance(source, PerExampleSource) and left_out is not None and source.needs_check:
            for name, reason in left_out.items():
                source.norms.drop(name, reason)
            source.needs_check = False
        self._driver.load_state_dict(sd)
        self._steps = self._logged_at = int(sd.get("steps", 0))
        self.values = self._driver.tracker.read()[MODEL]


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the user's own module, the module as its strategy wraps it) from a Fabric, DDP or
    FSDP1 wrapper, or the module itself."""
    wrapped = getattr(model, "_forward_module", model)  # Fabric's _FabricModule
    inner = getattr(model, "_original_module", None) or wrapped
    while type(inner).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
        inner = inner.module
    return inner, wrapped


def check_loop(model: nn.Module, wrapped: nn.Module) -> None:
    """A clear error for what a meter cannot measure, with the fix."""
    strategy = getattr(model, "_strategy", None)  # set up by Fabric
    why = refusal(strategy, wrapped)
    if why is None and getattr(getattr(strategy, "precision", None), "scaler", None) is not None:
        why = (
            "fp16 loss scaling (Fabric precision='16-mixed') is not measured in your own loop "
            "(.grad is still scaled when meter.step() runs): use precision='bf16-mixed', or "
            "Trainer with GradientNoiseScale"
        )
    if why is not None:
        raise RuntimeError(f"GradientNoiseMeter: {for_meter(why)}")


def world_size() -> int:
    """Processes of the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GradientNoiseMeter(SuggestsArguments, Readings):
    r"""Measure B_simple = tr(Σ)/|G|² in your own training loop (Fabric or plain PyTorch).

    Call :meth:`step` once per optimizer step, after the backward and before
    ``optimizer.step()``. The meter sees each micro-batch through a forward pre-hook on the
    model (forwards under ``torch.no_grad`` are not counted) and reads out every
    ``log_every_n_steps`` steps: then :attr:`b_simple`, :attr:`b_simple_lower`,
    :attr:`b_simple_upper` and :meth:`metrics` (the callback's ``gns/*`` keys, ready for
    ``fabric.log_dict`` or a ``SummaryWriter``) hold the new values. Under DDP or FSDP each
    read-out pools every process's steps with one all-reduce: call :meth:`step` on every
    process. Sources, refusals and the no-host-sync promise are the callback's
    (:class:`~lightning_gns.GradientNoiseScale`).

    Args:
        model: the model as the loop calls it: a ``nn.Module``, a module from
            ``fabric.setup``, or a ``DistributedDataParallel``/FSDP wrapper.
        ema_decay: ``None`` (default): the adaptive window; a float in (0, 1): a fixed EMA
            window of about 1/(1 − β) steps.
        source: ``auto``, ``micro_batch`` or ``per_example``, as in the callback.
        layers: per-example layers: ``all`` or ``norm``.
        loss_reduction: how the loss combines examples: ``mean`` or ``sum``.
        accumulate: micro-batches per optimizer step, each loss divided by it (as litgpt and
            nanoGPT do). ``None`` (default): counted each step (the forwards since the last
            step), the loss taken as divided by that count; give it to let ``auto`` measure
            between micro-batches.
        log_every_n_steps: optimizer steps between read-outs.
        per_layer: also read ``gns/layer/<module>/b_simple`` (per-example source only).
        batch_size_multiple: round the recommended batch size to a multiple of this.
        examples_per_batch: per-example norms for only the first k examples of a micro-batch.
        batch_size_fn: ``inputs -> number of examples`` for a forward whose first argument's
            dim 0 is not the batch (``inputs``: the forward's only positional argument, else
            all of them, else its keyword arguments).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an argument out of its range (the message names it).
        RuntimeError: a set-up it cannot measure, with the fix (the callback's refusals, and
            fp16 loss scaling).

    Examples:
        >>> import torch
        >>> from lightning_gns import GradientNoiseMeter
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 4, generator=gen)
        >>> y = (x[:, 0] > 0).long()
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> meter = GradientNoiseMeter(model, log_every_n_steps=8)
        >>> for i in range(0, 256, 8):
        ...     loss = torch.nn.functional.cross_entropy(model(x[i : i + 8]), y[i : i + 8])
        ...     loss.backward()
        ...     read = meter.step()  # True at a read-out
        ...     optimizer.step()
        ...     optimizer.zero_grad()
        >>> meter.chosen_source, meter.batch_size, meter.reads
        ('per_example', 8.0, 4)
        >>> meter.b_simple_lower > 0 and "gns/b_simple" in meter.metrics()
        True
        >>> GradientNoiseMeter(model, accumulate=0)
        Traceback (most recent call last):
        ...
        ValueError: accumulate must be a positive int or None, got 0
    """

    def __init__(
        self,
        model: nn.Module,
        ema_decay: float | None = None,
        source: SourceName = "auto",
        layers: Literal["all", "norm"] = "all",
        loss_reduction: Literal["mean", "sum"] = "mean",
        accumulate: int | None = None,
        log_every_n_steps: int = 50,
        per_layer: bool = False,
        batch_size_multiple: int | None = None,
        examples_per_batch: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        super().__init__()
        args = {**locals(), "preconditioned": False, "summary": True}
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if accumulate is not None and (
            isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1
        ):
            raise ValueError(f"accumulate must be a positive int or None, got {accumulate!r}")
        if log_every_n_steps is None:
            raise ValueError("log_every_n_steps must be a positive int, got None")
        check_arguments(args)
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.loss_reduction: Literal["mean", "sum"] = loss_reduction
        self.accumulate, self.log_every_n_steps = accumulate, log_every_n_steps
        self.batch_size_multiple = batch_size_multiple
        self.module, wrapped = unwrap(model)
        check_loop(model, wrapped)
        self.world = world_size()
        # several gradients per step: told, or counted where micro-batches were asked for
        several = (
            (accumulate or 1) > 1 or self.world > 1 or (accumulate, source) == (None, "micro_batch")
        )
        try:
            choice = choose_source(
                self.module, source, layers, several, per_layer, examples_per_batch, None, wrapped
            )
        except ValueError as err:
            raise RuntimeError(f"GradientNoiseMeter: {for_meter(str(err))}") from None
        choice.source.attach()
        device = choice.source.params[0].device
        tracker = GNSTracker(self.ema_decay, choice.source.columns, device=device)
        self._driver = driver = StepDriver(
            choice.source, tracker, self._warn_once, batch_size_fn, name="GradientNoiseMeter"
        )
        driver.probe_model = self.module  # probed during the first micro-batch
        self.source_reason = for_meter(choice.why)
        self._micro = 0  # micro-batches opened since the last step
        self._last_accumulate = float(accumulate) if accumulate else math.nan
        self._open = self._closed = self._busy = False
        self._hook = self.module.register_forward_pre_hook(
            self._forward, prepend=True, with_kwargs=True
        )  # before the model's own hooks (the per-example sites' on a bare layer)

    def _accumulate(self) -> float:
        return self._last_accumulate

    def _world_size(self) -> int:
        return self.world

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(for_meter(message))

    def summary_text(self) -> str:
        """B_simple or its bound with the interval, the advice, the source, coverage."""
        return for_meter(super().summary_text())

    def _forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A forward that will backward opens a micro-batch (and closes the one before)."""
        if not torch.is_grad_enabled() or self._driver is None or self._busy or self._closed:
            return
        with host_sync.watched():
            self._close()
            self._driver.start_micro_batch(args[0] if len(args) == 1 else (args or kwargs))
            self._open, self._micro = True, self._micro + 1

    def _close(self) -> None:
        if self._open and self._driver is not None:
            self._open, self._busy = False, True  # the structural check calls the model's layers
            try:
                self._driver.end_micro_batch(self.loss_reduction)
            finally:
                self._busy = False

    def step(self) -> bool:
        """Record this optimizer step: after the backward, before ``optimizer.step()`` (and
        before any gradient clipping). Every ``log_every_n_steps`` steps it reads out (one
        host sync; under DDP one all-reduce) and returns True."""
        if self._driver is None or self._closed:
            raise RuntimeError("GradientNoiseMeter.step() after close(): make a new meter")
        with host_sync.watched():
            self._close()
            k, self._micro = self.accumulate or max(self._micro, 1), 0
            self._last_accumulate = float(k)
            self._driver.end_step(Units(k, self.loss_reduction, 1.0, self.world))
            self._steps += 1
        if self._steps % self.log_every_n_steps:
            return False
        with host_sync.allowed():
            self._read_out()
        return True

    def read(self) -> GNSValues:
        """Read out now, whatever the step (under DDP a collective: on every process)."""
        if self._driver is not None and self._steps > self._logged_at:
            with host_sync.allowed():
                self._read_out()
        return self.values

    def close(self) -> None:
        """Remove the meter's hooks from the model (the latest values stay readable)."""
        if self._driver is not None and not self._closed:
            self._closed = True
            self._hook.remove()
            self._driver.detach()
