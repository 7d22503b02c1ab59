"""Per-example norms inside a ``torch.compile`` graph.

The eager hooks register a tensor hook on each layer's output whose closure writes to Python
state; dynamo cannot keep that in a graph and splits it at every layer. Under compilation the
forward hook instead passes the layer's output through :class:`Tap`, an autograd Function
whose backward applies the layer's rule (:func:`~lightning_gns.norms.rules.apply_rules`) to the
saved input and the output gradient and returns the per-example squared norms as the gradient
of a "sink" leaf (B,) that the hooks own; autograd sums every layer's share into ``sink.grad``.
A tied weight's per-example gradients go to a sink of its own shape the same way. Nothing in
the backward touches Python state, so the model compiles to the graphs it has without us.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_gns import host_sync
from lightning_gns.norms.rules import GradSampleRule, NormRule, apply_rules


class Tap(torch.autograd.Function):
    """Identity on a layer's output (a copy, which a compiled graph fuses away; a view could
    not be changed in place); its backward sends the layer's per-example norms to sinks."""

    @staticmethod
    def forward(
        ctx: Any,
        out: Tensor,
        a: Tensor,
        sink: Tensor,
        module: nn.Module,
        rules: tuple[NormRule, GradSampleRule | None],
        tied: tuple[str, ...],
        poison: bool,
        *tied_sinks: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(a)
        ctx.module, ctx.rules, ctx.tied = module, rules, tied
        ctx.poison, ctx.n = poison, sink.shape[0]
        return out.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        if host_sync.CHECK.enabled:
            with host_sync.watched():
                return _tap_backward(ctx, g)
        return _tap_backward(ctx, g)


def _tap_backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
    (a,) = ctx.saved_tensors
    n = ctx.n
    nones = (None, None, None, None)
    if ctx.poison or a.shape[0] < n or g.shape[0] < n or a.shape[0] != g.shape[0]:
        # the batch is not what the hooks were told: a NaN step, never a silent error
        nan = torch.full((n,), float("nan"), device=g.device)
        return (g, None, nan, *nones, *(None for _ in ctx.tied))
    rule, gs_rule = ctx.rules
    total, samples = apply_rules(rule, gs_rule, ctx.module, frozenset(ctx.tied), a[:n], g[:n])
    sq = total if total is not None else torch.zeros(n, device=g.device)
    return (g, None, sq, *nones, *(samples.get(attr) for attr in ctx.tied))
