"""Weight gradient and per-example norms from one product (the "simultaneous" method, nanoGNS).

For a Linear layer on sequences (B, T, d_in), autograd's weight gradient is one GEMM over all
B·T rows, Σ_n g_nᵀ a_n. When the per-example norms |g_nᵀ a_n|² are cheapest in materialised
form (``rules._use_gram`` false: T large against d_in·d_out/(d_in + d_out)), computing each
G_n = g_nᵀ a_n for its norm repeats that GEMM's work. Here the layer's forward runs through
an autograd Function whose backward computes the G_n once (a batched product), takes their
norms, and returns Σ_n G_n as the weight gradient in place of autograd's GEMM. It costs the
memory of the G_n of ``chunk`` examples at a time (at most :data:`CHUNK_BYTES`).

Only ``nn.Linear`` (and subclasses that keep its forward) and Hugging Face's GPT-2 ``Conv1D``
are routed here, and only when the call qualifies (see :func:`qualifies`); every other call
runs the module's own forward and the hook path of :mod:`lightning_gns.norms.hooks`. The
routed forward is the module's own instance attribute while the hooks are attached; a deep
copy (EMA, SWA) or a pickled copy of the model runs the plain forward. The norms leave the
backward as the gradient of a "sink" tensor, not through Python, so the route compiles whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns import host_sync
from lightning_gns._compat import functorch_transforms_active
from lightning_gns.norms.generic import is_replaying
from lightning_gns.norms.rules import _use_gram

CHUNK_BYTES = 64 * 2**20  # per-example gradients held at once, per layer
CONV1D = "transformers.pytorch_utils.Conv1D"  # y = x W + b with W (d_in, d_out)

# x -> the sink (a (B,) leaf) whose gradient receives this call's per-example squared norms,
# or None: run the plain forward
SinkFor = Callable[[Tensor], "Tensor | None"]
# (module, args, output) -> a replacement output or None: the site's forward hook
After = Callable[[nn.Module, tuple, Tensor], Any]


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def transposed(module: nn.Module) -> bool:
    """True for a layer storing its weight as (d_in, d_out) (Hugging Face's Conv1D)."""
    return _qualname(module) == CONV1D


def can_route(module: nn.Module) -> bool:
    """A layer whose forward is exactly a Linear's, with a trainable weight, not yet rerouted."""
    own = module.__dict__.get("forward")
    if own is not None and not isinstance(own, RoutedForward):
        return False  # someone else (accelerate, a user) replaced its forward
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or not w.requires_grad or w.dim() != 2:
        return False
    return type(module).forward is nn.Linear.forward or transposed(module)


def qualifies(module: Any, x: Tensor) -> bool:
    """This call is worth routing: a float sequence input in the materialised-norm regime, in
    a plain autograd forward (eager or traced by torch.compile; no replay, no torch.func)."""
    if x.dim() < 3 or not x.is_floating_point() or not torch.is_grad_enabled():
        return False
    if is_replaying():
        return False
    w = module.weight
    if not w.requires_grad or (not torch.is_autocast_enabled(x.device.type) and x.dtype != w.dtype):
        return False  # a frozen weight gains nothing; mixed dtypes: the plain forward's error
    if not torch.compiler.is_compiling() and functorch_transforms_active():
        return False
    t = x[0].numel() // x.shape[-1]
    d_in, d_out = x.shape[-1], module.weight.numel() // x.shape[-1]
    return t > 1 and not _use_gram(t, d_in, d_out)


def route(module: nn.Module, sink_for: SinkFor, after: After | None = None) -> None:
    """Give ``module`` the routed forward; ``sink_for(x)`` is asked at each call for the sink
    that takes this call's per-example norms (None: run the plain forward); ``after(module,
    (x,), y)`` runs on each call's output as a forward hook would (its result, if not None,
    replaces it), without making the module's call take the hooked path."""
    module.forward = RoutedForward(module, sink_for, after)


def unroute(module: nn.Module) -> None:
    """Back to the class's own forward."""
    if isinstance(module.__dict__.get("forward"), RoutedForward):
        del module.__dict__["forward"]


class RoutedForward:
    """A routed layer's forward. A copy (``copy.deepcopy``, pickle) is bound to the copied
    module and has no sink: it runs the plain forward."""

    def __init__(
        self, module: nn.Module, sink_for: SinkFor | None = None, after: After | None = None
    ) -> None:
        self.module, self.sink_for, self.after = module, sink_for, after
        self.is_transposed = transposed(module)  # decided once, not per call

    def __call__(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() < 3:  # no sequence: never routed (qualifies)
            y = type(self.module).forward(self.module, x)
        elif host_sync.CHECK.enabled:
            with host_sync.watched():
                y = _routed_forward(self.module, x, self.sink_for, self.is_transposed)
        else:
            y = _routed_forward(self.module, x, self.sink_for, self.is_transposed)
        if self.after is None:
            return y
        out = self.after(self.module, (x,), y)
        return y if out is None else out

    def __reduce__(self) -> tuple:
        return (RoutedForward, (self.module, None))


def _plain(module: nn.Module, x: Tensor) -> Tensor:
    return type(module).forward(module, x)


def _routed_forward(
    self: nn.Module, x: Tensor, sink_for: SinkFor | None, is_transposed: bool
) -> Tensor:
    if sink_for is None or not isinstance(x, Tensor) or not qualifies(self, x):
        return _plain(self, x)
    sink = sink_for(x)
    if sink is None:
        return _plain(self, x)
    bias = self.bias if isinstance(self.bias, Tensor) else None
    flat = x.reshape(-1, x.shape[-1])  # a view outside the Function: in-place ops stay legal
    y = LinearWithNorms.apply(flat, self.weight, bias, sink, is_transposed, x.shape[0])
    return y.view(*x.shape[:-1], y.shape[-1])


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's where it is on, else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class LinearWithNorms(torch.autograd.Function):
    """y = x Wᵀ + b (x W + b when transposed). Backward returns Σ_n G_n as the weight gradient
    and the per-example squared norms |∂ℓ_n/∂W|² + |∂ℓ_n/∂b|² as the gradient of ``sink``, a
    (B,) leaf on which autograd sums them over layers."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        sink: Tensor,
        is_transposed: bool,
        examples: int,
    ) -> Tensor:
        """x: (B·T, d_in), the B examples' rows in order."""
        dt = _compute_dtype(x)
        xc, wc = x.to(dt), weight.to(dt)
        bc = bias.to(dt) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            if is_transposed:  # as Conv1D computes it
                y = xc @ wc if bc is None else torch.addmm(bc, xc, wc)
            else:
                y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.is_transposed, ctx.examples = is_transposed, examples
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        if host_sync.CHECK.enabled:
            with host_sync.watched():
                return _linear_backward(ctx, gy)
        return _linear_backward(ctx, gy)


def _linear_backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
    xc, wc = ctx.saved_tensors
    gy = gy.to(xc.dtype)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = gy @ (wc.T if ctx.is_transposed else wc)
    b = ctx.examples
    a = xc.reshape(b, -1, xc.shape[-1])
    g = gy.reshape(b, -1, gy.shape[-1])
    grad_w, sq = per_example_weight_grads(a, g, ctx.is_transposed)
    grad_b = None
    if ctx.needs_input_grad[2]:
        per_b = g.sum(1, dtype=torch.float32)  # (B, d_out)
        sq = sq + per_b.detach().square().sum(1)
        grad_b = per_b.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w.to(ctx.weight_dtype), grad_b, sq, None, None


def per_example_weight_grads(a: Tensor, g: Tensor, is_transposed: bool) -> tuple[Tensor, Tensor]:
    """(Σ_n G_n in float32, |G_n|² (B,)) for G_n = g_nᵀ a_n (a_nᵀ g_n when transposed), in
    chunks of examples that keep the G_n under :data:`CHUNK_BYTES`."""
    b, d_in, d_out = a.shape[0], a.shape[-1], g.shape[-1]
    chunk = max(1, CHUNK_BYTES // (d_in * d_out * a.element_size()))
    total: Tensor | None = None
    sqs = []
    for s in range(0, b, chunk):
        ac, gc = a[s : s + chunk], g[s : s + chunk]
        per = torch.bmm(ac.mT, gc) if is_transposed else torch.bmm(gc.mT, ac)
        sqs.append(torch.linalg.vector_norm(per.detach(), dim=(1, 2), dtype=torch.float32))
        part = per.sum(0, dtype=torch.float32)
        total = part if total is None else total + part
    assert total is not None
    return total, torch.cat(sqs).square()
