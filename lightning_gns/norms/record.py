"""What the per-example hooks gather during one micro-batch, kept and reset as one record."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gns.norms.sites import Site


class LinearRows:
    """Row norms of a micro-batch's plain 2-D Linear calls, squared and summed once per step.

    A Linear on (B, d_in) gives example i the squared norm |g_i|²|a_i|² (weight) + |g_i|²
    (bias). Kept as the norms |g_i| and |a_i| (one reduction each), the products and the sum
    over layers, micro-batches and examples take a handful of ops per step, not three per
    layer and micro-batch (:func:`rows_sum`); only their sum over the examples is used.
    """

    def __init__(self, n: int) -> None:
        self.n = n  # examples (rows) of the micro-batch
        self.weight_g: list[Tensor] = []  # |g_i| of layers with a trainable weight
        self.weight_a: list[Tensor] = []  # and their |a_i|
        self.bias_g: list[Tensor] = []  # |g_i| of layers with a trainable bias

    def __bool__(self) -> bool:
        return bool(self.weight_g or self.bias_g)

    def add(self, a: Tensor, g: Tensor, weight: bool, bias: bool) -> bool:
        """This call's rows (False: not a plain (n, d) pair; the caller takes the rule path)."""
        if a.dim() != 2 or g.dim() != 2 or a.shape[0] != self.n or g.shape[0] != self.n:
            return False
        if not (weight or bias):
            return True
        g_norm = torch.linalg.vector_norm(g, dim=1, dtype=torch.float32)
        if weight:
            self.weight_g.append(g_norm)
            self.weight_a.append(torch.linalg.vector_norm(a, dim=1, dtype=torch.float32))
        if bias:
            self.bias_g.append(g_norm)
        return True


def rows_sum(rows: list[LinearRows]) -> Tensor:
    """Σ over the rows' layers and examples of |g_i|²|a_i|² + |g_i|² (weights, biases)."""
    weight_g = [t for r in rows for t in r.weight_g]
    weight_a = [t for r in rows for t in r.weight_a]
    parts = [t for r in rows for t in r.bias_g]
    if weight_g:
        parts.append(concat(weight_g) * concat(weight_a))  # |g_i||a_i|
    v = concat(parts)
    return torch.linalg.vecdot(v, v)


def concat(ts: list[Tensor]) -> Tensor:
    """The tensors joined along dim 0 (one tensor: itself, no copy)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts)


class MicroBatchRecord:
    """Per-example squared norms of one micro-batch: summed over sites (and per site with
    ``per_layer``), per-example gradients of tied weights (summed over their sites, squared at
    the end), and the "sinks": leaves whose gradients receive the norms computed inside
    autograd (the simultaneous route, the compiled taps)."""

    def __init__(self, per_layer: bool = False) -> None:
        self.per_layer = per_layer
        # set by the step path: plain 2-D Linears go to :attr:`rows`, not to the per-example
        # sums (:meth:`close` then leaves them out; PerExampleNorms.take_rows gives them)
        self.defer_rows = False
        # (n, device, names), sinks, tied sinks: leaves reused while the sites stay the same
        self._kept: tuple[tuple, dict[str, Tensor], dict[int, Tensor]] | None = None
        self.reset(None)

    def reset(self, batch_size: int | None) -> None:
        self.batch_size = batch_size
        self.total: Tensor | None = None
        self.layers: dict[str, Tensor] = {}
        self.shared: dict[int, Tensor] = {}  # id(weight) -> per-example gradients (n, *shape)
        self.sinks: dict[str, Tensor] = {}
        self.tied_sinks: dict[int, Tensor] = {}
        self.bad: str | None = None  # why this micro-batch cannot be used
        self.token_batch: int | None = None  # dim 0 of this forward's first 2-D token ids
        defer = self.defer_rows and not self.per_layer
        self.rows = LinearRows(batch_size) if defer and batch_size is not None else None

    def add(self, site: Site, total: Tensor) -> None:
        self.total = total if self.total is None else self.total + total
        if self.per_layer:
            prev = self.layers.get(site.name)
            self.layers[site.name] = total if prev is None else prev + total

    def add_tied(self, site: Site, samples: dict[str, Tensor]) -> None:
        for attr, sample in samples.items():
            key = id(site.params[attr])
            self.shared[key] = sample if key not in self.shared else self.shared[key] + sample

    def make_sinks(self, sites: dict[str, Site], n: int, device: torch.device) -> None:
        """One (n,) sink for the model, or one per site with ``per_layer``, and one
        (n, *shape) per tied weight; n examples are measured."""
        names = list(sites) if self.per_layer else [""]
        kept = self._kept
        if kept is not None and kept[0] == (n, device, tuple(names)):
            self.sinks, self.tied_sinks = kept[1], kept[2]  # last micro-batch's leaves, reused
            for sink in (*self.sinks.values(), *self.tied_sinks.values()):
                sink.grad = None
            return
        self.sinks = {k: torch.zeros(n, device=device, requires_grad=True) for k in names}
        for site in sites.values():
            for attr in site.shared:
                p = site.params[attr]
                if id(p) not in self.tied_sinks:  # zeros that take no memory
                    zero = torch.zeros((), device=device).expand(n, *p.shape)
                    self.tied_sinks[id(p)] = zero.requires_grad_()
        self._kept = ((n, device, tuple(names)), self.sinks, self.tied_sinks)

    def forget_sinks(self) -> None:
        """The sites changed: the next micro-batch makes new sinks."""
        self._kept = None

    def sink_for(self, site: Site) -> Tensor | None:
        return self.sinks.get(site.name if self.per_layer else "")

    def close(self) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Per-example |g_j|² over the covered parameters and per-layer ones."""
        acc, layers = self.total, dict(self.layers)
        for name, sink in self.sinks.items():  # norms computed inside autograd
            if sink.grad is None:
                continue
            acc = sink.grad if acc is None else acc + sink.grad
            if name:
                layers[name] = sink.grad if name not in layers else layers[name] + sink.grad
        shared = dict(self.shared)
        for key, sink in self.tied_sinks.items():
            if sink.grad is not None:
                shared[key] = sink.grad if key not in shared else shared[key] + sink.grad
        for sample in shared.values():
            sq = sample.flatten(1).square().sum(1)
            acc = sq if acc is None else acc + sq
        return acc, layers
