"""Where each optimizer step's small- and big-batch squared norms come from.

A source sees every micro-batch (``start_micro_batch`` before its forward, ``end_micro_batch``
after its backward) and hands over one :class:`StepNorms` per optimizer step (``end_step``,
before the optimizer changes ``.grad``), in the units of the mean per-example gradient. Every
scale factor of the backward is undone here and only here (:class:`Units`):

* Lightning divides the loss by ``accumulate`` before each backward (×k on gradients);
* a mean-reduced loss gives example j the share g_j/b of its micro-batch's gradient (×b);
* a sum-reduced loss makes a micro-batch's gradient b × its mean gradient (×1/b);
* the AMP loss scale s multiplies every backward-time gradient (×1/s², on squared norms);
* DDP averages rank gradients into ``.grad`` (counted in ``b_big``).

Small and big norms always cover exactly the same parameters (the source's ``params``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_gns.estimator import harmonic_batch_size
from lightning_gns.norms import MicroBatchNorms, PerExampleNorms, squared_norm
from lightning_gns.norms.hooks import coupled_modules, unrecognised_norm_layers
from lightning_gns.norms.preconditioner import WeightedMicroBatchNorms, inverse_preconditioner

Reduction = Literal["mean", "sum"]
MODEL = "model"  # the column of the whole (covered) model; per-layer columns follow
PRECONDITIONED = "preconditioned"  # the column of the optimizer-preconditioned model


class SkipStep(Exception):
    """This step gives no usable sample. ``silent``: expected (e.g. the structural check)."""

    def __init__(self, reason: str, silent: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.silent = reason, silent


@dataclass(frozen=True)
class Units:
    """How the backward's gradients are scaled this step (see the module docstring)."""

    accumulate: int = 1
    reduction: Reduction = "mean"
    inv_loss_scale_sq: Tensor | float = 1.0
    world_size: int = 1


@dataclass(frozen=True)
class StepNorms:
    """One optimizer step: per column (model, then layers), the mean of |g_small|² over the
    small batches and |G_big|², as device tensors, with the two batch sizes."""

    small_sq: Tensor
    big_sq: Tensor
    b_small: float
    b_big: float


def _big_scale(units: Units, m: int, n: int) -> float:
    """``.grad`` is the mean of m micro-batch gradients times m/k (sum-reduced: the sum over n
    examples times 1/k); DDP has already averaged the ranks. Squared: this factor."""
    k = units.accumulate
    return (k / n) ** 2 if units.reduction == "sum" else (k / m) ** 2


def _big_sq(params: list[nn.Parameter], units: Units, m: int, n: int) -> Tensor:
    """|G_big|² of the optimizer's ``.grad`` over ``params``, in mean-per-example units."""
    big = squared_norm(p.grad for p in params)
    if big is None:
        raise SkipStep("no covered parameter has a gradient this step")
    return big * _big_scale(units, m, n)


class MicroBatchSource:
    """Small batches are micro-batches (gradient accumulation) and ranks (DDP)."""

    name = "micro_batch"
    coverage = 1.0  # every trainable parameter
    left_out: dict[str, str] = {}

    def __init__(self, params: list[nn.Parameter], norms: MicroBatchNorms | None = None) -> None:
        self.params = params
        self.columns = [MODEL]
        self.norms = norms if norms is not None else MicroBatchNorms(params)
        self.sizes: list[int] = []

    def attach(self) -> None:
        self.norms.attach()

    def detach(self) -> None:
        self.norms.detach()
        self.sizes = []

    def coverage_note(self) -> None:
        """Micro-batch norms cover every trainable parameter: nothing to say."""

    def start_micro_batch(self, batch_size: int) -> None:
        """Nothing to prepare: parameter hooks see each micro-batch gradient."""

    def end_micro_batch(self, batch_size: int, reduction: Reduction) -> None:
        # A sum-reduced micro-batch gradient is b × its mean gradient: weigh |g|² by 1/b².
        weight = 1.0 / batch_size**2 if reduction == "sum" else 1.0
        if self.norms.close_micro_batch(weight):
            self.sizes.append(batch_size)

    def end_step(self, units: Units) -> StepNorms:
        total, sizes, self.sizes = self.norms.take(), self.sizes, []
        if total is None or not sizes:
            raise SkipStep("no micro-batch gradient was recorded this step")
        m = len(sizes)
        if m * units.world_size < 2:
            raise SkipStep(
                "only one micro-batch gradient in this step (a short last accumulation window)"
            )
        b_small = harmonic_batch_size(sizes)
        k = units.accumulate
        small = total * (k * k / m) * units.inv_loss_scale_sq  # mean over micro-batches
        big = self._big_sq(units, m, sum(sizes))
        return StepNorms(small.reshape(1), big.reshape(1), b_small, units.world_size * m * b_small)

    def _big_sq(self, units: Units, m: int, n: int) -> Tensor:
        return _big_sq(self.params, units, m, n)


class PerExampleSource:
    """Small batches are single examples (B_small = 1), from per-example module hooks.

    The first micro-batch runs the structural check (its step is skipped silently) unless
    ``left_out`` from an earlier run is given. ``per_layer`` adds one column per module.
    """

    name = "per_example"

    def __init__(
        self, norms: PerExampleNorms, per_layer: bool = False, left_out: dict | None = None
    ) -> None:
        self.norms = norms
        for name, reason in (left_out or {}).items():
            norms.leave_out(name, reason)
        self.layer_names = list(norms.sites) if per_layer else []
        self.columns = [MODEL, *self.layer_names]
        self.needs_check = left_out is None
        self._checking = False
        self._reset()

    @property
    def params(self) -> list[nn.Parameter]:
        return self.norms.params

    @property
    def coverage(self) -> float:
        return self.norms.coverage()

    @property
    def left_out(self) -> dict[str, str]:
        return dict(self.norms.left_out)

    def coverage_note(self) -> str | None:
        """One line naming what the per-example norms leave out (None: everything covered)."""
        if not self.norms.left_out:
            return None
        names = ", ".join(f"{k} ({v})" for k, v in sorted(self.norms.left_out.items()))
        if not self.norms.sites:
            return (
                f"per-example norms cover none of the trainable parameters (left out: {names}), "
                "so no step can be measured. Set Trainer(accumulate_grad_batches>=2) or train on "
                "2+ devices (DDP) to measure between micro-batches, or register a rule with "
                "lightning_gns.norms.register_norm"
            )
        return (
            f"per-example norms cover {self.coverage:.1%} of the trainable parameters; left "
            f"out: {names}. The estimate is over the covered ones."
        )

    def _reset(self) -> None:
        self.total: Tensor | None = None  # Σ_j |g_j|² in backward units × b² (mean loss)
        self.layers: dict[str, Tensor] = {}
        self.count = 0  # examples in total
        self.sizes: list[int] = []
        self.bad: str | None = None

    def attach(self) -> None:
        self.norms.attach()

    def detach(self) -> None:
        self.norms.detach()
        self._reset()

    def start_micro_batch(self, batch_size: int) -> None:
        self.norms.start_micro_batch(batch_size)
        if self.needs_check:
            self.needs_check, self._checking = False, True
            self.norms.start_check()

    def end_micro_batch(self, batch_size: int, reduction: Reduction) -> None:
        acc, layers, bad = self.norms.close_micro_batch()
        if self._checking:
            self._checking = False
            self.bad = "structural check step"
            return
        if bad is not None or acc is None:
            self.bad = self.bad or bad or "no per-example norm was recorded"
            return
        # A mean-reduced loss gives example j the share g_j/b of the gradient: undo 1/b.
        w = float(batch_size**2) if reduction == "mean" else 1.0
        part = acc.sum() * w
        self.total = part if self.total is None else self.total + part
        self.count += acc.shape[0]
        self.sizes.append(batch_size)
        for name, v in layers.items():
            lv = v.sum() * w
            self.layers[name] = lv if name not in self.layers else self.layers[name] + lv

    def end_step(self, units: Units) -> StepNorms:
        try:
            return self._step(units)
        finally:
            self._reset()

    def _step(self, units: Units) -> StepNorms:
        if self.bad is not None:
            raise SkipStep(self.bad, silent=self.bad == "structural check step")
        if self.total is None or not self.sizes:
            raise SkipStep("no per-example norm was recorded this step")
        m, n = len(self.sizes), sum(self.sizes)
        b_big = float(units.world_size * n)
        if b_big < 2:
            raise SkipStep(
                "this step has one example: per-example norms need at least 2 examples per "
                "optimizer step (raise the batch size or accumulate gradients)"
            )
        scale = units.accumulate**2 / self.count * units.inv_loss_scale_sq  # mean over examples
        small = [self.total * scale]
        big = [_big_sq(self.params, units, m, n)]
        for name in self.layer_names:
            site = self.norms.sites.get(name)
            part = self.layers.get(name)
            grads = squared_norm(p.grad for p in site.params.values()) if site else None
            if part is None or grads is None:
                small.append(torch.full_like(small[0], float("nan")))
                big.append(torch.full_like(big[0], float("nan")))
                continue
            small.append(part * scale)
            big.append(grads * _big_scale(units, m, n))
        return StepNorms(torch.stack(small), torch.stack(big), 1.0, b_big)


class PreconditionedSource(MicroBatchSource):
    """Micro-batch norms of preconditioned gradients P·g, P = 1/(√v̂ + ε) from ``optimizer``
    (:mod:`lightning_gns.norms.preconditioner`); a step before the optimizer has state is
    skipped silently. Column ``preconditioned``."""

    name = "preconditioned"

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.norms: WeightedMicroBatchNorms = WeightedMicroBatchNorms(params)
        super().__init__(params, self.norms)
        self.columns = [PRECONDITIONED]
        self.optimizer = optimizer
        self.steps = 0  # optimizer steps seen

    def start_micro_batch(self, batch_size: int) -> None:
        if self.norms.weights is None:  # once per step: the state changes only when stepping
            self.norms.weights = inverse_preconditioner(self.optimizer, self.params)

    def end_step(self, units: Units) -> StepNorms:
        self.steps += 1
        try:
            if self.norms.weights is None:
                self.norms.take()
                self.sizes = []
                raise SkipStep("the optimizer has no second-moment state yet", silent=True)
            return super().end_step(units)
        finally:
            self.norms.weights = None

    def _big_sq(self, units: Units, m: int, n: int) -> Tensor:
        big = self.norms.big_sq()
        if big is None:
            raise SkipStep("no covered parameter has a gradient this step")
        return big * _big_scale(units, m, n)


Source = MicroBatchSource | PerExampleSource


def build_source(
    model: nn.Module,
    source: Literal["auto", "micro_batch", "per_example"] = "auto",
    layers: Literal["all", "norm"] = "all",
    several_gradients: bool = True,
    per_layer: bool = False,
    examples_per_batch: int | None = None,
    left_out: dict[str, str] | None = None,
) -> Source:
    """The source for this model and set-up, or a ``ValueError`` that says what to do.

    ``auto`` takes per-example norms when dedicated rules cover every trainable parameter, when
    ``layers="norm"``, or when a step has no second gradient (``several_gradients`` False:
    one device, no accumulation); micro-batches otherwise. The rules also run inside a
    ``torch.compile`` graph (:mod:`lightning_gns.norms.compiled`); the torch.func fallback for
    layers without one does not. Per-example norms are refused where they are undefined
    (BatchNorm in train mode mixes the examples of a batch).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if source == "micro_batch":
        if not several_gradients:
            raise ValueError(
                "source='micro_batch' needs two gradients per step to compare: set "
                "Trainer(accumulate_grad_batches>1) or train on several devices (DDP), or use "
                "source='per_example' (the default 'auto' picks it)"
            )
        return MicroBatchSource(params)
    norms = PerExampleNorms(model, layers, per_layer, examples_per_batch)
    coupled = coupled_modules(model)
    # auto prefers the fast path: per-example norms when dedicated rules cover every parameter
    # (the torch.func fallback costs 2-4x its layer, 50x an LSTM); micro-batches otherwise.
    fast = not any(site.generic for site in norms.sites.values())
    full = norms.coverage() >= 1.0 and not norms.left_out and fast
    slow = layers == "all" and not full  # (compiled or not: the fallback is slow either way)
    if source == "auto" and several_gradients and (coupled or slow):
        return MicroBatchSource(params)
    if coupled:
        raise ValueError(
            f"per-example gradients are not defined for this model: {', '.join(coupled[:3])} "
            "(BatchNorm in train mode) mixes the examples of a batch. Measure between "
            "micro-batches instead: set Trainer(accumulate_grad_batches>=2) or train on 2+ "
            "devices (DDP); the default source='auto' then uses them"
        )
    if not norms.sites and layers == "all":  # every parameter shared where no rule can sum it
        left = ", ".join(f"{k} ({v})" for k, v in sorted(norms.left_out.items())[:5])
        raise ValueError(
            f"per-example norms can cover none of the parameters (left out: {left}), and each "
            "step has only one gradient. Set Trainer(accumulate_grad_batches>=2) or train on "
            "2+ devices (DDP) to measure between micro-batches"
        )
    if not norms.sites:
        odd = unrecognised_norm_layers(model)
        raise ValueError(
            "layers='norm' found no normalization layer with a per-example rule "
            "(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm and their subclasses)"
            + (f"; not recognised: {', '.join(odd[:5])}" if odd else "")
            + ". Use layers='all', or register a rule with lightning_gns.norms.register_norm"
        )
    return PerExampleSource(norms, per_layer, left_out)
