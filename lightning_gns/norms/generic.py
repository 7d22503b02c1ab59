"""Per-example squared norms for a module without a dedicated rule, from ``torch.func``.

The module's saved inputs (args and kwargs) and the gradients of its outputs are enough: each
example's gradient of the module's *own* parameters is the vector-Jacobian product of that
example's slice of the functional forward, and ``vmap`` runs all examples at once. Squared
norms are taken at once, so no per-example gradient outlives the call. The batch dimension of
each tensor is found by size (dim 1 first for modules with ``batch_first=False``, such as
``nn.LSTM`` and ``nn.MultiheadAttention``); tensors without one are shared by all examples.
The structural check verifies every module covered this way, like every rule. Cost: one
vmapped forward and backward of the module, on top of the training step's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns._compat import tree_flatten, tree_map, tree_unflatten

_replays = 0  # > 0 while a check or the fallback re-runs a module


@contextmanager
def replaying() -> Iterator[None]:
    """Re-running a module (the structural check, the fallback): every per-example hook of
    every instance stays quiet, so two callbacks on one model do not see a second call."""
    global _replays
    _replays += 1
    try:
        yield
    finally:
        _replays -= 1


def is_replaying() -> bool:
    return _replays > 0


def batch_dim(t: Tensor, batch: int, batch_first: bool = True) -> int | None:
    """The dim of ``t`` that holds the examples, or None (shared by all examples)."""
    order = [1, 0] if not batch_first else [0, 1]
    for d in order + list(range(2, t.dim())):
        if d < t.dim() and t.shape[d] == batch:
            return d
    return None


def generic_sq_norms(
    module: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: tuple[tuple, dict],
    outputs: list[Tensor],
    grads: dict[int, Tensor],
    batch: int,
    shared: frozenset[int] = frozenset(),
) -> Tensor:
    """Per-example |∂ℓ_j/∂θ|² over the module's own ``params``, shape (batch,), float32.

    ``outputs`` are the tensor leaves of the module's output and ``grads`` the gradients that
    reached them (by leaf index); leaves without a gradient do not contribute. ``shared``: the
    input leaves (by index) not computed from the batch, given to every example whole.
    """
    batch_first = bool(getattr(module, "batch_first", True))
    inputs = initial_state(module, inputs, batch)
    leaves, spec = tree_flatten(as_param_dtype(inputs, params))
    where = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    tensors = [leaves[i].detach() for i in where]
    in_dims = [
        None if i in shared else batch_dim(t, batch, batch_first)
        for i, t in zip(where, tensors, strict=True)
    ]
    if all(d is None for d in in_dims):
        raise ValueError(f"no input has a batch dimension of size {batch}")
    used = sorted(grads)
    cots = [grads[i].detach() for i in used]
    out_dims = [batch_dim(outputs[i], batch, batch_first) for i in used]
    if any(d is None for d in out_dims):
        raise ValueError(f"an output without a batch dimension of size {batch} got gradient")
    own = {k: p.detach() for k, p in params.items()}

    def example_loss(p: dict[str, Tensor], xs: list[Tensor], gs: list[Tensor]) -> Tensor:
        filled = list(leaves)
        for i, x, d in zip(where, xs, in_dims, strict=True):
            filled[i] = x if d is None else x.unsqueeze(d)
        args, kwargs = tree_unflatten(filled, spec)
        out, _ = tree_flatten(functional_call(module, p, args, kwargs))
        total = torch.zeros((), dtype=torch.float32, device=gs[0].device)
        for i, g, d in zip(used, gs, out_dims, strict=True):
            total = total + (out[i].squeeze(d).float() * g.float()).sum()
        return total

    with warnings.catch_warnings():  # ops without a batching rule run in a loop: slower, exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        per = vmap(grad(example_loss), in_dims=(None, in_dims, out_dims))(own, tensors, cots)
    return sum(v.flatten(1).float().square().sum(1) for v in per.values())


def initial_state(module: nn.Module, inputs: tuple[tuple, dict], batch: int) -> tuple:
    """A recurrent layer called without ``hx`` gets its zero initial state as an input with the
    examples on dim 1: made inside a vmapped forward, it would hold no batch and GRU's and
    RNN's in-place updates of it fail."""
    args, kwargs = inputs
    if not isinstance(module, nn.RNNBase) or kwargs.get("hx") is not None or len(args) != 1:
        return inputs
    x = args[0]
    if not isinstance(x, Tensor) or x.dim() != 3:
        return inputs  # unbatched, or a PackedSequence: as it is
    layers = module.num_layers * (2 if module.bidirectional else 1)
    out = module.proj_size or module.hidden_size
    h = x.new_zeros(layers, batch, out)
    if isinstance(module, nn.LSTM):
        return (x, (h, x.new_zeros(layers, batch, module.hidden_size))), kwargs
    return (x, h), kwargs


def as_param_dtype(inputs: Any, params: Mapping[str, Tensor]) -> Any:
    """Floating inputs in the parameters' dtype: under mixed precision the module ran in an
    autocast region that its re-run after backward is not in."""
    dtype = next(iter(params.values())).dtype
    return tree_map(
        lambda t: t.detach().to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t,
        inputs,
    )


def own_outputs(leaves: list[Any]) -> list[Any]:
    """With two or more outputs that need grad (one may be computed from another: a router's
    scores from its logits), views of them, so that each one's gradient hook sees only the
    gradient from outside the module; otherwise the leaves themselves."""
    if sum(isinstance(t, Tensor) and t.requires_grad for t in leaves) < 2:
        return leaves
    return [t.view_as(t) if isinstance(t, Tensor) and t.requires_grad else t for t in leaves]


def rebuild(output: Any, leaves: list[Any]) -> Any:
    """``output`` with its tensor leaves replaced (same structure)."""
    _, spec = tree_flatten(output)
    return tree_unflatten(leaves, spec)


def leaves_of(output: Any) -> list[Tensor]:
    """Tensor leaves of a module's output, in ``tree_flatten`` order (others as placeholders)."""
    flat, _ = tree_flatten(output)
    return flat
