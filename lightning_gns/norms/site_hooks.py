"""The hooks of one site: its forward hook keeps what the rule needs, its output's gradient
hook applies the rule (eagerly), or its output goes through a compiled tap.

* eager (the default): the forward hook saves the layer's input and registers a hook on its
  output; the output's gradient and the saved input go through the site's rule in backward.
* tapped (under ``torch.compile``, or eagerly under saved-tensor hooks such as non-reentrant
  checkpointing): the output goes through :class:`~lightning_gns.norms.compiled.Tap`, which
  saves the input through autograd and sends the norms to a sink; no Python state is touched.
* generic (no rule): the forward's args and kwargs and its outputs' gradients are kept, and
  torch.func computes the norms after backward (:mod:`lightning_gns.norms.generic`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_gns._compat import in_backward_pass, saving_through_hooks, tree_flatten, view_base
from lightning_gns.host_sync import CHECK, on_step_path
from lightning_gns.norms.compiled import Tap
from lightning_gns.norms.generic import (
    generic_sq_norms,
    is_replaying,
    leaves_of,
    own_outputs,
    rebuild,
    replaying,
)
from lightning_gns.norms.moe import gate_call
from lightning_gns.norms.moe_compiled import compiled_hook
from lightning_gns.norms.positions import (
    broadcast_positions,
    expand_positions,
    expanded_to_batch,
    not_a_batch,
    positions_problem,
    token_batch_of,
    undecided_positions,
)
from lightning_gns.norms.record import MicroBatchRecord
from lightning_gns.norms.rules import linear_norm, linear_wants
from lightning_gns.norms.sites import Site
from lightning_gns.norms.token_sites import (
    TokenScopes,
    first_tensor,
    norms_when_backward_passes,
    token_site_norms,
)
from lightning_gns.norms.tokens import as_examples, to_examples


class Norms(Protocol):
    """What the hooks need from :class:`~lightning_gns.norms.per_example.PerExampleNorms`."""

    record: MicroBatchRecord
    examples_per_batch: int | None
    scopes: TokenScopes

    @property
    def checking(self) -> bool: ...

    def route_sink(self, site: Site, x: Tensor) -> Tensor | None: ...

    def from_batch(self, x: object) -> bool | None: ...

    def fail(self, site: Site, reason: str) -> None: ...


Hook = Callable[..., Any]
NOT_FROM_BATCH = (
    "has inputs not computed from the batch (positions, buckets or parameters shared by all "
    "examples): its dim 0 does not hold examples"
)


def forward_hook(norms: Norms, site: Site) -> Hook:
    """The forward hook of a site with a rule."""

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        if torch.compiler.is_compiling():  # (the structural check runs eagerly)
            return tap(norms, site, args, output)
        if not norms.checking and saving_through_hooks():
            # activation checkpointing (or offloading) decides where saved tensors live:
            # the input is saved through autograd, not held here
            return tap(norms, site, args, output)
        return eager(norms, site, args, output)

    return on_step_path(hook)


def tap(norms: Norms, site: Site, args: tuple, output: object) -> Tensor | None:
    """The output through :class:`~lightning_gns.norms.compiled.Tap` (no Python state is
    touched, so a compiled graph stays whole; the input is saved through autograd)."""
    if is_replaying() or not torch.is_grad_enabled() or not args:
        return None
    if not isinstance(output, Tensor) or not output.requires_grad:
        return None
    record = norms.record
    x, b = args[0], record.batch_size
    sink = record.sink_for(site)
    if sink is None or (isinstance(x, Tensor) and norms.route_sink(site, x) is not None):
        return None  # no batch size given, or the simultaneous route delivers
    expanded = expand_positions(site, x, output, b)
    a, out = expanded if expanded is not None else (x, output)
    flat = _flattened_tokens(norms, site, x, output, b) if expanded is None else None
    relative = site.relative  # measured eagerly only (norms/relative_bias.py): poisoned here
    if flat is not None:  # (B·T, ...) rows of a flatten (MoE) viewed as (B, T, ...)
        a, out = flat
    tied = tuple(sorted(site.shared))
    tied_sinks = [record.tied_sinks[id(site.params[attr])] for attr in tied]
    # a batch other than the one announced poisons the step (NaN), never a silent error
    mismatch = not isinstance(a, Tensor) or a.dim() == 0 or a.shape[0] != b
    poison = mismatch or out.dim() == 0 or out.shape[0] != b or undecided_positions(site, x, b)
    poison = poison or relative
    rules = (site.rule, site.grad_sample_rule)
    tapped = Tap.apply(out, a, sink, site.module, rules, tied, poison, *tied_sinks)
    return tapped if flat is None else tapped.reshape(output.shape)


def _flattened_tokens(
    norms: Norms, site: Site, x: object, output: Tensor, b: int | None
) -> tuple[Tensor, Tensor] | None:
    """(input, output) viewed as (B, T, ...) when a token-wise site's input is the (B·T, ...)
    flatten of a (B, ...) tensor, read eagerly (activation checkpointing), or under
    torch.compile as the eager steps found it (``TokenScopes.map_for``); gathered rows need a
    scatter: they poison the step, as any input without a batch dimension does."""
    if not site.tokenwise or b is None or not isinstance(x, Tensor):
        return None
    tokens = norms.scopes.map_for(site.name, x)
    if tokens is None or tokens[0] is not None:
        return None
    return as_examples(x, b, tokens[1]), as_examples(output, b, tokens[1])


def eager(norms: Norms, site: Site, args: tuple, output: object) -> Tensor | None:
    """Save the input, hook the output's gradient (or its base's, see below)."""
    if is_replaying() or not torch.is_grad_enabled():
        return None
    if not isinstance(output, Tensor) or not args or not output.requires_grad:
        return None
    record, x = norms.record, args[0]
    if site.lean_hook is not False and _lean(norms, site, x, output):
        return None
    if site.seen.calls and in_backward_pass():  # a recomputation: the first call's hooks stand
        expanded = expand_positions(site, x, output, record.batch_size)
        return expanded[1] if expanded is not None else None
    site.seen.calls += 1
    if site.seen.calls > 1:
        norms.fail(site, f"called {site.seen.calls} times in one forward")
        return None
    if site.relative:  # T5's bucket ids (q, k): the owner's compute_bias hooks the gradient
        site.seen.activation = x  # (norms/relative_bias.py)
        return None
    routable = site.routed and isinstance(x, Tensor) and x.dim() > 2  # (route: sequences)
    if routable and norms.route_sink(site, x) is not None:  # the route's backward has it
        return None
    site.seen.activation = x
    b = record.batch_size
    if site.tokenwise and not (isinstance(x, Tensor) and x.dim() and x.shape[0] == b):
        site.seen.tokens = norms.scopes.map_for(site.name, x)  # (B·T, ...) rows of tokens (MoE)
    broadcast = None
    if site.embedding:  # positions shared by the batch are only ever an embedding's input
        if record.token_batch is None:
            record.token_batch = token_batch_of(site, x)
        if problem := positions_problem(site, x, record.batch_size, record.token_batch):
            norms.fail(site, problem)  # expanded to the wrong batch, the model would crash
            return None
    if site.embedding or norms.checking:
        origin = norms.from_batch(x) if norms.checking else None
        broadcast = broadcast_positions(site, x, output, record.batch_size, origin)
        if broadcast is not None:  # positions without a batch dim: per example from here
            output = broadcast
        elif origin is False and expanded_to_batch(x, record.batch_size):
            pass  # one row broadcast to every example: each example has its own output row
        elif origin is False or (norms.checking and origin is None and not_a_batch(x)):
            norms.fail(site, NOT_FROM_BATCH)
            return None
    base = view_base(output)
    if base is not None and base.numel() == output.numel() and output.is_contiguous():
        # Linear on (B, T, d) returns a view of a 2-D product; an in-place op on that view
        # (e.g. relu_) reroutes autograd around its hooks, but not its base's.
        shape = output.shape
        base.register_hook(on_step_path(lambda g: on_output_grad(norms, site, g.reshape(shape))))
    else:
        output.register_hook(on_step_path(lambda g: on_output_grad(norms, site, g)))
    return broadcast


def _lean(norms: Norms, site: Site, x: object, output: Tensor) -> bool:
    """The common call, in the fewest steps: a plain layer (no positions, tied or relative
    weights) on a 2-D input of the batch's examples, outside the check, whose output is not a
    view. What :func:`eager` would do then: keep the input and hook the output's gradient,
    here through a pre-hook of its autograd node (the same gradient, in-place ops after it
    included)."""
    hook = site.lean_hook
    if hook is None:  # decided once per site (its kind does not change while attached)
        plain = not (site.embedding or site.relative or site.shared)
        site.lean_hook = hook = _lean_hook(norms, site) if plain else False
        if not plain:
            return False
    if site.seen.calls or norms.checking:
        return False
    node = output.grad_fn
    if not isinstance(x, Tensor) or x.dim() != 2 or node is None or output._base is not None:
        return False
    if output.output_nr != 0:  # the pre-hook reads its node's first output gradient
        return False
    if site.tokenwise and x.shape[0] != norms.record.batch_size:
        return False  # (B·T, d) rows of tokens (MoE): the token map is needed
    site.seen.calls = 1
    site.seen.activation = x
    node.register_prehook(on_step_path(hook) if CHECK.enabled else hook)
    return True


def _lean_hook(norms: Norms, site: Site) -> Callable[[tuple], None]:
    module, linear = site.module, site.rule is linear_norm

    def hook(grad_outputs: tuple) -> None:
        g = grad_outputs[0]
        if g is None:
            return
        rows, a = norms.record.rows, site.seen.activation
        if rows is not None and linear and a is not None and site.active:
            if norms.record.bad is None and rows.add(a, g, *linear_wants(module)):
                return  # a Linear's row norms, combined at the step (norms/record.py)
        on_output_grad(norms, site, g)

    return hook


def on_output_grad(norms: Norms, site: Site, g: Tensor) -> None:
    """Backward: the site's rule on its saved input and this output gradient."""
    record, a = norms.record, site.seen.activation
    if a is None or not site.active or record.bad is not None:
        return
    b = record.batch_size
    if norms.checking:
        site.seen.grad_output = g.detach()
    tokens = site.seen.tokens
    if tokens is not None and b is not None:  # rows of flattened or gathered tokens (MoE)
        a, g = to_examples(a, tokens, b), to_examples(g, tokens, b)
    if b is not None and (g.dim() == 0 or g.shape[0] != b or a.shape[:1] != g.shape[:1]):
        norms.fail(site, f"has inputs without a batch dimension of size {b}")
        return
    k = norms.examples_per_batch
    if k is not None and g.shape[0] > k:
        a, g = a[:k], g[:k]
    try:
        total, samples = site.norms(a, g)
    except Exception as err:  # noqa: BLE001 - never break the user's backward
        norms.fail(site, f"its per-example rule failed ({type(err).__name__}: {err})")
        return
    if samples:
        record.add_tied(site, samples)
    if total is not None:
        record.add(site, total)


def generic_hook(norms: Norms, site: Site) -> Hook:
    """The forward hook of a site without a rule: keep its inputs and its outputs' gradients
    (under torch.compile, routers and stacked experts go through taps: norms/moe_compiled.py)."""
    compiled = compiled_hook(norms, site)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if compiled is not None and torch.compiler.is_compiling():
            tapped = compiled(module, args, kwargs, output)
            if tapped is not None:
                return tapped
        call = gate_call(module)  # stacked experts: their gate's call, taken at every call
        try:
            return keep(module, args, kwargs, output, call)
        finally:
            if call is not None and site.seen.gate_call is not call:
                call.drop()  # not kept: nothing of it outlives the forward

    def keep(module: nn.Module, args: tuple, kwargs: dict, output: object, call: Any) -> object:
        if is_replaying() or not torch.is_grad_enabled():
            return None
        leaves = leaves_of(output)
        if not any(isinstance(t, Tensor) and t.requires_grad for t in leaves):
            return None
        if site.seen.calls and in_backward_pass():
            return None
        site.seen.calls += 1
        if site.seen.calls > 1:
            norms.fail(site, f"called {site.seen.calls} times in one forward")
            return None
        fresh = own_outputs(leaves)  # each output's hook sees only its gradient from outside
        site.seen.inputs, site.seen.outputs = (args, kwargs), fresh
        site.seen.live = _live_copies(module, site)
        site.seen.tokens = norms.scopes.map_for(site.name, first_tensor((args, kwargs)))
        site.seen.gate_call = call
        if call is not None and not norms.checking:
            call.then = norms_when_backward_passes(site, norms.record.batch_size)
        if norms.checking:
            shared = _not_from_batch(norms, (args, kwargs))
            if shared is True:
                norms.fail(site, NOT_FROM_BATCH)
                return None
            if isinstance(shared, frozenset):
                site.shared_inputs = shared
        for i, t in enumerate(fresh):
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(on_step_path(_grad_saver(site, i)))
        return rebuild(output, fresh) if fresh is not leaves else None

    return on_step_path(hook)


def _live_copies(module: nn.Module, site: Site) -> dict[str, Tensor]:
    """Copies of the tensors the forward used where they are not the registered parameters
    (FSDP2 unshards for the forward and frees them after: torch.func runs after backward)."""
    live = {}
    for attr, p in site.params.items():
        t = getattr(module, attr, None) if "." not in attr else None
        if isinstance(t, Tensor) and t is not p:
            live[attr] = t.detach().clone()
    return live


def _not_from_batch(norms: Norms, inputs: tuple) -> frozenset[int] | bool | None:
    """The check's verdict on a rule-less site's inputs: the leaf indices not computed from
    the batch (shared by all examples), True when no input is, None when unknown."""
    leaves, _ = tree_flatten(inputs)
    origins = {i: norms.from_batch(t) for i, t in enumerate(leaves) if isinstance(t, Tensor)}
    if not origins or any(o is None for o in origins.values()):
        return None
    if not any(origins.values()):
        return True
    return frozenset(i for i, o in origins.items() if o is False)


def _grad_saver(site: Site, i: int) -> Callable[[Tensor], None]:
    def save(g: Tensor) -> None:
        site.seen.out_grads[i] = g.detach()

    return save


def close_generic(norms: Norms, site: Site) -> None:
    """After backward: torch.func over a rule-less site's saved inputs."""
    seen = site.seen
    if seen.inputs is None or not seen.out_grads or not site.active:
        return
    b = norms.record.batch_size or leaves_of(seen.outputs)[0].shape[0]
    try:
        with replaying():  # the functional forward must not re-enter any hooks
            if seen.tokens is not None:  # flattened tokens (MoE routers, stacked experts)
                sq = token_site_norms(site, b)
            else:
                sq = generic_sq_norms(
                    site.module,
                    {**site.params, **seen.live},  # type: ignore[dict-item]
                    seen.inputs,
                    seen.outputs,
                    seen.out_grads,
                    b,
                    site.shared_inputs,
                )
    except Exception as err:  # noqa: BLE001 - never break the user's step
        kind, why = type(site.module).__name__, f"{type(err).__name__}: {err}"
        norms.fail(site, f"{kind} has no rule and torch.func failed ({why})")
        return
    k = norms.examples_per_batch
    norms.record.add(site, sq[:k] if k is not None else sq)
