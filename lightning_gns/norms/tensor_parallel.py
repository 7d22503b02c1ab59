"""Tensor parallelism (``parallelize_module``) and 2-D data × tensor parallelism.

The processes of one tensor-parallel (TP) group see the same examples, and each holds a part
of every TP-sharded weight. Per process, and so summed over the group by the logging step's one
all-reduce (:mod:`lightning_gns.tracker`):

* **A sharded weight** (``ColwiseParallel``: ``Shard(0)`` weight and bias, the output features;
  ``RowwiseParallel``: ``Shard(1)`` weight, the input features): this process's part of each
  example's gradient is g_jᵀ a_j over its own output features, or over all outputs and its own
  input features. |g_j|² = Σ_r |g_j,r|², so each process records its shard's squared norm.
  The hooks run before the style's own output hook: a row-wise output's gradient is then the
  whole one (``Replicate``), whichever ``output_layouts`` the plan gives (``Shard(1)`` under
  sequence parallelism).
* **A replicated parameter whose per-example gradient is whole on every process** (a
  row-wise bias: its gradient is Σ_t g_t of the whole output gradient; parameters outside the
  plan): counted once, with weight 1/TP on each process.
* **A replicated parameter whose gradient is a sum of partial products across the group**
  (``SequenceParallel`` norms: each process sees a sequence shard, and ``.grad`` is
  ``Partial``): its per-example partials would have to be summed across the group before
  squaring, a collective per micro-batch. It is left out, with that reason, in both sources.
* **Counts:** each process of a TP group counts 1/TP of its examples or micro-batches
  (:func:`share`), so the pooled counts are per data-parallel rank.
* **The big batch:** a process's share of |G|² is |its local shard of .grad|² divided by the
  processes holding each element: world / Π (mesh sizes of its ``Shard`` dims).

Only ``nn.Linear`` layers are measured when they are TP-sharded; other sharded layers (a
vocabulary-sharded embedding, layers on the torch.func fallback) are left out with the reason.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gns._compat import fsdp2_param_group
from lightning_gns.norms.micro_batch import MicroBatchNorms
from lightning_gns.norms.rules import NormRule
from lightning_gns.norms.sharded import BigPart, UnshardedGradNorms, fsdp2_units, is_dtensor

TP_DIM = "tensor_parallel"  # the name of Lightning's tensor-parallel mesh dimension
SEQUENCE_PARALLEL = (
    "replicated over the tensor-parallel group by the plan (SequenceParallel, or NoParallel: "
    "the placement does not tell them apart): under SequenceParallel each process sees a "
    "sequence shard, so its gradient is a partial sum across the group (.grad is Partial); "
    "summing the per-example partials before squaring would take a collective per micro-batch"
)
NO_TP_RULE = (
    "sharded over the tensor-parallel group in a layout with no per-example rule here (only "
    "nn.Linear, column- or row-wise, is measured under tensor parallelism)"
)
NO_TP_FALLBACK = (
    "has no per-example rule, and the torch.func fallback is not run under tensor parallelism"
)
NO_TP_TIED = "has a weight tied to another module, not measured under tensor parallelism"
_FIRST: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules whose hooks run first


@dataclass(frozen=True)
class Layout:
    """``tp`` processes per tensor-parallel group (mesh dimension ``dim``) in ``world``."""

    tp: int
    world: int
    dim: str = TP_DIM

    @property
    def data_parallel(self) -> int:
        return max(1, self.world // self.tp)


def tensor_parallel_size(strategy: object) -> int:
    """The strategy's tensor-parallel size (1: none; Lightning's ``ModelParallelStrategy``)."""
    tp = getattr(strategy, "_tensor_parallel_size", 1)
    return tp if isinstance(tp, int) and tp > 1 else 1


def layout_of(strategy: object, world: int) -> Layout | None:
    """The strategy's tensor-parallel layout, or None without tensor parallelism."""
    tp = tensor_parallel_size(strategy)
    if tp == 1:
        return None
    mesh = getattr(strategy, "_device_mesh", None)
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    return Layout(tp, world, names[-1] if names else TP_DIM)


def data_parallel_size(strategy: object, world: int) -> int:
    """The processes whose gradients ``.grad`` averages: world / the tensor-parallel size."""
    return max(1, world // tensor_parallel_size(strategy))


def share(layout: Layout | None) -> float:
    """The part of a data-parallel rank's small batches each of its processes counts."""
    return 1.0 if layout is None else 1.0 / layout.tp


def tp_placement(p: Tensor, dim: str) -> Any:
    """``p``'s placement on the tensor-parallel mesh dimension; None: not distributed there
    (a plain tensor, or a DTensor on the data-parallel mesh alone)."""
    if not is_dtensor(p):
        return None
    names = tuple(getattr(p.device_mesh, "mesh_dim_names", None) or ())  # type: ignore[attr-defined]
    return p.placements[names.index(dim)] if dim in names else None  # type: ignore[attr-defined]


def _shard_dim(placement: Any) -> int | None:
    from torch.distributed.tensor import Shard

    return placement.dim if isinstance(placement, Shard) else None


def weights_for(
    module: nn.Module, params: dict[str, nn.Parameter], layout: Layout
) -> dict[str, float] | str:
    """Each parameter's weight in this process's per-example squared norm (1: its own shard;
    1/TP: whole on every process), or why the module cannot be measured under TP."""
    placements = {attr: tp_placement(p, layout.dim) for attr, p in params.items()}
    if all(q is None for q in placements.values()):
        return {attr: 1.0 / layout.tp for attr in params}  # outside the plan: replicated
    if isinstance(module, nn.Linear) and set(params) <= {"weight", "bias"}:
        weight = _shard_dim(placements.get("weight"))
        bias = placements.get("bias")
        if weight == 0 and (bias is None or _shard_dim(bias) == 0):  # column-wise
            return dict.fromkeys(params, 1.0)
        if weight == 1 and (bias is None or bias.is_replicate()):  # row-wise
            return {attr: 1.0 if attr == "weight" else 1.0 / layout.tp for attr in params}
    if any(q is not None and q.is_replicate() for q in placements.values()):
        return SEQUENCE_PARALLEL
    return NO_TP_RULE


def local(t: Tensor) -> Tensor:
    """A DTensor's local tensor (a plain tensor as it is)."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def hooks_first(module: nn.Module) -> bool:
    """Whether the per-example hooks of ``module`` run before its other forward hooks (a
    tensor-parallel style's output hook redistributes and takes the local tensor)."""
    return module in _FIRST


def weighted_rule(rule: NormRule, weights: dict[str, float]) -> NormRule:
    """``rule`` on the local tensors of a DTensor input and output gradient, each parameter's
    norms times its weight."""

    def tp_rule(module: Any, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        out = rule(module, local(a), local(g))
        return {k: v if weights.get(k, 1.0) == 1.0 else v * weights[k] for k, v in out.items()}

    return tp_rule


def adapt_per_example(norms: Any, layout: Layout) -> None:
    """Set up a :class:`~lightning_gns.norms.per_example.PerExampleNorms` for TP (before it is
    attached): weighted rules on local tensors, hooks first, the live structural check, no
    simultaneous route; the modules it cannot measure left out with the reason."""
    norms.sharded, norms.simultaneous = True, False
    norms.from_batch = _dtensor_origin(norms.from_batch)
    for name, site in list(norms.sites.items()):
        weights = weights_for(site.module, site.params, layout)
        if isinstance(weights, dict) and site.generic:
            weights = NO_TP_FALLBACK
        elif isinstance(weights, dict) and site.shared:
            weights = NO_TP_TIED
        if isinstance(weights, str):
            norms.drop(name, weights)
            continue
        assert site.rule is not None
        site.rule = weighted_rule(site.rule, weights)
        _FIRST.add(site.module)


def _dtensor_origin(from_batch: Any) -> Any:
    """The structural check's provenance test with DTensor inputs: a style's input hook makes
    them outside any torch function the check follows (``from_local``, a redistribution), so
    a DTensor whose local tensor is not marked is unknown (None: shapes decide), not False."""

    def origin(x: object) -> bool | None:
        if isinstance(x, Tensor) and is_dtensor(x):
            return True if from_batch(local(x)) else None
        return from_batch(x)

    return origin


def partial_params(model: nn.Module, layout: Layout) -> dict[str, str]:
    """The modules whose gradients are partial sums across the TP group (left out by the
    micro-batch source too), with the reason; by module name."""
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        own = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
        if own and weights_for(module, own, layout) == SEQUENCE_PARALLEL:
            out[name] = SEQUENCE_PARALLEL
    return out


def micro_share(t: Tensor, tp: int, dim: str) -> float:
    """What a micro-batch gradient's local |g|² counts for on this process (read once per
    tensor): 1 for its shard over the TP group, 1/TP where the gradient is whole on every
    process of the group, NaN where it is a ``Partial`` sum (cannot be squared per process:
    the step is skipped, never wrong)."""
    placement = tp_placement(t, dim)
    if placement is not None and placement.is_partial():
        return float("nan")
    return 1.0 if _shard_dim(placement) is not None else 1.0 / tp


def _local_sq(grad: Tensor, factor: float) -> Tensor:
    g = local(grad.detach())
    sq = torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).square()
    return sq if factor == 1.0 else sq * factor


class TensorParallelGradNorms(MicroBatchNorms):
    """Micro-batch norms of (DTensor) parameters under TP alone: each gradient's local |g|²
    times its :func:`micro_share`."""

    def __init__(self, params: list[nn.Parameter], layout: Layout) -> None:
        super().__init__(params)
        self.layout = layout

    def _hook_for(self, i: int, p: nn.Parameter) -> Any:
        factor = micro_share(p, self.layout.tp, self.layout.dim)
        return lambda grad: self._parts.append(_local_sq(grad, factor))


class TensorParallelUnshardedNorms(UnshardedGradNorms):
    """Micro-batch norms of FSDP2's unsharded (TP DTensor) parameters under 2-D parallelism:
    local |g|² times :func:`micro_share`; the ``skip`` parameters (partial sums) not hooked."""

    def __init__(self, model: nn.Module, layout: Layout, skip: set[int]) -> None:
        super().__init__(model, "fsdp2")
        self.layout, self.skip = layout, skip

    def _find_unsharded(self, unit: nn.Module, args: tuple) -> None:
        params = getattr(fsdp2_param_group(unit), "fsdp_params", None)
        if params is None:  # internals changed: nothing is measured (the step is skipped)
            return
        for fp in params:
            if id(getattr(fp, "sharded_param", None)) not in self.skip:
                live = getattr(fp, "_unsharded_param", None)
                if isinstance(live, Tensor):
                    self._hook_tensor(live)

    def _hook_tensor(self, t: Tensor) -> None:
        if t.requires_grad and id(t) not in self._hooked:
            self._hooked[id(t)] = t
            factor = micro_share(t, self.layout.tp, self.layout.dim)
            hook = lambda grad: self._parts.append(_local_sq(grad, factor))  # noqa: E731
            self._handles.append(t.register_hook(hook))


def micro_batch_norms(
    model: nn.Module, params: list[nn.Parameter], layout: Layout
) -> tuple[MicroBatchNorms, list[nn.Parameter], dict[str, str]]:
    """(norms, covered parameters, left out) of the micro-batch source under TP."""
    left = partial_params(model, layout)
    skip = {
        id(p)
        for name in left
        for p in model.get_submodule(name).parameters(recurse=False)
        if p.requires_grad
    }
    covered = [p for p in params if id(p) not in skip]
    if fsdp2_units(model):
        return TensorParallelUnshardedNorms(model, layout, skip), covered, left
    return TensorParallelGradNorms(covered, layout), covered, left


def big_share(layout: Layout) -> BigPart:
    """``big(params, world_size)``: this process's share of Σ_p |p.grad|²: |local shard|² /
    (world / Π sizes of its ``Shard`` mesh dims); a plain ``.grad`` is whole on every process
    (/ world). A ``Partial`` gradient: NaN (such parameters are left out beforehand)."""
    world = layout.world
    factors: dict[int, float] = {}  # id(p) -> its share's factor (placements stay)

    def big(params: Any, world_size: int) -> Tensor | None:
        parts = []
        for p in params:
            if p.requires_grad and p.grad is not None:
                factor = factors.get(id(p))
                if factor is None:
                    factor = factors[id(p)] = big_factor(p.grad, world)
                parts.append(_local_sq(p.grad, factor))
        return torch.stack(parts).sum() if parts else None

    return big


def big_factor(grad: Tensor, world: int) -> float:
    """1 / the processes holding each element of ``grad``'s local tensor: world / Π sizes of
    its shard mesh dims (FSDP × TP's ``_StridedShard`` is a shard); a plain tensor is whole
    on every process. NaN for a ``Partial`` gradient."""
    if not is_dtensor(grad):
        return 1.0 / world
    sharded, partial = 1, False
    dt: Any = grad
    for size, placement in zip(dt.device_mesh.shape, dt.placements, strict=True):
        partial = partial or placement.is_partial()
        sharded *= 1 if placement.is_replicate() or placement.is_partial() else size
    return float("nan") if partial else sharded / world
