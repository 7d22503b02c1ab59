"""Routers and stacked experts inside a ``torch.compile`` graph.

Eagerly, a module without a rule keeps its inputs and its outputs' gradients for after
backward (:func:`~lightning_gns.norms.site_hooks.generic_hook`); under compilation that Python
state splits the graph at every MoE module. Here, as the dense layers'
:class:`~lightning_gns.norms.compiled.Tap`, the norms travel inside autograd to a sink:

* a router of a known form (its forward read from its source: Mixtral's, Qwen2-MoE's, 14
  classes in transformers 5.25): the logits z = x Wᵀ go through :class:`Tap` with the Linear
  rule on (B, T, d) and (B, T, E), and the scores are recomputed from the tapped logits as the
  forward does (softmax, the forward's top-k entries, renormalised), so that every gradient
  reaching z passes the tap: the router's per-example gradient is Σ_t g_t x_tᵀ, g = ∂L/∂z.
* stacked experts (:func:`~lightning_gns.norms.moe.token_rule_for`): their rule
  (:func:`~lightning_gns.norms.moe.stacked_experts_norm`) runs in the backward as one opaque
  custom op (it sizes its buffers from the routing, which a graph cannot hold). Where the
  forward calls the gate once on every pair (``grouped_mm``, ``batched_mm``) and the eager
  steps verified its rows' order, the gate's input z goes through :class:`GateInputTap`
  (through the module's :class:`~lightning_gns.norms.moe.GateTap`) and the output through
  :class:`Carrier`, which hands the output's gradient g back to the gate tap's second output:
  its backward has x, z, dz and g, as the eager rule's gate call, and recomputes no
  projection. Otherwise the output goes through :class:`ExpertsTap`, whose op recomputes z.

Anything else (an unknown router, rows that are not a flatten of the batch, FSDP2's unsharded
copies, tied weights) takes the generic path, as before.
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gns import host_sync
from lightning_gns.norms import moe
from lightning_gns.norms.compiled import Tap
from lightning_gns.norms.generic import is_replaying
from lightning_gns.norms.rules import linear_norm
from lightning_gns.norms.tokens import as_examples

_HEAD = (
    "hidden_states = hidden_states.reshape(-1, self.hidden_dim)",
    "router_logits = F.linear(hidden_states, self.weight)",
)
_TAIL = ("router_scores = router_top_value", "return router_logits, router_scores, router_indices")
_TOPK = "router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)"
_NORMALISE = "router_top_value /= router_top_value.sum(dim=-1, keepdim=True)"
_QWEN_SOFTMAX = (
    "router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)"
)
_CAST = "router_top_value = router_top_value.to(router_logits.dtype)"
# the whole body of each known router forward (comments and blank lines dropped), and how it
# turns logits into scores: (renormalise: "always" | "flag" (self.norm_topk_prob), cast back)
ROUTER_FORMS: dict[tuple[str, ...], tuple[str, bool]] = {
    (  # Mixtral, MiniMax
        *_HEAD,
        "router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)",
        _TOPK, _NORMALISE, *_TAIL,
    ): ("always", False),
    (  # Qwen2/3-MoE, OLMoE, FlexOlmo, Qwen3-Next, ...
        *_HEAD, _QWEN_SOFTMAX, _TOPK, "if self.norm_topk_prob:", _NORMALISE, _CAST, *_TAIL,
    ): ("flag", True),
    (*_HEAD, _QWEN_SOFTMAX, _TOPK, _NORMALISE, _CAST, *_TAIL): ("always", True),  # Qwen3-VL-MoE
}  # fmt: skip


@functools.cache
def _router_form(forward: Callable) -> tuple[str, bool] | None:
    try:
        lines = inspect.getsource(forward).splitlines()[1:]
    except (OSError, TypeError):
        return None
    body = tuple(s for s in (re.sub(r"\s*#.*$", "", line).strip() for line in lines) if s)
    return ROUTER_FORMS.get(body)


def router_form(module: nn.Module) -> tuple[str, bool] | None:
    """How a router of a known form turns its logits into scores, or None (its forward is not
    one read here, or it has parameters besides its (E, d) weight)."""
    if "forward" in module.__dict__ or not isinstance(getattr(module, "hidden_dim", None), int):
        return None
    w = module._parameters.get("weight")
    others = [n for n, p in module.named_parameters() if n != "weight" and p.requires_grad]
    if not isinstance(w, Tensor) or w.dim() != 2 or others:
        return None
    return _router_form(type(module).forward)


def _scores(logits: Tensor, indices: Tensor, form: tuple[str, bool], module: Any) -> Tensor:
    """The router's scores from its logits, as its forward computes them."""
    renormalise, cast = form
    top = torch.softmax(logits.float(), dim=-1).gather(-1, indices)
    if renormalise == "always" or module.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype) if cast else top


# stacked experts, by key, for the custom op (which takes no module): registered eagerly
_EXPERTS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


@torch.library.custom_op("lightning_gns::stacked_experts_sq_norms", mutates_args=())
def stacked_experts_sq_norms(
    key: int, x: Tensor, index: Tensor, weight: Tensor, g: Tensor, batch: int
) -> Tensor:
    """Per-example squared norms (B,) float32 of the registered experts ``key``'s parameters
    (:func:`~lightning_gns.norms.moe.stacked_experts_norm`); NaN if the rule fails."""
    if host_sync.CHECK.enabled:  # (it runs eagerly at every step, compiled or not)
        with host_sync.watched():
            return _experts_sq_norms(key, x, index, weight, g, batch)
    return _experts_sq_norms(key, x, index, weight, g, batch)


def _experts_sq_norms(
    key: int, x: Tensor, index: Tensor, weight: Tensor, g: Tensor, batch: int
) -> Tensor:
    module = _EXPERTS.get(key)
    try:
        if module is None:
            raise LookupError("the experts module is gone")
        with torch.autocast(g.device.type, enabled=False):
            got = moe.stacked_experts_norm(module, (x, index, weight), {}, g, batch)
        return torch.stack(list(got.values())).sum(0).float()
    except Exception:  # noqa: BLE001 - never break the user's backward: a NaN step
        return torch.full((batch,), float("nan"), device=g.device)


@stacked_experts_sq_norms.register_fake
def _(key: int, x: Tensor, index: Tensor, weight: Tensor, g: Tensor, batch: int) -> Tensor:
    return g.new_empty(batch, dtype=torch.float32)


@torch.library.custom_op("lightning_gns::stacked_experts_sq_norms_taken", mutates_args=())
def stacked_experts_sq_norms_taken(
    key: int, x: Tensor, index: Tensor, weight: Tensor, g: Tensor, z: Tensor, dz: Tensor,
    batch: int,
) -> Tensor:  # fmt: skip
    """As :func:`stacked_experts_sq_norms`, from the forward's z (h = its gate, elementwise) and
    dz in the forward's rows, whose order is checked (its probe) as eagerly: no projection
    recomputed."""
    if host_sync.CHECK.enabled:
        with host_sync.watched():
            return _taken_sq_norms(key, x, index, weight, g, z, dz, batch)
    return _taken_sq_norms(key, x, index, weight, g, z, dz, batch)


def _taken_sq_norms(
    key: int, x: Tensor, index: Tensor, weight: Tensor, g: Tensor, z: Tensor, dz: Tensor,
    batch: int,
) -> Tensor:  # fmt: skip
    module = _EXPERTS.get(key)
    try:
        if module is None:
            raise LookupError("the experts module is gone")
        with torch.autocast(g.device.type, enabled=False):
            # the rows' order checked on every step, as eagerly (a compiled sort may order
            # tied experts otherwise): a mismatch is a NaN step, never a wrong norm
            where, v = moe.probe(z.shape[1], z.dtype, z.device)
            call = moe.GateCall(z[:, where] @ v, moe._gate(module)(z))
            call.dz = dz
            got = moe.stacked_experts_norm(module, (x, index, weight), {}, g, batch, call)
        return torch.stack(list(got.values())).sum(0).float()
    except Exception:  # noqa: BLE001 - never break the user's backward: a NaN step
        return torch.full((batch,), float("nan"), device=g.device)


@stacked_experts_sq_norms_taken.register_fake
def _(
    key: int, x: Tensor, index: Tensor, weight: Tensor, g: Tensor, z: Tensor, dz: Tensor,
    batch: int,
) -> Tensor:  # fmt: skip
    return g.new_empty(batch, dtype=torch.float32)


class GateInputTap(torch.autograd.Function):
    """Identity on the experts' gate input z (a copy), and a carrier (zeros shaped as x, the
    experts' output) that :class:`Carrier` gives the output's gradient g: the backward runs
    once both dz and g are there, and sends the experts' norms to the sink."""

    @staticmethod
    def forward(
        ctx: Any, z: Tensor, x: Tensor, index: Tensor, weight: Tensor, sink: Tensor, key: int,
        batch: int,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        ctx.save_for_backward(z, x, index, weight)
        ctx.key, ctx.batch, ctx.n = key, batch, sink.shape[0]
        ctx.set_materialize_grads(False)
        return z.clone(), torch.zeros_like(x)

    @staticmethod
    def backward(ctx: Any, dz: Tensor | None, g: Tensor | None) -> tuple[Tensor | None, ...]:
        z, x, index, weight = ctx.saved_tensors
        if dz is None or g is None:  # the carrier lost (or z unused): a NaN step
            sq = torch.full((ctx.n,), float("nan"), device=z.device)
        else:
            got = stacked_experts_sq_norms_taken(ctx.key, x, index, weight, g, z, dz, ctx.batch)
            sq = got[: ctx.n]
        return dz, None, None, None, sq, None, None


class Carrier(torch.autograd.Function):
    """Identity on the experts' output (a copy); its gradient g also goes to the carrier."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, carrier: Tensor) -> Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        return g, g


class ExpertsTap(torch.autograd.Function):
    """Identity on the experts' output (a copy); its backward sends their per-example squared
    norms, from the saved inputs and this gradient, to the sink."""

    @staticmethod
    def forward(
        ctx: Any, out: Tensor, x: Tensor, index: Tensor, weight: Tensor, sink: Tensor,
        key: int, batch: int,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x, index, weight)
        ctx.key, ctx.batch, ctx.n = key, batch, sink.shape[0]
        return out.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, index, weight = ctx.saved_tensors
        sq = stacked_experts_sq_norms(ctx.key, x, index, weight, g, ctx.batch)
        return g, None, None, None, sq[: ctx.n], None, None


Compiled = Callable[[nn.Module, tuple, dict, Any], Any]


def in_graph(site: Any) -> bool:
    """Whether a rule-less site's norms are computed inside a compiled graph (a router of a
    known form, or stacked experts; none with a tied weight, none sharded by FSDP2: its
    forward takes unsharded copies, which the generic path follows). Calls the taps cannot
    take (rows gathered, not flattened; keyword arguments) still split the graph, unwarned."""
    if site.shared or any(hasattr(p, "placements") for p in site.params.values()):
        return False
    return router_form(site.module) is not None or moe.token_rule_for(site.module) is not None


def compiled_hook(norms: Any, site: Any) -> Compiled | None:
    """For a rule-less site: its forward hook's body under ``torch.compile`` (the output to
    return, or None: the generic path), if it is a router of a known form or stacked experts;
    else None. Called eagerly, when the hooks are attached."""
    module = site.module
    if not in_graph(site):
        return None
    form = router_form(module)
    if form is not None:
        return lambda m, args, kwargs, out: _tap_router(norms, site, form, args, kwargs, out)
    key = id(module)  # stacked experts
    _EXPERTS[key] = module
    moe.tap_gate(module)  # (as the attach does next: once)
    tap = module.__dict__.get("_apply_gate")
    if isinstance(tap, moe.GateTap) and moe._implementation(module) in TAKEN:
        tap.compiled = lambda z, inputs: _tap_gate_input(norms, site, tap, key, z, inputs)
    return lambda m, args, kwargs, out: _tap_experts(norms, site, key, args, kwargs, out)


TAKEN = ("grouped_mm", "batched_mm")  # forwards that call the gate once, on every pair


def _tap_gate_input(
    norms: Any, site: Any, tap: moe.GateTap, key: int, z: Tensor, inputs: tuple
) -> tuple[Tensor, Tensor | None]:
    """The gate's input through :class:`GateInputTap` and its carrier, where the rows are the
    forward's every pair, verified by the eager steps; else z as it is, no carrier."""
    sink = norms.record.sink_for(site)
    if sink is None or not (tap.verified and tap.usable) or len(inputs) != 3:
        return z, None
    x, index, weight = inputs
    bt = _tokens(norms, site, x)
    if bt is None or x.dim() != 2 or not _unsharded(site) or not z.requires_grad:
        return z, None
    if z.dim() != 2 or z.shape[0] != index.numel():
        return z, None
    z, carrier = GateInputTap.apply(z, x, index, weight, sink, key, bt[0])
    return z, carrier


def _tokens(norms: Any, site: Any, x: object) -> tuple[int, int] | None:
    """(B, T) when the site's input is the (B·T, ·) flatten of the batch the eager steps found
    (or (B, T, ·) itself), else None."""
    b = norms.record.batch_size
    if b is None or is_replaying() or not torch.is_grad_enabled() or not isinstance(x, Tensor):
        return None
    if x.dim() == 3 and x.shape[0] == b:
        return b, x.shape[1]
    found = norms.scopes.map_for(site.name, x)
    if found is None or found[0] is not None:
        return None
    return b, found[1]


def _unsharded(site: Any) -> bool:
    """The forward used the registered parameters (not FSDP2's unsharded copies)."""
    return all(getattr(site.module, a, None) is p for a, p in site.params.items())


def _tap_router(
    norms: Any, site: Any, form: tuple[str, bool], args: tuple, kwargs: dict, output: Any
) -> tuple[Tensor, Tensor, Tensor] | None:
    sink = norms.record.sink_for(site)
    x = args[0] if args else kwargs.get("hidden_states")
    bt = _tokens(norms, site, x)
    if sink is None or bt is None or not isinstance(x, Tensor) or not _unsharded(site):
        return None
    if not (isinstance(output, tuple) and len(output) == 3):
        return None
    logits, _, indices = output
    if not (isinstance(logits, Tensor) and logits.requires_grad):
        return None
    module, (b, t) = site.module, bt
    a = as_examples(x.reshape(-1, module.hidden_dim), b, t)
    rules = (linear_norm, None)
    tapped = Tap.apply(as_examples(logits, b, t), a, sink, module, rules, (), False)
    tapped = tapped.reshape(logits.shape)
    return tapped, _scores(tapped, indices, form, module), indices


def _tap_experts(
    norms: Any, site: Any, key: int, args: tuple, kwargs: dict, output: Any
) -> Tensor | None:
    tap = site.module.__dict__.get("_apply_gate")
    carrier = tap.carrier if isinstance(tap, moe.GateTap) else None
    if isinstance(tap, moe.GateTap):
        tap.inputs = None  # (kept by its pre-hook; a forward that never called the gate)
    if carrier is not None:  # the gate's input went through its tap
        tap.carrier = None
        if isinstance(output, Tensor) and output.shape == carrier.shape:
            return Carrier.apply(output, carrier)
        return None  # (the gate tap's backward sees no g: a NaN step, never a silent one)
    sink = norms.record.sink_for(site)
    if sink is None or not isinstance(output, Tensor) or not output.requires_grad:
        return None
    if len(args) != 3 or kwargs:  # (hidden, top_k_index, top_k_weights), as transformers
        return None
    x, index, weight = args
    bt = _tokens(norms, site, x)
    if bt is None or x.dim() != 2 or not _unsharded(site):
        return None
    return ExpertsTap.apply(output, x, index, weight, sink, key, bt[0])
