"""What the callback reads from the Trainer: arguments checked up front, supported strategies,
this step's scale factors, and whether a step has a second gradient to compare with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

from lightning_gns._compat import compiled_by_lightning, is_compiled_module, loss_scale
from lightning_gns.driver import StepDriver, Warn
from lightning_gns.estimator import check_decay
from lightning_gns.norms.moe_compiled import in_graph
from lightning_gns.norms.preconditioner import keeps_second_moment
from lightning_gns.norms.sharded import refusal, sharding_of
from lightning_gns.norms.tensor_parallel import data_parallel_size, layout_of
from lightning_gns.records import PRECONDITIONED, Units
from lightning_gns.sources import PreconditionedSource, Source, SourceName, choose_source
from lightning_gns.tracker import GNSTracker


class Settings(Protocol):
    """What building a driver reads from the callback's arguments (no import of the callback)."""

    ema_decay: float | None
    source: SourceName
    layers: Literal["all", "norm"]
    per_layer: bool
    examples_per_batch: int | None
    batch_size_fn: Callable[[Any], int] | None
    preconditioned: bool


SUPPORTED = (
    "single-device, DDP, FSDP (FSDPStrategy) and ModelParallelStrategy (FSDP2, tensor and "
    "2-D parallelism) strategies with one optimizer and automatic optimization"
)
CHOICES = {
    "source": ("auto", "micro_batch", "per_example"),
    "layers": ("all", "norm"),
    "loss_reduction": ("mean", "sum"),
}
MAX_INTERVAL = 10**9  # log_every_n_steps and the like: a larger value is a typo


def check_arguments(args: dict[str, Any]) -> None:
    """Refuse at construction what would break training later (LightningCLI also checks the
    ``Literal`` choices from the signature)."""
    for name, allowed in CHOICES.items():
        if args[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {args[name]!r}")
    for name in ("log_every_n_steps", "batch_size_multiple", "examples_per_batch"):
        value = args[name]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INTERVAL
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    for name in ("per_layer", "preconditioned", "summary"):
        if not isinstance(args[name], bool):
            raise ValueError(f"{name} must be True or False, got {args[name]!r}")
    if args["per_layer"] and args["source"] == "micro_batch":
        raise ValueError("per_layer needs per-example norms: use source='per_example'")
    if args["batch_size_fn"] is not None and not callable(args["batch_size_fn"]):
        raise ValueError("batch_size_fn must be a function batch -> number of examples")
    check_decay(args["ema_decay"])


def check_setup(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """A clear error at fit start for what the callback cannot measure."""
    strategy = trainer.strategy
    supported = (SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy)
    if (why := refusal(strategy, trainer.model or pl_module, tensor_parallel=True)) is not None:
        raise RuntimeError(f"GradientNoiseScale: {why}")
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, supported):
        got = f"strategy {type(strategy).__name__}"
    elif not pl_module.automatic_optimization:
        got = "manual optimization"
    elif len(trainer.optimizers) != 1:
        got = f"{len(trainer.optimizers)} optimizers"
    else:
        return
    raise RuntimeError(f"GradientNoiseScale supports {SUPPORTED}; got {got}")


def units(trainer: pl.Trainer, reduction: str) -> Units:
    """This step's scale factors: accumulation, reduction, AMP loss scale, world size."""
    scale = loss_scale(trainer)
    if isinstance(scale, torch.Tensor):
        inv: torch.Tensor | float = 1.0 / scale.double().square()
    else:
        inv = 1.0 / scale**2 if scale else float("nan")  # unreadable: the step is skipped
    world = data_parallel_size(trainer.strategy, trainer.world_size)  # (tensor parallel: / TP)
    return Units(trainer.accumulate_grad_batches, reduction, inv, world)  # type: ignore[arg-type]


def micro_batches_per_step(trainer: pl.Trainer) -> int:
    """Micro-batches in an optimizer step: the accumulation, or the whole epoch when it has
    fewer batches (Lightning then steps at each epoch's end)."""
    accumulate, n = trainer.accumulate_grad_batches, trainer.num_training_batches
    return int(n) if isinstance(n, (int, float)) and 1 <= n < accumulate else accumulate


def several_gradients_per_step(trainer: pl.Trainer) -> bool:
    """Whether steps combine several micro-batch or rank gradients (now or by a schedule, or
    because an AdaptiveBatchSize callback keeps accumulating)."""
    if trainer.accumulate_grad_batches > 1:
        return True
    if data_parallel_size(trainer.strategy, trainer.world_size) > 1:
        return True
    for c in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(c, GradientAccumulationScheduler) and c.going_to_accumulate_grad_batches():
            return True
        if (getattr(c, "min_accumulate", None) or 1) > 1:  # AdaptiveBatchSize
            return True
    return False


def compiled(pl_module: pl.LightningModule) -> bool:
    """Whether ``torch.compile`` wraps the module (Lightning's ``from_compiled``) or a part."""
    return compiled_by_lightning(pl_module) or any(
        is_compiled_module(m) for m in pl_module.modules()
    )


def warn_if_compiled_fallback(pl_module: pl.LightningModule, source: Source, warn: Warn) -> None:
    """A compiled model with layers on the torch.func fallback: their graph splits."""
    sites = getattr(getattr(source, "norms", None), "sites", {})
    fallback = [site.label for site in sites.values() if site.generic and not in_graph(site)]
    if fallback and compiled(pl_module):
        warn(
            "compile",
            "GradientNoiseScale: the model is compiled, and these layers have no per-example "
            f"rule: {', '.join(fallback[:5])}; their torch.func fallback splits the graph. "
            "The micro-batch source compiles whole: set Trainer(accumulate_grad_batches>=2) "
            "or use DDP (the default source='auto' then takes it), or register a rule "
            "(lightning_gns.norms.register_norm)",
        )


def preconditioned_driver(
    trainer: pl.Trainer, pl_module: pl.LightningModule, cb: Settings
) -> StepDriver:
    """A second measurement, of the optimizer-preconditioned gradients, between micro-batches."""
    if not several_gradients_per_step(trainer):
        raise RuntimeError(
            "GradientNoiseScale(preconditioned=True) measures between micro-batches: set "
            "Trainer(accumulate_grad_batches>=2) or train on 2+ devices (DDP)"
        )
    tp = layout_of(trainer.strategy, trainer.world_size) is not None
    if sharding_of(trainer.model or pl_module) != "none" or tp:
        raise RuntimeError(
            "GradientNoiseScale(preconditioned=True) is not supported under FSDP or tensor "
            "parallelism (the "
            "optimizer's state is sharded like the parameters): measure it with DDP, or drop "
            "preconditioned=True"
        )
    optimizer = trainer.optimizers[0]
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = [p for p in pl_module.parameters() if p.requires_grad and id(p) in stepped]
    source = PreconditionedSource(params, optimizer)
    source.attach()
    tracker = GNSTracker(cb.ema_decay, [PRECONDITIONED], device=params[0].device)
    quiet: Callable[[str, str], None] = lambda key, message: None  # noqa: E731
    return StepDriver(source, tracker, quiet)


def build_driver(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    cb: Settings,
    left_out: dict[str, str] | None,
    warn: Warn,
) -> tuple[StepDriver, str]:
    """The callback's driver (source chosen and attached, tracker on the module's device, the
    preconditioned follower) and why that source; a clear error for what cannot be measured."""
    try:
        choice = choose_source(
            pl_module,
            cb.source,
            cb.layers,
            several_gradients_per_step(trainer),
            cb.per_layer,
            cb.examples_per_batch,
            left_out,
            trainer.model,
            layout_of(trainer.strategy, trainer.world_size),
        )
    except ValueError as err:
        raise RuntimeError(f"GradientNoiseScale: {err}") from None
    warn_if_compiled_fallback(pl_module, choice.source, warn)
    if cb.per_layer and choice.source.name != "per_example":
        warn(
            "per_layer",
            "GradientNoiseScale(per_layer=True) needs per-example norms, and micro-batches "
            f"measure this run ({choice.why}): no per-layer values will be logged. Use "
            "source='per_example' for them.",
        )
    choice.source.attach()
    tracker = GNSTracker(cb.ema_decay, choice.source.columns, device=pl_module.device)
    driver = StepDriver(choice.source, tracker, warn, cb.batch_size_fn)
    if cb.preconditioned:
        driver.followers.append(preconditioned_driver(trainer, pl_module, cb))
    return driver, choice.why


def warn_if_no_second_moment(trainer: pl.Trainer, driver: StepDriver, warn: Warn) -> None:
    """``preconditioned=True`` with an optimizer that keeps no second moment (e.g. SGD)."""
    if not keeps_second_moment(trainer.optimizers[0]) and driver.steps > 1:
        warn(
            "preconditioner",
            "GradientNoiseScale(preconditioned=True): the optimizer keeps no second-moment "
            "estimate (exp_avg_sq, square_avg or sum in its state), so there is no "
            "preconditioned noise scale to measure",
        )
