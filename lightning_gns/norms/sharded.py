"""Sharded data parallelism (FSDP1 and FSDP2): where the micro-batch and big-batch norms live.

* :func:`sharding_of` / :func:`refusal`: the layout of a wrapped model, and what is not
  supported (CPU offload, DeepSpeed; tensor parallelism in your own loop), with what to do
  instead. Hybrid sharding is supported (FSDP1 ``HYBRID_SHARD``, FSDP2 on a 2-D replicate ×
  shard mesh), and so are tensor and 2-D parallelism under the callback
  (:mod:`lightning_gns.norms.tensor_parallel`).
* :class:`UnshardedGradNorms`: each micro-batch's rank-local gradient where it is still whole:
  FSDP1's ``FlatParameter`` s (a hook fires before FSDP's reduce-scatter; Lightning
  accumulates FSDP1 under ``no_sync``), FSDP2's unsharded parameters (created at the first
  all-gather and reused; hooked from a forward pre-hook that runs after FSDP's own).
* :func:`big_part_for`: this process's share of |G_big|² from the sharded ``.grad`` (FSDP1
  padding excluded, replicas counted once), summed over processes by the logging step's one
  reduction (:mod:`lightning_gns.tracker`). Under hybrid sharding each process's squared shard
  is divided by the number of replicas R: the sum over all processes is then the sum over one
  shard group (each element once), averaged over the R identical replica groups, so one
  world all-reduce does what a reduction over the shard group and then across replicas would.

Units are DDP's: ``.grad`` is the mean over processes of each process's mean over
micro-batches (FSDP1's pre/post divide factors multiply to the world size; FSDP2 reduces with
AVG). Findings and their tests: ``docs/sharded.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_gns._compat import (
    fsdp1_flat_param,
    fsdp1_sharded,
    fsdp2_param_group,
    fsdp2_unsharded,
    shard_padding,
)
from lightning_gns.norms.micro_batch import MicroBatchNorms, squared_norm

Sharding = Literal["none", "fsdp1", "fsdp2"]


def fsdp1_units(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def fsdp2_units(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def sharding_of(model: nn.Module) -> Sharding:
    """``fsdp1`` (``FullyShardedDataParallel`` inside), ``fsdp2`` (``fully_shard`` applied),
    or ``none`` (one device, DDP)."""
    if fsdp1_units(model):
        return "fsdp1"
    if fsdp2_units(model):
        return "fsdp2"
    return "none"


def flat_params(model: nn.Module) -> list[nn.Parameter]:
    """FSDP1: every unit's trainable ``FlatParameter`` (the tensors FSDP unshards in place)."""
    out: dict[int, nn.Parameter] = {}
    for unit in fsdp1_units(model):
        flat = fsdp1_flat_param(unit)
        if flat is not None and flat.requires_grad:
            out.setdefault(id(flat), flat)
    return list(out.values())


def refusal(strategy: object, model: nn.Module, tensor_parallel: bool = False) -> str | None:
    """Why the callback cannot measure this set-up, with what to do instead; None if it can.
    ``tensor_parallel``: the caller measures tensor and 2-D parallelism
    (:mod:`lightning_gns.norms.tensor_parallel`; the callback does, the meter not yet)."""
    if "DeepSpeed" in type(strategy).__name__:
        return (
            "DeepSpeed is not supported (its ZeRO stages keep gradients in their own buffers, "
            "and a 2-process CPU run hung): for sharded training use FSDPStrategy, or "
            "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)"
        )
    tp = getattr(strategy, "_tensor_parallel_size", 1)
    tp = tp if isinstance(tp, int) else 1
    if tp > 1 and not tensor_parallel:
        return (
            f"tensor parallelism (tensor_parallel_size={tp}) is measured by the "
            "GradientNoiseScale callback (Trainer), not in your own loop yet: use "
            "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with "
            "fully_shard in configure_model, or the Trainer"
        )
    kind = sharding_of(model)
    if kind == "fsdp1":
        for unit in fsdp1_units(model):
            if getattr(getattr(unit, "cpu_offload", None), "offload_params", False):
                return OFFLOAD
    elif kind == "fsdp2":
        for unit in fsdp2_units(model):
            group = fsdp2_param_group(unit)
            policy = getattr(group, "offload_policy", None)
            if policy is not None and type(policy).__name__ == "CPUOffloadPolicy":
                return OFFLOAD
            if getattr(group, "gradient_divide_factor", None) is not None:
                return (
                    "a custom gradient divide factor (set_gradient_divide_factor) changes the "
                    "units of .grad: keep FSDP's default (the mean over processes)"
                )
        for p in model.parameters():
            if _is_dtensor(p) and not data_parallel_only(p) and tp == 1:
                return MIXED_MESH
    elif tp > 1:
        dp = getattr(strategy, "_data_parallel_size", 1)
        if isinstance(dp, int) and dp > 1:
            return (
                f"data_parallel_size={dp} with tensor parallelism and no fully_shard: the "
                "data-parallel ranks' gradients are not averaged. Apply fully_shard over the "
                "data-parallel mesh in configure_model"
            )
    elif any(_is_dtensor(p) for p in model.parameters()):
        return (
            "DTensor parameters without fully_shard (tensor parallelism through "
            "parallelize_module) are not supported: each example's gradient is split across "
            "processes. Train data parallel (DDP), or shard with fully_shard on a 1-D or "
            "(replicate, shard) mesh"
        )
    return None


MIXED_MESH = (
    "a parameter is sharded on a mesh dimension that is not data parallel (tensor or "
    "sequence parallelism composed with fully_shard) and is not supported: apply fully_shard "
    "on a 1-D data-parallel mesh, or on a 2-D (replicate, shard) mesh for hybrid sharding, "
    "with no parallelize_module"
)
OFFLOAD = (
    "CPU offload is not supported (the sharded gradients would live on the host, untested): "
    "train without offloading parameters"
)


class UnshardedGradNorms(MicroBatchNorms):
    """:class:`~lightning_gns.norms.micro_batch.MicroBatchNorms` on the tensors where each
    micro-batch's gradient is still whole on this process (see the module docstring); the
    squares accumulate in float32 whatever the gradient's dtype."""

    def __init__(self, model: nn.Module, kind: Sharding) -> None:
        super().__init__(flat_params(model) if kind == "fsdp1" else [])
        self.model, self.kind = model, kind
        self._hooked: dict[int, Tensor] = {}  # id -> tensor (kept alive: ids stay unique)

    def attach(self) -> None:
        self.detach()
        if self.kind == "fsdp2":
            for unit in fsdp2_units(self.model):
                self._handles.append(unit.register_forward_pre_hook(self._find_unsharded))
        else:
            for p in self.params:
                self._hook_tensor(p)

    def detach(self) -> None:
        super().detach()
        self._hooked = {}

    def _hook_tensor(self, t: Tensor) -> None:
        if t.requires_grad and id(t) not in self._hooked:
            self._hooked[id(t)] = t
            self._handles.append(t.register_hook(self._hook))

    def _find_unsharded(self, unit: nn.Module, args: tuple) -> None:
        """Inside an FSDP2 unit's forward its parameters are the unsharded tensors (checked on
        every forward: a tensor FSDP were to create anew is hooked too)."""
        live = fsdp2_unsharded(unit)
        if live is None:  # internals changed: the unit's parameters, unsharded by now
            live = [p for p in unit.parameters(recurse=False) if not _is_dtensor(p)]
        for t in live:
            self._hook_tensor(t)


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "device_mesh")


is_dtensor = _is_dtensor


def data_parallel_only(p: Tensor) -> bool:
    """Whether a DTensor parameter is laid out by FSDP2 alone: ``(Shard,)`` on a 1-D mesh, or
    ``(Replicate, …, Shard)`` on a hybrid mesh (replicated over the outer dimensions, sharded
    over the last). A tensor-parallel placement is a shard on an outer dimension, or a
    replicate on the last."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(getattr(p, "placements", ()))
    if not placements:
        return False
    *outer, last = placements
    return all(isinstance(q, Replicate) for q in outer) and type(last) is Shard


def fsdp1_shard_size(unit: nn.Module) -> int | None:
    """The processes an FSDP1 unit shards its flat parameter over (its ``process_group``: all
    of them, or one shard group under hybrid sharding); None under ``NO_SHARD`` (each process
    holds the whole gradient)."""
    if not fsdp1_sharded(unit):
        return None
    group = getattr(unit, "process_group", None)
    if group is None or not torch.distributed.is_initialized():
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return torch.distributed.get_world_size(group)


def replicas_of(shard: int | None, world_size: int) -> int:
    """How many processes hold each element of a local gradient shard: world / shard size (1
    when sharded over all, R replica groups under hybrid sharding), every process unsharded."""
    return world_size if shard is None else max(1, world_size // max(shard, 1))


def local_sq(grad: Tensor | None, replicas: int = 1) -> Tensor | None:
    """This process's share of |grad|² (at least float32), such that the sum over processes
    is |grad|²: a DTensor's local shard divided by the processes holding each element (its
    ``Replicate`` mesh dims); a plain tensor held whole by ``replicas`` processes, / replicas.
    Never DTensor math on ``.grad``: that would be an all-reduce per parameter."""
    if grad is None:
        return None
    if _is_dtensor(grad):
        from torch.distributed.tensor import Replicate

        dt: Any = grad
        copies = 1
        for size, placement in zip(dt.device_mesh.shape, dt.placements, strict=True):
            if isinstance(placement, Replicate):
                copies *= size
        return _sq(dt.to_local()) / copies
    return _sq(grad) / replicas


def _sq(t: Tensor) -> Tensor:
    dtype = torch.promote_types(t.dtype, torch.float32)
    return torch.linalg.vector_norm(t, dtype=dtype).square()


def _shard_grad(flat: nn.Parameter) -> Tensor | None:
    grad, pad = flat.grad, shard_padding(flat)
    if grad is None:
        return None
    return grad[: grad.numel() - pad] if pad else grad


BigPart = Callable[[Iterable[nn.Parameter], int], "Tensor | None"]


def big_part_for(model: nn.Module, kind: Sharding) -> BigPart:
    """``big(params, world_size)``: this process's share of Σ_p |p.grad|² over ``params``."""
    if kind == "none":
        return replicated_big
    units = fsdp1_units(model) if kind == "fsdp1" else []
    shard = {  # FSDP1: each flat parameter's shard size, read once (no call per step)
        id(fsdp1_flat_param(u)): fsdp1_shard_size(u)
        for u in units
        if fsdp1_flat_param(u) is not None
    }

    def big(params: Iterable[nn.Parameter], world_size: int) -> Tensor | None:
        parts = [
            local_sq(_shard_grad(p), replicas_of(shard[id(p)], world_size))
            if id(p) in shard
            else local_sq(p.grad)  # FSDP2: a DTensor knows its replicas
            for p in params
            if p.requires_grad
        ]
        found = [t for t in parts if t is not None]
        return torch.stack(found).sum() if found else None

    return big


def replicated_big(params: Iterable[nn.Parameter], world_size: int) -> Tensor | None:
    """One device or DDP: every process holds all of ``.grad``; its share is 1/world."""
    total = squared_norm([p.grad for p in params])
    if total is None or world_size == 1:  # / 1 is exact: one op less
        return total
    return total / world_size
