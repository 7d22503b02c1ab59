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
:func:`~lightning_gns.sources.choose_source` picks a source for a model and set-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_gns.norms import MicroBatchNorms, PerExampleNorms
from lightning_gns.norms.micro_batch import WeightedMicroBatchNorms
from lightning_gns.norms.preconditioner import inverse_preconditioner
from lightning_gns.norms.record import LinearRows, concat, rows_sum
from lightning_gns.norms.sharded import (
    BigPart,
    Sharding,
    UnshardedGradNorms,
    big_part_for,
    flat_params,
    replicated_big,
    sharding_of,
)
from lightning_gns.norms.sites import coupled_modules, unrecognised_norm_layers
from lightning_gns.norms.tensor_parallel import (
    Layout,
    adapt_per_example,
    big_share,
    micro_batch_norms,
)
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


def big_sq(params: list[nn.Parameter], units: Units, m: int, n: int, big: BigPart) -> Tensor:
    """This process's share of |G_big|² of the optimizer's ``.grad`` over ``params``, in
    mean-per-example units (``big``: how the shares are taken,
    :mod:`lightning_gns.norms.sharded`)."""
    part = big(params, units.world_size)
    if part is None:
        raise SkipStep("no covered parameter has a gradient this step")
    scale = big_scale(units, m, n)
    return part if scale == 1.0 else part * scale  # × 1.0 is exact: one op less


def counted(step: StepNorms, share: float) -> StepNorms:
    """A step whose small batches this process counts ``share`` of (tensor parallelism: the
    processes of a group see the same examples, each counts 1/TP)."""
    if share == 1.0:
        return step
    return StepNorms(
        step.small_sum,
        step.big_part,
        step.small_count * share,
        step.small_inv * share,
        step.big_count * share,
        step.big_inv * share,
    )


class MicroBatchSource:
    """Small batches are micro-batches (gradient accumulation) and ranks (DDP)."""

    name = "micro_batch"
    coverage = 1.0  # every trainable parameter
    share = 1.0  # of the small batches this process counts (tensor parallel: 1/TP)

    def __init__(
        self,
        params: list[nn.Parameter],
        norms: MicroBatchNorms | None = None,
        big: BigPart = replicated_big,
    ) -> None:
        self.params, self.big = params, big
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

    def start_micro_batch(self, batch_size: int, batch: Any = None) -> None:
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
        k, inv_sq = units.accumulate, units.inv_loss_scale_sq
        small = total * (k * k)  # Σ over micro-batches
        if not (isinstance(inv_sq, float) and inv_sq == 1.0):  # × 1.0 is exact: skipped
            small = small * inv_sq
        big = self._big_sq(units, m, sum(sizes))
        big_m, big_inv = big_parts(units, sizes)
        inv = sum(1.0 / b for b in sizes)
        step = StepNorms(small.reshape(1), big.reshape(1), float(m), inv, big_m, big_inv)
        return counted(step, self.share)

    def _big_sq(self, units: Units, m: int, n: int) -> Tensor:
        return big_sq(self.params, units, m, n, self.big)


class PerExampleSource:
    """Small batches are single examples (B_small = 1), from per-example module hooks.

    The first micro-batch runs the structural check (its step is skipped silently) unless
    ``left_out`` from an earlier run is given. ``per_layer`` adds one column per module.
    """

    name = "per_example"
    share = 1.0  # of the examples this process counts (tensor parallel: 1/TP)

    def __init__(
        self,
        norms: PerExampleNorms,
        per_layer: bool = False,
        left_out: dict | None = None,
        big: BigPart = replicated_big,
    ) -> None:
        self.norms, self.big = norms, big
        self.hooked = sorted(norms.sites)  # every module hooked, before any is left out
        # only each step's sum is used: row norms, fewer ops per micro-batch (not the first k)
        norms.record.defer_rows = norms.examples_per_batch is None
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

    def covered_mask(self) -> list[float]:
        """1 for each module of :attr:`hooked` covered here, 0 for one left out."""
        return [1.0 if name in self.norms.sites else 0.0 for name in self.hooked]

    def agree(self, totals: list[float], processes: int) -> list[str]:
        """Given every process's :meth:`covered_mask` summed: leave out here the modules that
        another process left out (its first step, the structural check, may call other
        modules than this one's); their names."""
        differ = [n for n, t in zip(self.hooked, totals, strict=True) if 0 < t < processes]
        for name in differ:
            self.norms.drop(name, "left out on another process of this run")
        return differ

    def _reset(self) -> None:
        self.parts: list[Tensor] = []  # each micro-batch's |g_j|² in backward units (B,)
        self.weights: list[float] = []  # and its weight (b² for a mean loss), summed at the step
        self.rows: dict[float, list[LinearRows]] = {}  # plain Linears' row norms, by weight
        self.layers: dict[str, Tensor] = {}
        self.count = 0  # examples measured
        self.sizes: list[int] = []
        self.bad: str | None = None

    def attach(self) -> None:
        self.norms.attach()

    def detach(self) -> None:
        self.norms.detach()
        self._reset()

    def start_micro_batch(self, batch_size: int, batch: Any = None) -> None:
        """Open a micro-batch of ``batch_size`` examples (``batch``: its tensors, for the
        structural check of the first one)."""
        self.norms.start_micro_batch(batch_size)
        if self.needs_check:
            self.needs_check, self._checking = False, True
            self.norms.start_check(batch)

    def end_micro_batch(self, batch_size: int, reduction: Reduction) -> None:
        acc, layers, bad = self.norms.close_micro_batch()
        rows = self.norms.take_rows()
        if self._checking:
            self._checking = False
            self.bad = "structural check step"
            return
        if bad is not None or (acc is None and rows is None):
            self.bad = self.bad or bad or "no per-example norm was recorded"
            return
        # A mean-reduced loss gives example j the share g_j/b of the gradient: undo 1/b.
        w = float(batch_size**2) if reduction == "mean" else 1.0
        if acc is not None:
            self.parts.append(acc)  # summed once per step (fewer ops per micro-batch)
            self.weights.append(w)
        if rows is not None:
            self.rows.setdefault(w, []).append(rows)
        self.count += acc.shape[0] if acc is not None else rows.n  # type: ignore[union-attr]
        self.sizes.append(batch_size)
        for name, v in layers.items():
            lv = v.sum() * w
            self.layers[name] = lv if name not in self.layers else self.layers[name] + lv

    def end_step(self, units: Units) -> StepNorms:
        try:
            return counted(self._step(units), self.share)
        finally:
            self._reset()

    def _step(self, units: Units) -> StepNorms:
        if self.bad is not None:
            raise SkipStep(self.bad, silent=self.bad == "structural check step")
        if not (self.parts or self.rows) or not self.sizes:
            raise SkipStep("no per-example norm was recorded this step")
        m, n = len(self.sizes), sum(self.sizes)
        if units.world_size * n < 2:
            raise SkipStep(
                "this step has one example: per-example norms need at least 2 examples per "
                "optimizer step (raise the batch size or accumulate gradients)"
            )
        scale = units.accumulate**2 * units.inv_loss_scale_sq  # Σ over examples
        total = self._total(scale)
        big_m, big_inv = big_parts(units, self.sizes)
        count = float(self.count)
        if not self.layer_names:  # one column: a view, not a stack (the same values)
            big_all = big_sq(self.params, units, m, n, self.big)
            return StepNorms(total.reshape(1), big_all.reshape(1), count, count, big_m, big_inv)
        small = [total]
        big = [big_sq(self.params, units, m, n, self.big)]
        for name in self.layer_names:
            site = self.norms.sites.get(name)
            part = self.layers.get(name)
            grads = self.big(site.params.values(), units.world_size) if site else None
            if part is None or grads is None:
                small.append(torch.full_like(small[0], float("nan")))
                big.append(torch.full_like(big[0], float("nan")))
                continue
            small.append(part * scale)
            big.append(grads * big_scale(units, m, n))
        return StepNorms(torch.stack(small), torch.stack(big), count, count, big_m, big_inv)

    def _total(self, scale: Tensor | float) -> Tensor:
        """Σ_j |g_j|² × the micro-batches' weights (b² for a mean loss) × ``scale``."""
        terms = [rows_sum(rows) * (w * scale) for w, rows in self.rows.items()]
        if self.parts:
            w = self.weights[0]
            if all(v == w for v in self.weights):  # one batch size: one sum
                terms.append(concat(self.parts).sum() * (w * scale))
            else:
                pairs = zip(self.parts, self.weights, strict=True)
                terms.append(torch.stack([p.sum() * v for p, v in pairs]).sum() * scale)
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


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

    def start_micro_batch(self, batch_size: int, batch: Any = None) -> None:
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
        return big * (big_scale(units, m, n) / units.world_size)  # replicated (DDP) only


Source = MicroBatchSource | PerExampleSource


# Which source measures a model: per-example norms or micro-batches, and why.
SourceName = Literal["auto", "micro_batch", "per_example"]

FSDP1_WHY = "FSDP1 flattens each unit's parameters, so micro-batches measure it"
MICRO_BATCH_HINT = (
    "set Trainer(accumulate_grad_batches>=2) or train on 2+ devices (DDP); the default "
    "source='auto' then measures between micro-batches"
)


@dataclass(frozen=True)
class Choice:
    """The source and, in words, why it was chosen (the end-of-fit summary says it)."""

    source: Source
    why: str


def choose_source(
    model: nn.Module,
    source: SourceName = "auto",
    layers: Literal["all", "norm"] = "all",
    several_gradients: bool = True,
    per_layer: bool = False,
    examples_per_batch: int | None = None,
    left_out: dict[str, str] | None = None,
    wrapped: nn.Module | None = None,
    layout: Layout | None = None,
) -> Choice:
    """The source for this model and set-up, or a ``ValueError`` that says what to do.

    ``auto`` takes per-example norms when dedicated rules cover every trainable parameter, when
    ``layers="norm"``, or when a step has no second gradient (``several_gradients`` False:
    one device, no accumulation); micro-batches otherwise. The rules also run inside a
    ``torch.compile`` graph (:mod:`lightning_gns.norms.compiled`); the torch.func fallback for
    layers without one does not. Per-example norms are refused where they are undefined
    (BatchNorm in train mode mixes the examples of a batch). Under FSDP1 only micro-batches
    are measured (its flat parameters hide the layers' own); under FSDP2 both. ``wrapped``:
    the model as the strategy wraps it (an FSDP1 root unit wraps the LightningModule itself).
    ``layout``: tensor parallelism (:mod:`lightning_gns.norms.tensor_parallel`).
    """
    wrapped = wrapped if wrapped is not None else model
    sharding = sharding_of(wrapped)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters (every requires_grad is False): there is "
            "no gradient to measure; unfreeze the layers you train, or remove the callback"
        )
    if source == "micro_batch" or (sharding == "fsdp1" and source == "auto"):
        if not several_gradients:
            raise ValueError(
                "source='micro_batch' needs two gradients per step to compare: set "
                "Trainer(accumulate_grad_batches>1) or train on several devices (DDP), or use "
                "source='per_example' (the default 'auto' picks it)"
            )
        why = "source='micro_batch' was asked for" if source == "micro_batch" else FSDP1_WHY
        return Choice(micro_batch_source(wrapped, params, sharding, layout), why)
    if sharding == "fsdp1":
        raise ValueError(
            f"per-example norms are not measured under FSDP1 ({FSDP1_WHY}): use "
            "source='micro_batch' (the default 'auto' does), or FSDP2 (ModelParallelStrategy "
            "with fully_shard in configure_model) for per-example norms"
        )
    sharded = sharding != "none"
    norms = PerExampleNorms(model, layers, per_layer, examples_per_batch, sharded=sharded)
    if layout is not None:  # weighted rules on local shards; partial sums left out
        adapt_per_example(norms, layout)
    coupled = coupled_modules(model)
    generic = [site.label for site in norms.sites.values() if site.generic]
    # auto prefers the fast path: per-example norms when dedicated rules cover every parameter
    # (the torch.func fallback costs 2-4x its layer, 50x an LSTM); micro-batches otherwise.
    full = norms.coverage() >= 1.0 and not norms.left_out and not generic
    if source == "auto" and several_gradients and (coupled or (layers == "all" and not full)):
        why = (
            f"{coupled[0]} (BatchNorm in train mode) mixes the examples of a batch"
            if coupled
            else f"no per-example rule for {', '.join(generic[:3]) or 'some layers'}"
        )
        source_ = micro_batch_source(wrapped, params, sharding, layout)
        return Choice(source_, f"auto: {why}; measured between micro-batches")
    _refuse_per_example(model, norms, coupled, layers, several_gradients)
    if source == "per_example":
        why = "source='per_example' was asked for"
    elif layers == "norm":
        why = "auto: layers='norm' measures the normalization layers per example"
    elif full:
        why = "auto: per-example rules cover every trainable parameter"
    else:
        why = "auto: one gradient per step (one device, no accumulation), so per example"
    big = big_share(layout) if layout is not None else big_part_for(wrapped, sharding)
    chosen = PerExampleSource(norms, per_layer, left_out, big)
    chosen.several_gradients = several_gradients
    chosen.share = 1.0 / layout.tp if layout is not None else 1.0
    return Choice(chosen, why)


def micro_batch_source(
    model: nn.Module, params: list[nn.Parameter], sharding: Sharding, layout: Layout | None = None
) -> MicroBatchSource:
    """Micro-batch norms where each micro-batch's gradient is whole on this process (or, under
    tensor parallelism, its shards are: :mod:`lightning_gns.norms.tensor_parallel`)."""
    if layout is not None:
        tp_norms, covered, left = micro_batch_norms(model, params, layout)
        source = MicroBatchSource(covered, tp_norms, big_share(layout))
        total = sum(p.numel() for p in params)
        source.coverage = sum(p.numel() for p in covered) / total if total else 0.0
        source.left_out, source.share = left, 1.0 / layout.tp
        return source
    if sharding == "none":
        return MicroBatchSource(params)
    covered = flat_params(model) if sharding == "fsdp1" else params
    norms = UnshardedGradNorms(model, sharding)
    return MicroBatchSource(covered, norms, big_part_for(model, sharding))


def _refuse_per_example(
    model: nn.Module, norms: PerExampleNorms, coupled: list[str], layers: str, several: bool
) -> None:
    if coupled:
        hint = (  # the run already has micro-batches (or devices) to measure between
            "GradientNoiseScale(source='micro_batch'), or the default source='auto'"
            if several
            else MICRO_BATCH_HINT
        )
        raise ValueError(
            f"per-example gradients are not defined for this model: {', '.join(coupled[:3])} "
            f"(BatchNorm in train mode) mixes the examples of a batch. Measure between "
            f"micro-batches instead: {hint}"
        )
    if not norms.sites and layers == "all":  # every parameter shared where no rule can sum it
        left = ", ".join(f"{k} ({v})" for k, v in sorted(norms.left_out.items())[:5])
        raise ValueError(
            f"per-example norms can cover none of the parameters (left out: {left}), and each "
            f"step has only one gradient: {MICRO_BATCH_HINT}"
        )
    if not norms.sites:
        odd = unrecognised_norm_layers(model)
        raise ValueError(
            "layers='norm' found no normalization layer with a per-example rule "
            "(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm and their subclasses)"
            + (f"; not recognised: {', '.join(odd[:5])}" if odd else "")
            + ". Use layers='all', or register a rule with lightning_gns.norms.register_norm"
        )
    bare = [site.label for site in norms.sites.values() if site.generic and not site.name]
    if bare and len(norms.sites) == 1:
        raise ValueError(
            f"the model's only parameters are its own ({bare[0]}: no layer holds them), so "
            "there is no layer whose per-example gradient a rule or torch.func can compute, and "
            f"each step has only one gradient: {MICRO_BATCH_HINT}; or put the parameters in a "
            "module (e.g. nn.Linear) that the forward calls"
        )
