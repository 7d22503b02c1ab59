"""What the per-example hooks need for modules called on flattened tokens (mixture of experts).

A sparse MoE block calls its router, its experts and any shared expert on (B·T, d) tokens, or
(``ModuleList`` experts) on the rows routed to each expert. :class:`TokenScopes` tells, for a
site whose input's dim 0 is not the batch, which token each row is
(:mod:`lightning_gns.norms.tokens`): its own input's map, or else that of the nearest enclosing
module called on flattened or gathered tokens with the same rows (the inner layers of an
expert see fresh tensors, computed row by row from the expert's input). Forward pre-hooks on
the enclosing modules record those maps during the forward; after the structural check only
the modules whose map a site used stay hooked.

:func:`token_site_norms` closes a rule-less site (routers, stacked experts) called on
flattened tokens; :func:`token_check_problem` is the structural check's extra test for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns.host_sync import on_step_path
from lightning_gns.norms import moe, tokens
from lightning_gns.norms.generic import replaying
from lightning_gns.norms.moe_compiled import router_form
from lightning_gns.norms.rules import norm_rule_for

if TYPE_CHECKING:
    from lightning_gns.norms.sites import Site

# rules that treat every dim between the batch and the features as positions: a (B, T, ...)
# view of flattened tokens, or a scatter of gathered ones (zero rows add nothing), suits them
TOKENWISE = ("Linear", "Embedding", "LayerNorm", "RMSNorm", "Conv1D")


def tokenwise(module: nn.Module) -> bool:
    """A rule-covered module whose rule may see (B, T, ...) tokens for (B·T, ...) rows."""
    rule = norm_rule_for(module)
    if rule is None:
        return False
    return any(cls.__name__ in TOKENWISE for cls in type(module).__mro__)


class TokenScopes:
    """Token maps of the modules enclosing the sites, recorded during each forward."""

    def __init__(self, model: nn.Module, site_names: list[str]) -> None:
        self.model = model
        every = {name for name, _ in model.named_modules()}
        self.ancestors: dict[str, list[str]] = {}
        for name in site_names:
            parts = name.split(".")[:-1]
            chain = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
            self.ancestors[name] = [a for a in chain if a in every]
        self.watched = {a for chain in self.ancestors.values() for a in chain}
        self.used: set[str] = set()
        self.flat: set[str] = set()  # sites an eager step found on a flatten of the batch
        self.maps: dict[str, tokens.TokenMap] = {}
        self.batch: int | None = None
        self.handles: list[RemovableHandle] = []

    def attach(self) -> None:
        self.detach()
        for name, module in self.model.named_modules():
            if name in self.watched:
                hook = on_step_path(self._recorder(name))
                self.handles.append(module.register_forward_pre_hook(hook))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def start(self, batch: int | None) -> None:
        self.batch, self.maps = batch, {}

    def keep_used(self) -> None:
        """After the structural check: hook only the modules whose map a site used."""
        self.watched = set(self.used)
        if self.handles:
            self.attach()

    def _recorder(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def record(module: nn.Module, args: tuple) -> None:
            b = self.batch
            if b is None or not args or not isinstance(args[0], Tensor):
                return
            if torch.compiler.is_compiling():  # no autograd graph to read: see map_for
                return
            x = args[0]
            if x.dim() == 0 or x.shape[0] == b:
                return
            found = tokens.token_map(x, b)
            if found is not None:
                self.maps[name] = found

        return record

    def map_for(self, site: str, x: object) -> tokens.TokenMap | None:
        """Which token each row of a site's input is; None when its dim 0 is the batch or no
        map is known (then the site fails as today: no batch dimension). Inside a
        ``torch.compile`` graph autograd's graph is not there to read: a site that the eager
        steps (the first, with the structural check) found on a flatten of the batch takes
        its rows as B runs of equal length again; gathered rows are not known there."""
        b = self.batch
        if b is None or not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] == b:
            return None
        if torch.compiler.is_compiling():
            if site in self.flat and x.shape[0] % b == 0:
                return None, x.shape[0] // b
            return None
        found = self._found(site, x, b)
        if found is not None and found[0] is None:
            self.flat.add(site)
        return found

    def _found(self, site: str, x: Tensor, b: int) -> tokens.TokenMap | None:
        found = tokens.token_map(x, b)
        if found is not None:
            return found
        for name in self.ancestors.get(site, []):
            got = self.maps.get(name)
            if got is not None and _rows(got, b) == x.shape[0]:
                self.used.add(name)
                return got
        return None


def _rows(found: tokens.TokenMap, batch: int) -> int:
    rows, t = found
    return batch * t if rows is None else rows.shape[0]


def first_tensor(inputs: tuple[tuple, dict]) -> Tensor | None:
    args, kwargs = inputs
    for x in (*args, *kwargs.values()):
        if isinstance(x, Tensor):
            return x
    return None


def token_site_norms(site: Site, batch: int) -> Tensor:
    """Per-example squared norms (B,) of a rule-less site called on flattened tokens: the
    stacked-experts rule, or ``torch.func`` per example on each example's token slice (inputs
    the structural check found not computed from the batch are given whole)."""
    seen = site.seen
    assert seen.inputs is not None and seen.tokens is not None
    rows, t = seen.tokens
    if rows is not None:
        raise ValueError("a module without a rule is called on gathered rows")
    if seen.early is not None:
        return seen.early
    rule = moe.token_rule_for(site.module)
    if rule is not None:
        args, kwargs = seen.inputs
        call, seen.gate_call = seen.gate_call, None
        try:
            got = rule(site.module, args, kwargs, seen.out_grads[0], batch, call, seen.live)
        finally:
            if call is not None:
                call.drop()
        return torch.stack(list(got.values())).sum(0)
    params = {**site.params, **seen.live}
    args = (seen.inputs, seen.outputs, seen.out_grads, batch, t, site.shared_inputs)
    return tokens.token_generic_sq_norms(site.module, params, *args)


def norms_when_backward_passes(site: Site, batch: int | None) -> Callable[[Any], None]:
    """For a stacked-experts site's :class:`~lightning_gns.norms.moe.GateCall` after the
    structural check: its norms as soon as backward has passed the experts' gate, and the
    call's tensors dropped, so that no layer's z, h and dz outlive its own backward (any
    failure leaves them to the rule after backward, as usual)."""

    def run(call: Any) -> None:
        seen = site.seen
        if batch is None or seen.inputs is None or 0 not in seen.out_grads:
            return
        g, (args, kwargs) = seen.out_grads[0], seen.inputs
        try:
            with replaying(), torch.autocast(g.device.type, enabled=False):
                got = moe.stacked_experts_norm(site.module, args, kwargs, g, batch, call, seen.live)
                if not got:  # no trainable parameter left (frozen since the check)
                    return
                seen.early = torch.stack(list(got.values())).sum(0)
        except Exception:  # noqa: BLE001 - never break the user's backward: after it, as usual
            return
        seen.gate_call = None
        call.drop()

    return on_step_path(run)


def token_local_grads(site: Site) -> dict[str, Tensor] | None:
    """The structural check's recomputation for stacked experts: their whole gradient from the
    rule's own recomputation (it equals autograd's only if the rule models the module). None
    for other sites (re-run as usual)."""
    seen = site.seen
    if seen.tokens is None or moe.token_rule_for(site.module) is None or seen.inputs is None:
        return None
    args, kwargs = seen.inputs
    got = moe.stacked_experts_grads(site.module, args, kwargs, seen.out_grads[0], seen.live)
    return {k: v.float() for k, v in got.items() if k in site.params}


def token_check_problem(site: Site, batch: int | None) -> str | None:
    """Why a rule-less site on flattened tokens cannot be trusted per example: its module mixes
    the tokens of different examples (run on one example's slice, its outputs differ). Not
    asked of stacked experts or of a router of a known form (per token by their forwards'
    source; run on a slice outside the forward's autocast, a bf16 router's outputs would
    differ by rounding, and its top-k at near ties)."""
    seen = site.seen
    if seen.tokens is None or batch is None or seen.inputs is None:
        return None
    if moe.token_rule_for(site.module) is not None or router_form(site.module) is not None:
        return None
    with torch.no_grad():
        same = tokens.slices_agree(
            site.module, seen.inputs, seen.outputs, batch, seen.tokens[1], seen.live
        )
    return None if same else "mixes the tokens of different examples (not per token)"
