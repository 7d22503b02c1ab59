"""Squared norms of each micro-batch's local gradient, from one tensor hook per parameter.

A tensor hook on a parameter sees the gradient of one backward (one micro-batch, this process)
before it is accumulated into ``.grad`` and before DDP averages it. One hook per parameter is
kept on purpose: the alternatives (differences of the accumulated ``.grad``, or one multi-grad
hook holding every gradient) cost a gradient's worth of memory or lose the K-fold averaging of
the small-batch estimate. All results stay on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns._compat import norms_fp32
from lightning_gns.host_sync import on_step_path


def squared_norm(tensors: Iterable[Tensor | None]) -> Tensor | None:
    """Σ |t|² over the tensors (float32, on their device); None if there are none."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return None
    norms = torch.stack(norms_fp32(ts))
    return torch.linalg.vecdot(norms, norms)


class MicroBatchNorms:
    """Squared norms of each micro-batch's local gradient, over the given parameters.

    The hooks record one |g_p|² per parameter; :meth:`take` sums those of a whole optimizer
    step in one go (the mean over micro-batches is that sum over their count).
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = list(params)
        self._parts: list[Tensor] = []
        self._start = 0  # first part of the current micro-batch
        self._handles: list[RemovableHandle] = []

    def _hook_for(self, i: int, p: nn.Parameter) -> Callable[[Tensor], None]:
        return self._hook_fp32 if p.dtype == torch.float32 else self._hook

    def attach(self) -> None:
        self.detach()
        self._handles = [
            p.register_hook(on_step_path(self._hook_for(i, p))) for i, p in enumerate(self.params)
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._parts.clear()
        self._start = 0

    def _hook_fp32(self, grad: Tensor) -> None:
        """A float32 parameter's gradient: one BLAS dot, the cheapest call on a CPU (a
        non-contiguous one, as a compiled backward may give, without a copy)."""
        g = grad.detach()
        if g.is_contiguous() and g.dtype == torch.float32:  # (FSDP1: bf16 grads, fp32 param)
            flat = g.view(-1)
            self._parts.append(torch.dot(flat, flat))
        else:
            self._hook(g)

    def _hook(self, grad: Tensor) -> None:
        """Half precision: accumulate in float32 (squares of scaled fp16 grads overflow)."""
        g = grad.detach()
        self._parts.append(torch.linalg.vector_norm(g, dtype=torch.float32).square())

    def close_micro_batch(self, weight: float = 1.0) -> bool:
        """End a micro-batch; its |g|² counts ``weight`` times. False if it had no gradient."""
        if len(self._parts) == self._start:
            return False
        if weight != 1.0:
            mine = torch.stack(self._parts[self._start :]).sum().mul(weight)
            del self._parts[self._start :]
            self._parts.append(mine)
        self._start = len(self._parts)
        return True

    def take(self) -> Tensor | None:
        """Σ over the closed micro-batches of their |g|² (weighted); resets."""
        parts = self._parts[: self._start]
        self._parts = self._parts[self._start :]
        self._start = 0
        if not parts:
            return None
        return torch.stack(parts).sum()


class WeightedMicroBatchNorms(MicroBatchNorms):
    """:class:`MicroBatchNorms` of g ⊙ w (the preconditioned gradient): ``weights`` (one tensor
    per parameter) are set before each optimizer step's first backward; while they are None
    nothing is recorded."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__(params)
        self.weights: list[Tensor] | None = None

    def _hook_for(self, i: int, p: nn.Parameter) -> Callable[[Tensor], None]:
        return partial(self._weighted, i)

    def _weighted(self, i: int, grad: Tensor) -> None:
        if self.weights is not None:
            g = grad.detach().float().mul(self.weights[i]).reshape(-1)
            self._parts.append(torch.dot(g, g))

    def big_sq(self) -> Tensor | None:
        """Σ_p |grad_p ⊙ w_p|² of the optimizer's ``.grad`` (None without weights or grads)."""
        if self.weights is None:
            return None
        both = zip(self.params, self.weights, strict=True)
        pairs = [(p.grad, w) for p, w in both if p.grad is not None]
        if not pairs:
            return None
        return squared_norm(g.float().mul(w) for g, w in pairs)
