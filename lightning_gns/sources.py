"""Where each optimizer step's small- and big-batch squared norms come from.

A source sees every micro-batch (``start_micro_batch`` before its forward, ``end_micro_batch``
after its backward) and hands over one :class:`~lightning_gns.records.StepNorms` per optimizer
step (``end_step``, before the optimizer changes ``.grad``), in the units of the mean
per-example gradient. Every scale factor of the backward is undone here and only here
(:class:`~lightning_gns.records.Units`):

* Lightning divides the loss by ``accumulate`` before each backward (×k on gradients);
* a mean-reduced loss gives example j the share g_j/b of its micro-batch's gradient (×b);
* a sum-reduced loss makes a micro-batch's gradient b × its mean gradient (×1/b);
* the AMP loss scale s multiplies every backward-time gradient (×1/s², on squared norms);
* DDP averages rank gradients into ``.grad``: each process holds all of |G_big|² and records
  the share 1/world (the tracker sums the shares of all processes).

Small and big norms always cover exactly the same parameters (the source's ``params``).
:func:`~lightning_gns.choice.choose_source` picks a source for a model and set-up.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gns.norms import MicroBatchNorms, PerExampleNorms, squared_norm
from lightning_gns.norms.micro_batch import WeightedMicroBatchNorms
from lightning_gns.norms.preconditioner import inverse_preconditioner
from lightning_gns.records import MODEL, PRECONDITIONED, Reduction, SkipStep, StepNorms, Units


def big_scale(units: Units, m: int, n: int) -> float:
    """``.grad`` is the mean of m micro-batch gradients times m/k (sum-reduced: the sum over n
    examples times 1/k); DDP has already averaged the ranks. Squared: this factor."""
    k = units.accumulate
    return (k / n) ** 2 if units.reduction == "sum" else (k / m) ** 2


def big_parts(units: Units, sizes: list[int]) -> tuple[float, float]:
    """(M, Σ 1/b_j) of the big gradient's equally weighted parts on this process: micro-batch
    means (mean reduction) or examples (sum reduction); B_big = M²/Σ(1/b_j) once pooled."""
    if units.reduction == "sum":
        n = float(sum(sizes))
        return n, n
    return float(len(sizes)), sum(1.0 / b for b in sizes)


def big_sq(params: list[nn.Parameter], units: Units, m: int, n: int) -> Tensor:
    """This process's share of |G_big|² of the optimizer's ``.grad`` over ``params``."""
    big = squared_norm(p.grad for p in params)
    if big is None:
        raise SkipStep("no covered parameter has a gradient this step")
    return big * (big_scale(units, m, n) / units.world_size)


class MicroBatchSource:
    """Small batches are micro-batches (gradient accumulation) and ranks (DDP)."""

    name = "micro_batch"
    coverage = 1.0  # every trainable parameter

    def __init__(self, params: list[nn.Parameter], norms: MicroBatchNorms | None = None) -> None:
        self.params = params
        self.columns = [MODEL]
        self.norms = norms if norms is not None else MicroBatchNorms(params)
        self.sizes: list[int] = []
        self.left_out: dict[str, str] = {}

    def attach(self) -> None:
        self.norms.attach()

    def detach(self) -> None:
        self.norms.detach()
        self.sizes = []

    def coverage_note(self, size_note: str | None = None) -> str | None:
        """Micro-batch norms cover every trainable parameter: nothing to say."""
        return None

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
        k = units.accumulate
        small = total * (k * k) * units.inv_loss_scale_sq  # Σ over micro-batches
        big = self._big_sq(units, m, sum(sizes))
        big_m, big_inv = big_parts(units, sizes)
        inv = sum(1.0 / b for b in sizes)
        return StepNorms(small.reshape(1), big.reshape(1), float(m), inv, big_m, big_inv)

    def _big_sq(self, units: Units, m: int, n: int) -> Tensor:
        return big_sq(self.params, units, m, n)


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
            norms.drop(name, reason)
        self.layer_names = list(norms.sites) if per_layer else []
        self.columns = [MODEL, *self.layer_names]
        self.needs_check = left_out is None
        self.several_gradients = False  # steps have several gradients (set by the chooser)
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

    def coverage_note(self, size_note: str | None = None) -> str | None:
        """One line naming what the per-example norms leave out (None: everything covered);
        ``size_note``: what the batch probe found wrong with the batch size, if anything."""
        return coverage_note(self.norms, self.several_gradients, size_note)

    def _reset(self) -> None:
        self.total: Tensor | None = None  # Σ_j |g_j|² in backward units × b² (mean loss)
        self.layers: dict[str, Tensor] = {}
        self.count = 0  # examples measured
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
        if units.world_size * n < 2:
            raise SkipStep(
                "this step has one example: per-example norms need at least 2 examples per "
                "optimizer step (raise the batch size or accumulate gradients)"
            )
        scale = units.accumulate**2 * units.inv_loss_scale_sq  # Σ over examples
        small = [self.total * scale]
        big = [big_sq(self.params, units, m, n)]
        for name in self.layer_names:
            site = self.norms.sites.get(name)
            part = self.layers.get(name)
            grads = squared_norm(p.grad for p in site.params.values()) if site else None
            if part is None or grads is None:
                small.append(torch.full_like(small[0], float("nan")))
                big.append(torch.full_like(big[0], float("nan")))
                continue
            small.append(part * scale)
            big.append(grads * (big_scale(units, m, n) / units.world_size))
        big_m, big_inv = big_parts(units, self.sizes)
        count = float(self.count)
        return StepNorms(torch.stack(small), torch.stack(big), count, count, big_m, big_inv)


def coverage_note(
    norms: PerExampleNorms, several_gradients: bool = False, size_note: str | None = None
) -> str | None:
    """What the per-example norms leave out, in one line (None: everything covered), with the
    fix that fits: the batch size (when the probe found it wrong), micro-batches the run
    already has, or accumulation."""
    if not norms.left_out:
        return None
    names = ", ".join(f"{k or 'the model'} ({v})" for k, v in sorted(norms.left_out.items()))
    if not norms.sites:
        if size_note is not None:
            fix = f"{size_note}: pass GradientNoiseScale(batch_size_fn=lambda batch: ...)"
        elif several_gradients:
            fix = (
                "GradientNoiseScale(source='micro_batch') measures between the micro-batches "
                "(or devices) this run already has"
            )
        else:
            fix = (
                "set Trainer(accumulate_grad_batches>=2) or train on 2+ devices (DDP) to "
                "measure between micro-batches, or register a rule with "
                "lightning_gns.norms.register_norm"
            )
        return (
            f"per-example norms cover none of the trainable parameters (left out: {names}), "
            f"so no step can be measured. To fix: {fix}"
        )
    coverage = norms.coverage()
    if coverage >= 1.0:  # every parameter is still covered through another module
        return (
            f"per-example norms cover all trainable parameters; these modules are not hooked "
            f"themselves, their weights are covered through the modules they are tied to: {names}"
        )
    return (
        f"per-example norms cover {coverage:.1%} of the trainable parameters; left out: "
        f"{names}. The estimate is over the covered ones."
    )


class PreconditionedSource(MicroBatchSource):
    """Micro-batch norms of preconditioned gradients P·g, P = 1/(√v̂ + ε) from ``optimizer``
    (:mod:`lightning_gns.norms.preconditioner`); a step before the optimizer has state is
    skipped silently. Column ``preconditioned``."""

    name = "preconditioned"

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.weighted = WeightedMicroBatchNorms(params)
        super().__init__(params, self.weighted)
        self.columns = [PRECONDITIONED]
        self.optimizer = optimizer
        self.steps = 0  # optimizer steps seen

    def start_micro_batch(self, batch_size: int) -> None:
        if self.weighted.weights is None:  # once per step: the state changes only when stepping
            self.weighted.weights = inverse_preconditioner(self.optimizer, self.params)

    def end_step(self, units: Units) -> StepNorms:
        self.steps += 1
        try:
            if self.weighted.weights is None:
                self.weighted.take()
                self.sizes = []
                raise SkipStep("the optimizer has no second-moment state yet", silent=True)
            return super().end_step(units)
        finally:
            self.weighted.weights = None

    def _big_sq(self, units: Units, m: int, n: int) -> Tensor:
        big = self.weighted.big_sq()
        if big is None:
            raise SkipStep("no covered parameter has a gradient this step")
        return big * (big_scale(units, m, n) / units.world_size)


Source = MicroBatchSource | PerExampleSource
