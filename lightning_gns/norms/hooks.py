"""Hooks that collect squared gradient norms during the normal backward pass.

* :class:`MicroBatchNorms` — a tensor hook per parameter sees each micro-batch's local
  gradient before it is accumulated into ``.grad`` (and before DDP averages it).
* :class:`PerExampleNorms` — forward hooks save each registered module's input, a hook on its
  output sees the output gradient, and a rule from :mod:`lightning_gns.norms.rules` turns the
  pair into per-example squared norms without materialising per-example gradients.

All results stay on the device: nothing on the per-step path reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns.norms.check import EagerWindow, StructuralCheck, not_a_batch
from lightning_gns.norms.compiled import Tap
from lightning_gns.norms.generic import generic_sq_norms, is_replaying, leaves_of, replaying
from lightning_gns.norms.rules import grad_sample_rule_for, module_norms, norm_rule_for
from lightning_gns.norms.simultaneous import can_route, qualifies, route, unroute

NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Unique parameters that require grad, in ``named_parameters`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def squared_norm(tensors: Iterable[Tensor | None]) -> Tensor | None:
    """Σ |t|² over the tensors (float32, on their device); None if there are none."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return None
    return torch.stack(torch._foreach_norm(ts, 2.0, dtype=torch.float32)).square().sum()


def coupled_modules(model: nn.Module) -> list[str]:
    """Modules in train mode that mix examples of a batch (BatchNorm and its subclasses): with
    them, per-example gradients are not defined (each example's output depends on the others)."""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


def looks_like_norm(module: nn.Module) -> bool:
    """Normalization layers: LayerNorm/RMSNorm/GroupNorm and subclasses, and look-alikes of
    other libraries (a class named "...Norm" with a per-feature weight, e.g. LlamaRMSNorm),
    BatchNorm excepted (it mixes examples)."""
    if isinstance(module, NORM_LAYERS):
        return True
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    name = type(module).__name__.lower()
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    return name.endswith("norm") and bool(own) and all(p.dim() == 1 for p in own)


def unrecognised_norm_layers(model: nn.Module) -> list[str]:
    """Modules named like a normalization layer ("...Norm") that no norm rule covers."""
    return [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if "norm" in type(m).__name__.lower()
        and not isinstance(m, NORM_LAYERS)
        and not isinstance(m, nn.modules.batchnorm._BatchNorm)
        and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


class BatchDimProbe:
    """Sees the batch dimension (0, or 1 where ``batch_first=False``) of the first input of every
    module with parameters during one forward: the model's own idea of how many examples a
    micro-batch holds (the most common value).

    A compiled model runs that forward eagerly (traced, the hooks would split its graph)."""

    def __init__(self, model: nn.Module) -> None:
        self.sizes: list[int] = []
        self._handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if any(True for _ in m.parameters(recurse=False))
        ]
        self._eager = EagerWindow()

    def _hook(self, module: nn.Module, args: tuple, output: object) -> None:
        dim = 1 if getattr(module, "batch_first", True) is False else 0  # (T, B, ...) layers
        if args and isinstance(args[0], Tensor) and args[0].dim() > dim:
            if not not_a_batch(args[0]):
                self.sizes.append(int(args[0].shape[dim]))

    def close(self) -> int | None:
        """Remove the hooks; the most common batch dimension seen, if any."""
        self._eager.close()
        for h in self._handles:
            h.remove()
        self._handles = []
        if not self.sizes:
            return None
        return max(set(self.sizes), key=self.sizes.count)


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

    def attach(self) -> None:
        self.detach()
        self._handles = [
            p.register_hook(self._hook_fp32 if p.dtype == torch.float32 else self._hook)
            for p in self.params
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
        if g.is_contiguous():
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


@dataclass
class _Site:
    """One hooked module: its rule, parameters and the input saved by the last forward."""

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    calls: int = 0
    activation: Tensor | None = None
    grad_output: Tensor | None = None  # kept only during the structural check
    shared: set[str] = field(default_factory=set)  # attrs whose weight is tied to another site
    handle: RemovableHandle | None = None
    active: bool = True
    generic: bool = False  # no rule: torch.func over the saved inputs (norms/generic.py)
    inputs: tuple[tuple, dict] | None = None  # generic: the forward's args and kwargs
    outputs: list[Any] = field(default_factory=list)  # generic: the output's leaves
    out_grads: dict[int, Tensor] = field(default_factory=dict)  # generic: their gradients
    positions: bool | None = None  # a 1-D input as long as the batch: positions (decided once)
    routed: bool = False  # its forward goes through norms/simultaneous.py while attached


# torch internals read in every forward hook (looked up once; absent in older torch)
_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)
_TOP_SAVED_TENSOR_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def recomputing() -> bool:
    """A forward inside a backward pass: activation checkpointing recomputing a segment.
    Non-reentrant checkpointing backpropagates through the first forward's graph (its hooks
    stand; the recomputation only restores saved tensors); reentrant checkpointing ran the first
    forward without grad, so the recomputation is the site's first call and is hooked."""
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() >= 0


def saving_through_hooks() -> bool:
    """Saved tensors go through hooks (non-reentrant activation checkpointing, CPU offload)."""
    return _TOP_SAVED_TENSOR_HOOKS is not None and _TOP_SAVED_TENSOR_HOOKS(False) is not None


def expand_positions(site: _Site, x: object, output: Tensor, b: int | None) -> tuple | None:
    """An embedding called on positions shared by the batch ((T,) or (1, T), as nanoGPT and
    Hugging Face do): (positions, output) expanded to the batch (None: not such a call), so
    each example's output gradient (before the broadcast sum) reaches the rule; the model
    computes the same values. A (T,) input with T = B counts as positions only once
    ``site.positions`` says so (decided on the first such call, see :func:`broadcast_positions`)."""
    if b is None or b < 2 or not isinstance(site.module, nn.Embedding):
        return None
    if not isinstance(x, Tensor) or x.is_floating_point() or x.dim() not in (1, 2):
        return None
    if x.dim() == 1 and (x.shape[0] != b or site.positions):
        return x.unsqueeze(0).expand(b, -1), output.unsqueeze(0).expand(b, *output.shape)
    if x.dim() == 2 and x.shape[0] == 1:
        return x.expand(b, -1), output.expand(b, *output.shape[1:])
    return None


def undecided_positions(site: _Site, x: object, b: int | None) -> bool:
    """A (B,) integer input to an embedding: positions or a batch, not decided yet."""
    return (
        isinstance(site.module, nn.Embedding)
        and isinstance(x, Tensor)
        and x.dim() == 1
        and x.shape[0] == b
        and site.positions is None
    )


def broadcast_positions(site: _Site, x: object, output: Tensor, b: int | None) -> Tensor | None:
    """:func:`expand_positions` in eager mode: decides ``site.positions`` once (a host read)
    and makes the expanded positions the site's activation; the expanded output, or None."""
    if undecided_positions(site, x, b):
        site.positions = not_a_batch(x)
    expanded = expand_positions(site, x, output, b)
    if expanded is None:
        return None
    site.activation = expanded[0]
    return expanded[1]


def _grad_saver(site: _Site, i: int):  # noqa: ANN202
    def save(g: Tensor) -> None:
        site.out_grads[i] = g.detach()

    return save


def rule_norms(site: _Site, a: Tensor, g: Tensor, shared: dict[int, Tensor]) -> Tensor | None:
    """Per-example squared norms of a site's own (untied) parameters by its rule; a weight tied
    to another site adds its per-example gradient to ``shared`` (summed over the sites)."""
    total, samples = module_norms(site.module, frozenset(site.shared), a, g)
    for attr, sample in samples.items():
        key = id(site.params[attr])
        shared[key] = sample if key not in shared else shared[key] + sample
    return total


def find_sites(model: nn.Module, layers: str) -> tuple[dict[str, _Site], dict[str, str]]:
    """Modules with a per-example rule (all, or the normalization layers) and, with a reason,
    those left out. A weight shared by several sites is summed per example (grad-sample rule)
    or, without one, its sites are left out."""
    sites: dict[str, _Site] = {}
    left_out: dict[str, str] = {}
    owners: dict[int, list[tuple[str, str]]] = {}
    for name, mod in model.named_modules():
        own = {k: p for k, p in mod.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        wanted = layers == "all" or looks_like_norm(mod)
        if not wanted:
            continue
        sites[name] = _Site(name, mod, own, generic=norm_rule_for(mod) is None)
        for attr, p in own.items():
            owners.setdefault(id(p), []).append((name, attr))
    for owner in owners.values():
        if len(owner) < 2:
            continue
        for name, attr in owner:
            site = sites.get(name)
            if site is None:
                continue
            if grad_sample_rule_for(site.module) is None:
                del sites[name]
                left_out[name] = f"weight '{attr}' is shared with another module"
            else:
                site.shared.add(attr)
    return sites, left_out


class PerExampleNorms:
    """Per-example squared gradient norms from module hooks, one rule per layer type.

    Args:
        model: the model to hook.
        layers: ``"all"`` registered layer types, or ``"norm"`` for LayerNorm/RMSNorm/GroupNorm
            only (the cheap transformer mode of Gray et al. 2024).
        per_layer: also keep per-example norms per module, for per-layer noise scales.
        examples_per_batch: compute norms for only the first k examples of each micro-batch
            (cost × k/B; still unbiased when batches are shuffled); None: all examples.
        simultaneous: where per-example gradients of a Linear layer are materialised anyway,
            derive its weight gradient from them instead of autograd's own product
            (:mod:`lightning_gns.norms.simultaneous`); False: leave autograd's backward alone.

    The first micro-batch after :meth:`start_check` runs a structural check: each module must
    be called once per forward on inputs with batch dimension ``batch_size``, and the gradient
    recomputed through the module alone must equal the parameter's whole micro-batch gradient
    (so a weight also used elsewhere, e.g. through ``F.linear``, is found). Failing modules are
    left out, with the reason in :attr:`left_out`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str = "all",
        per_layer: bool = False,
        examples_per_batch: int | None = None,
        simultaneous: bool = True,
    ) -> None:
        if layers not in ("all", "norm"):
            raise ValueError(f"layers must be 'all' or 'norm', got {layers!r}")
        if examples_per_batch is not None and (
            isinstance(examples_per_batch, bool)
            or not isinstance(examples_per_batch, int)
            or examples_per_batch < 1
        ):
            raise ValueError(
                f"examples_per_batch must be a positive int or None, got {examples_per_batch!r}"
            )
        self.model = model
        self.per_layer = per_layer
        self.examples_per_batch = examples_per_batch
        self.simultaneous = simultaneous
        self._params: list[nn.Parameter] | None = None
        self._acc: Tensor | None = None
        self._layer_acc: dict[str, Tensor] = {}
        self._shared_acc: dict[int, Tensor] = {}
        self._batch_size: int | None = None
        self._token_batch: int | None = None  # dim 0 of this forward's first 2-D token ids
        self._sinks: dict[str, Tensor] = {}  # per micro-batch: see _make_sinks
        self._tied_sinks: dict[int, Tensor] = {}
        self._bad: str | None = None
        self._check: StructuralCheck | None = None
        self.sites, self.left_out = find_sites(model, layers)

    # -- set-up ---------------------------------------------------------------------------
    def invalidate(self) -> None:
        """The covered parameters changed (the check moved some between sites)."""
        self._params = None

    def leave_out(self, name: str, reason: str) -> None:
        self._params = None
        site = self.sites.pop(name, None)
        if site is not None:
            site.active = False
            if site.handle is not None:
                site.handle.remove()
            self._unroute(site)
            self.left_out[name] = reason

    def _fail(self, site: _Site, reason: str) -> None:
        """A module broke an assumption. In the structural check it is left out for good; later
        only this micro-batch is dropped, so the covered parameters never change mid-run."""
        if self._check is not None:
            self.leave_out(site.name, reason)
        else:
            self._bad = f"module '{site.name}' {reason}"

    @property
    def params(self) -> list[nn.Parameter]:
        """Unique covered parameters."""
        if self._params is None:
            seen: dict[int, nn.Parameter] = {}
            for site in self.sites.values():
                for p in site.params.values():
                    seen.setdefault(id(p), p)
            self._params = list(seen.values())
        return self._params

    def coverage(self) -> float:
        """Fraction of trainable parameter elements covered."""
        total = sum(p.numel() for p in trainable_parameters(self.model))
        return sum(p.numel() for p in self.params) / total if total else 0.0

    def attach(self) -> None:
        self.detach()
        for site in self.sites.values():
            if site.generic:
                hook = self._make_generic_hook(site)
                site.handle = site.module.register_forward_hook(hook, with_kwargs=True)
            else:
                site.handle = site.module.register_forward_hook(self._make_forward_hook(site))
                if self.simultaneous and not site.shared and can_route(site.module):
                    route(site.module, self._sink_for_route(site))
                    site.routed = True

    def detach(self) -> None:
        for site in self.sites.values():
            if site.handle is not None:
                site.handle.remove()
                site.handle = None
            self._unroute(site)
        if self._check is not None:
            self._check.stop()
            self._check = None
        self._reset()

    # -- per micro-batch ------------------------------------------------------------------
    def start_micro_batch(self, batch_size: int | None) -> None:
        """Called before the forward of each micro-batch with its number of examples."""
        self._reset()
        self._batch_size = batch_size
        self._make_sinks(batch_size)

    def _make_sinks(self, b: int | None) -> None:
        """Leaves whose gradients receive the norms computed inside autograd (the simultaneous
        route, the compiled taps): one (n,) sink for the model, or one per site with
        ``per_layer``, and one (n, *shape) per tied weight; n examples are measured."""
        if b is None or not self.sites:
            return
        n = min(b, self.examples_per_batch or b)
        dev = self.params[0].device
        names = list(self.sites) if self.per_layer else [""]
        self._sinks = {k: torch.zeros(n, device=dev, requires_grad=True) for k in names}
        for site in self.sites.values():
            for attr in site.shared:
                p = site.params[attr]
                if id(p) not in self._tied_sinks:  # zeros that take no memory
                    zero = torch.zeros((), device=dev).expand(n, *p.shape)
                    self._tied_sinks[id(p)] = zero.requires_grad_()

    def _sink_for(self, site: _Site) -> Tensor | None:
        return self._sinks.get(site.name if self.per_layer else "")

    def _reset(self) -> None:
        self._acc = None
        self._layer_acc = {}
        self._shared_acc = {}
        self._sinks, self._tied_sinks = {}, {}
        self._bad = None
        self._token_batch = None
        for site in self.sites.values():
            site.calls = 0
            site.activation = None
            site.grad_output = None
            site.inputs, site.outputs, site.out_grads = None, [], {}

    # -- the simultaneous route (norms/simultaneous.py) ---------------------------------------
    def _unroute(self, site: _Site) -> None:
        if site.routed:
            unroute(site.module)
            site.routed = False

    def _sink_for_route(self, site: _Site):  # noqa: ANN202
        def sink_for(x: Tensor) -> Tensor | None:
            return self._route_sink(site, x)

        return sink_for

    def _route_sink(self, site: _Site, x: Tensor) -> Tensor | None:
        """The sink of this call's norms if it takes the simultaneous route; None: the plain
        forward and the hooks (the structural check, examples_per_batch, a broken micro-batch,
        a wrong batch, a call the route does not pay for)."""
        if not site.routed or self._check is not None or self.examples_per_batch is not None:
            return None
        if self._bad is not None or self.sites.get(site.name) is not site:
            return None
        if self._batch_size is None or x.shape[0] != self._batch_size:
            return None
        if not qualifies(site.module, x):
            return None
        return self._sink_for(site)

    def _make_forward_hook(self, site: _Site):  # noqa: ANN202
        eager = self._make_eager_hook(site)

        def hook(module: nn.Module, args: tuple, output: object) -> object:
            if torch.compiler.is_compiling():  # (the structural check runs eagerly)
                return self._tap(site, args, output)
            if self._check is None and saving_through_hooks():
                # activation checkpointing (or offloading) decides where saved tensors live:
                # the input is saved through autograd, not held here
                return self._tap(site, args, output)
            return eager(module, args, output)

        return hook

    def _tap(self, site: _Site, args: tuple, output: object) -> Tensor | None:
        """Under torch.compile: the output through :class:`~lightning_gns.norms.compiled.Tap`
        (no Python state is touched, so the graph stays whole). Eagerly under saved-tensor
        hooks too: Tap saves the input through autograd, so checkpointing frees it."""
        if is_replaying() or not torch.is_grad_enabled() or not args:
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        x, b = args[0], self._batch_size
        sink = self._sink_for(site)
        if sink is None or (isinstance(x, Tensor) and self._route_sink(site, x) is not None):
            return None  # no batch size given, or the simultaneous route delivers
        expanded = expand_positions(site, x, output, b)
        a, out = expanded if expanded is not None else (x, output)
        tied = tuple(sorted(site.shared))
        tied_sinks = [self._tied_sinks[id(site.params[attr])] for attr in tied]
        # a batch other than the one announced poisons the step (NaN), never a silent error
        mismatch = not isinstance(a, Tensor) or a.dim() == 0 or a.shape[0] != b
        poison = mismatch or out.dim() == 0 or out.shape[0] != b or undecided_positions(site, x, b)
        return Tap.apply(out, a, sink, site.module, tied, poison, *tied_sinks)

    def _make_eager_hook(self, site: _Site):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if is_replaying() or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not args:
                return
            if not output.requires_grad:
                return
            if site.calls and recomputing():  # the first call's hooks stand; same output shape
                expanded = expand_positions(site, args[0], output, self._batch_size)
                return expanded[1] if expanded is not None else None
            site.calls += 1
            if site.calls > 1:
                self._fail(site, f"called {site.calls} times in one forward")
                return
            if self._route_sink(site, args[0]) is not None:  # the route's backward has it
                return
            site.activation = args[0]
            if problem := self._positions_problem(site, args[0]):
                self._fail(site, problem)  # expanded to the wrong batch, the model would crash
                return
            broadcast = broadcast_positions(site, args[0], output, self._batch_size)
            if broadcast is not None:  # positions without a batch dim: per example from here
                output = broadcast
            elif self._check is not None and not_a_batch(args[0]):
                self._fail(site, "has inputs that are positions or parameters, not a batch")
                return
            base = output._base
            if base is not None and base.numel() == output.numel() and output.is_contiguous():
                # Linear on (B, T, d) returns a view of a 2-D product; an in-place op on that
                # view (e.g. relu_) reroutes autograd around its hooks, but not its base's.
                shape = output.shape
                base.register_hook(lambda g: self._backward(site, g.reshape(shape)))
            else:
                output.register_hook(lambda g: self._backward(site, g))
            return broadcast

        return hook

    def _positions_problem(self, site: _Site, x: object) -> str | None:
        """Eager mode: positions are expanded to the batch size announced, which the model then
        adds to its token embeddings; if an earlier embedding saw token ids (B', T) with another
        B', the expansion would break the user's forward: say so instead (shapes only)."""
        if not isinstance(site.module, nn.Embedding) or not isinstance(x, Tensor):
            return None
        if x.dim() == 2 and x.shape[0] > 1 and not x.is_floating_point():
            if self._token_batch is None:
                self._token_batch = int(x.shape[0])
            return None
        b, seen = self._batch_size, self._token_batch
        if seen is None or b is None or seen == b or x.is_floating_point() or x.dim() not in (1, 2):
            return None
        if x.dim() == 1 and x.shape[0] == b and site.positions is False:
            return None  # a batch of single tokens, decided before
        return (
            f"is called on positions shared by the batch, but the batch size was taken as {b} "
            f"and an earlier embedding sees {seen} examples; if {seen} is right, pass "
            "GradientNoiseScale(batch_size_fn=...)"
        )

    def _make_generic_hook(self, site: _Site):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if is_replaying() or not torch.is_grad_enabled():
                return
            leaves = leaves_of(output)
            if not any(isinstance(t, Tensor) and t.requires_grad for t in leaves):
                return
            if site.calls and recomputing():
                return
            site.calls += 1
            if site.calls > 1:
                self._fail(site, f"called {site.calls} times in one forward")
                return
            site.inputs, site.outputs = (args, kwargs), leaves
            for i, t in enumerate(leaves):
                if isinstance(t, Tensor) and t.requires_grad:
                    t.register_hook(_grad_saver(site, i))

        return hook

    def _generic(self, site: _Site) -> None:
        """Close a module without a rule: torch.func over its saved inputs (after backward)."""
        if site.inputs is None or not site.out_grads or not site.active:
            return
        b = self._batch_size or leaves_of(site.outputs)[0].shape[0]
        try:
            params, inputs, outs, grads = site.params, site.inputs, site.outputs, site.out_grads
            with replaying():  # the functional forward must not re-enter any hooks
                sq = generic_sq_norms(site.module, params, inputs, outs, grads, b)
        except Exception as err:  # noqa: BLE001 - never break the user's step
            kind, why = type(site.module).__name__, f"{type(err).__name__}: {err}"
            self._fail(site, f"{kind} has no rule and torch.func failed ({why})")
            return
        k = self.examples_per_batch
        self._add(site, sq[:k] if k is not None else sq)

    def _backward(self, site: _Site, g: Tensor) -> None:
        a = site.activation
        if a is None or not site.active or self._bad is not None:
            return
        b = self._batch_size
        if b is not None and (g.dim() == 0 or g.shape[0] != b or a.shape[:1] != g.shape[:1]):
            self._fail(site, f"has inputs without a batch dimension of size {b}")
            return
        if self._check is not None:
            site.grad_output = g.detach()
        k = self.examples_per_batch
        if k is not None and g.shape[0] > k:
            a, g = a[:k], g[:k]
        try:
            self._apply_rules(site, a, g)
        except Exception as err:  # noqa: BLE001 - never break the user's backward
            self._fail(site, f"its per-example rule failed ({type(err).__name__}: {err})")

    def _apply_rules(self, site: _Site, a: Tensor, g: Tensor) -> None:
        total = rule_norms(site, a, g, self._shared_acc)
        if total is not None:
            self._add(site, total)

    def _add(self, site: _Site, total: Tensor) -> None:
        self._acc = total if self._acc is None else self._acc + total
        if self.per_layer:
            prev = self._layer_acc.get(site.name)
            self._layer_acc[site.name] = total if prev is None else prev + total

    def close_micro_batch(self) -> tuple[Tensor | None, dict[str, Tensor], str | None]:
        """Per-example |g_j|² (B,) over covered parameters, per-layer ones, and a reason if the
        micro-batch cannot be used (a module reused within one forward, a missing batch dim)."""
        for site in list(self.sites.values()):
            if site.generic and self._bad is None:
                self._generic(site)
        acc, layers = self._acc, dict(self._layer_acc)
        for name, sink in self._sinks.items():  # norms computed inside autograd
            if sink.grad is None:
                continue
            acc = sink.grad if acc is None else acc + sink.grad
            if name:
                layers[name] = sink.grad if name not in layers else layers[name] + sink.grad
        shared = dict(self._shared_acc)
        for key, sink in self._tied_sinks.items():
            if sink.grad is not None:
                shared[key] = sink.grad if key not in shared else shared[key] + sink.grad
        for sample in shared.values():
            sq = sample.flatten(1).square().sum(1)
            acc = sq if acc is None else acc + sq
        if self._check is not None:
            self._check.finish()
            self._check = None
        bad = self._bad
        self._reset()
        return (None if bad else acc), layers, bad

    def start_check(self) -> None:
        """Run the structural check (see :mod:`lightning_gns.norms.check`) on the next
        micro-batch; failing modules are left out, with the reason in :attr:`left_out`."""
        self._check = StructuralCheck(self)
