"""Which example each row of a tensor of flattened tokens belongs to, and per-example norms
of modules called on such tensors.

A sparse mixture-of-experts block flattens its input (B, T, d) to (B·T, d) tokens before the
router and the experts, so their inputs have no batch dimension. The token -> example map is
read from where the tensor came from, never from its size alone:

* :func:`flattened_from` — a (B·T, ...) tensor that is a row-major reshape of a (B, ...) tensor
  (a view of it, or autograd's view nodes say so): row r belongs to example r // T.
* :func:`gathered_rows` — a (n, ...) tensor gathered from such a flatten, ``src[idx]`` or
  ``index_select`` (each expert of a ``ModuleList`` is called on ``hidden[idx]``): autograd's
  index node holds ``idx``, so row r is token ``idx[r]``.

With the map, a token-wise layer's rule applies to the rows viewed (flatten) or scattered
(gather; zeros where a token did not go, which add nothing) as (B, T, ...) examples
(:func:`to_examples`), and a module without a rule gets ``torch.func`` per example on each
example's (T, ...) slice (:func:`token_generic_sq_norms`; routers treat tokens independently,
which :func:`slices_agree` verifies once).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns._compat import saved_on_node, tree_flatten, tree_unflatten, view_base
from lightning_gns.host_sync import allowed
from lightning_gns.norms.generic import as_param_dtype

# autograd nodes that reshape without reordering elements (row-major order is kept)
_RESHAPES = ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "AliasBackward0")
_UNSQUEEZES = ("UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2")


@contextmanager
def reading_host_tensor(t: Tensor) -> Iterator[None]:
    """A deliberate read of ``t``'s values (a group size): free for a tensor on the CPU (no
    device to wait for), so declared to :mod:`lightning_gns.host_sync` as allowed there; a read of a
    device tensor stays recorded by the host-sync check (callers avoid them)."""
    if t.device.type != "cpu":
        yield
        return
    with allowed():
        yield


def _sizes(node: Any) -> list[int] | None:
    sizes = saved_on_node(node, "self_sym_sizes")
    return None if sizes is None else [int(s) for s in sizes]


# --------------------------------------------------------------------------------------------
# token -> example maps


def _tokens_per_example(node: Any, numel: int, row: int, batch: int) -> int | None:
    """T if the tensor behind ``node`` (``numel`` elements, rows of ``row``) is a row-major
    reshape of a (batch, ...) tensor whose examples hold whole rows; autograd's view chain."""
    for _ in range(16):
        name = type(node).__name__
        if name in _RESHAPES:
            sizes = _sizes(node) or []
            per = numel // batch
            if sizes and sizes[0] == batch and numel % batch == 0 and per % row == 0:
                return per // row
        elif name not in _UNSQUEEZES:
            return None
        node = node.next_functions[0][0] if node.next_functions else None
    return None


def flattened_from(x: Tensor, batch: int) -> int | None:
    """T when ``x`` (B·T, ...) is a row-major reshape of a (B, ...) tensor (its view, or
    autograd's view nodes say so); None otherwise (also when dim 0 is the batch itself)."""
    if x.dim() == 0 or x.shape[0] == batch or x.shape[0] % batch:
        return None
    t = x.shape[0] // batch
    base = view_base(x)
    if (
        base is not None
        and base.dim() > 0
        and base.shape[0] == batch
        and base.numel() == x.numel()
        and base.is_contiguous()
        and x.is_contiguous()
        and base.data_ptr() == x.data_ptr()
    ):
        return t
    if x.grad_fn is not None:
        row = x[0].numel() if x.shape[0] else 0
        if row and _tokens_per_example(x.grad_fn, x.numel(), row, batch) == t:
            return t
    return None


def gathered_rows(x: Tensor, batch: int) -> tuple[Tensor, int] | None:
    """(token index of each row (n,), T) when ``x`` = ``src[idx]`` (or ``index_select``, up to
    reshapes) with ``src`` a (B·T, ...) flatten of a (B, T, ...) tensor; read off autograd's
    graph (``x`` must require grad). None otherwise."""
    node, n = x.grad_fn, x.shape[0] if x.dim() else -1
    for _ in range(8):
        if node is None or type(node).__name__ not in _RESHAPES:
            break
        node = node.next_functions[0][0]
    if node is None or n < 0:
        return None
    name = type(node).__name__
    sizes = _sizes(node)
    if sizes is None:
        return None
    if name == "IndexBackward0":
        indices = saved_on_node(node, "indices") or []
        given = [(i, ix) for i, ix in enumerate(indices) if ix is not None]
        if len(given) != 1 or given[0][1].dim() != 1 or any(s != 1 for s in sizes[: given[0][0]]):
            return None
        p, idx = given[0]
    elif name == "IndexSelectBackward0":
        dim, idx = saved_on_node(node, "dim"), saved_on_node(node, "index")
        if dim is None or not isinstance(idx, Tensor):
            return None
        p = int(dim)
        if any(s != 1 for s in sizes[:p]):
            return None
    else:
        return None
    rows_src, row = sizes[p], math.prod(sizes[p + 1 :])
    if idx.dtype == torch.bool:
        if idx.numel() != rows_src:
            return None
        idx = torch.nonzero_static(idx, size=n).squeeze(1)  # no host read
    elif idx.numel() != n:
        return None
    if x.numel() != n * row:
        return None
    t = _tokens_per_example(node.next_functions[0][0], rows_src * row, row, batch)
    if t is None or t * batch != rows_src:
        return None
    return torch.remainder(idx.long(), rows_src), t


TokenMap = tuple[Tensor | None, int]
"""(slot of each row in a (B, width, ...) layout, or None when the rows are the B·T tokens in
order; width). See :func:`token_map`."""


def token_map(x: Tensor, batch: int) -> TokenMap | None:
    """Where each row of ``x`` goes among B examples: a flatten (:func:`flattened_from`; width
    T) or a gather (:func:`gathered_rows`). Gathered rows are packed per example: on a CPU into
    as many slots as the example with the most rows has (a host read, free there), elsewhere
    at their token's position (width T; nothing read back). Call it in the forward: autograd
    frees the index after backward."""
    t = flattened_from(x, batch)
    if t is not None:
        return None, t
    found = gathered_rows(x, batch)
    if found is None:
        return None
    rows, t = found
    if rows.device.type != "cpu" or rows.numel() == 0:
        return rows, t
    example = torch.div(rows, t, rounding_mode="floor")
    pos, counts = rank_in_group(example, batch)
    with reading_host_tensor(counts):
        width = int(counts.max())
    return example * width + pos, width


def bincount(key: Tensor, size: int) -> Tensor:
    """``torch.bincount`` into ``size`` bins without its host read on CUDA (it sizes its output
    from the largest value)."""
    return torch.zeros(size, dtype=torch.long, device=key.device).scatter_add_(
        0, key, torch.ones_like(key)
    )


def rank_in_group(group: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Each row's rank among the rows of its group (0, 1, … in row order), and the size of
    each of the ``groups`` groups; nothing read back."""
    counts = bincount(group, groups)
    order = torch.argsort(group, stable=True)
    first = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(group)
    pos[order] = torch.arange(group.numel(), device=group.device) - first[group[order]]
    return pos, counts


def to_examples(x: Tensor, tokens: TokenMap, batch: int) -> Tensor:
    """Rows of ``x`` as (B, width, ...) examples: a view of a flatten, a scatter of a gather
    (zeros in the slots no row takes; they add nothing to a token-wise rule)."""
    slots, width = tokens
    return as_examples(x, batch, width) if slots is None else scatter_rows(x, slots, batch, width)


def scatter_rows(x: Tensor, slots: Tensor, batch: int, width: int) -> Tensor:
    """Rows of ``x`` placed at their slots of a (B, width, ...) tensor, zeros elsewhere (each
    slot at most once: a token goes to an expert at most once, as top-k routing gives)."""
    out = x.new_zeros(batch * width, *x.shape[1:])
    return out.index_copy(0, slots, x).view(batch, width, *x.shape[1:])


def as_examples(x: Tensor, batch: int, t: int) -> Tensor:
    """A (B·T, ...) flatten viewed as (B, T, ...)."""
    return x.reshape(batch, t, *x.shape[1:])


def acc_dtype(t: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (the exact references)."""
    return torch.promote_types(t.dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# routers and other rule-less modules on flattened tokens: torch.func per example


def _split(x: Any, batch: int, t: int) -> Tensor | None:
    if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch * t:
        return as_examples(x.detach(), batch, t)
    return None


def token_generic_sq_norms(
    module: nn.Module,
    params: Mapping[str, Tensor],
    inputs: tuple[tuple, dict],
    outputs: list[Any],
    grads: dict[int, Tensor],
    batch: int,
    t: int,
    shared: frozenset[int] = frozenset(),
) -> Tensor:
    """Per-example |∂ℓ_j/∂θ|² (B,) over ``params`` of a module called on flattened tokens:
    ``vmap`` over examples of ``grad`` of its functional forward on one example's (T, ...)
    slice of every (B·T, ...) input (other inputs, and the leaves in ``shared``, not computed
    from the batch, given whole), against that slice of the output gradients. Exact when the
    module treats tokens independently (a router does)."""
    leaves, spec = tree_flatten(as_param_dtype(inputs, params))
    where = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    xs, in_dims = [], []
    for i in where:
        s = None if i in shared else _split(leaves[i], batch, t)
        xs.append(leaves[i].detach() if s is None else s)
        in_dims.append(None if s is None else 0)
    if all(d is None for d in in_dims):
        raise ValueError(f"no input holds {batch}×{t} flattened tokens")
    used = sorted(grads)
    split = [_split(grads[i], batch, t) for i in used]
    cots = [c for c in split if c is not None]
    if len(cots) < len(split):
        raise ValueError(f"an output without {batch}×{t} flattened tokens got gradient")
    own = {k: p.detach() for k, p in params.items()}

    def example_loss(p: dict[str, Tensor], ex: list[Tensor], gs: list[Tensor]) -> Tensor:
        filled = list(leaves)
        for i, x in zip(where, ex, strict=True):
            filled[i] = x
        args, kwargs = tree_unflatten(filled, spec)
        out, _ = tree_flatten(functional_call(module, p, args, kwargs))
        total = torch.zeros((), dtype=acc_dtype(gs[0]), device=gs[0].device)
        for i, g in zip(used, gs, strict=True):
            total = total + (out[i].to(total.dtype) * g.to(total.dtype)).sum()
        return total

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        per = vmap(grad(example_loss), in_dims=(None, in_dims, 0))(own, xs, cots)
    return sum(v.flatten(1).to(acc_dtype(v)).square().sum(1) for v in per.values())


def _cut(x: Any, rows: slice, n: int) -> Any:
    return x[rows] if isinstance(x, Tensor) and x.dim() and x.shape[0] == n else x


def slices_agree(
    module: nn.Module,
    inputs: tuple[tuple, dict],
    outputs: list[Any],
    batch: int,
    t: int,
    live: Mapping[str, Tensor] | None = None,
) -> bool:
    """The module run on each example's token slice gives the call's outputs (it treats the
    examples' tokens independently): the structural check's test for
    :func:`token_generic_sq_norms`. One forward per example; run once. ``live``: the tensors
    the forward used where they are not the registered parameters (FSDP2 has resharded
    those), swapped in."""
    args, kwargs = inputs
    n = batch * t
    for b in range(batch):
        rows = slice(b * t, (b + 1) * t)
        cut = (
            tuple(_cut(a, rows, n) for a in args),
            {k: _cut(v, rows, n) for k, v in kwargs.items()},
        )
        with torch.no_grad():
            if live:
                got, _ = tree_flatten(functional_call(module, dict(live), cut[0], cut[1]))
            else:
                got, _ = tree_flatten(module(*cut[0], **cut[1]))
        for mine, full in zip(got, outputs, strict=False):
            if not isinstance(full, Tensor) or not isinstance(mine, Tensor):
                continue
            want = _cut(full.detach(), rows, n)
            if mine.shape != want.shape:
                return False
            if mine.is_floating_point():
                if not torch.allclose(mine.float(), want.float(), rtol=1e-4, atol=1e-5):
                    return False
            elif not torch.equal(mine, want):
                return False
    return True
