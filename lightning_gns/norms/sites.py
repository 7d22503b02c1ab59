"""Sites: the modules whose per-example norms are computed, each with its rule resolved once.

:func:`find_sites` walks the model once: every module with trainable parameters of its own
(all, or the normalization layers) becomes a :class:`Site` carrying its rule (``None``: the
torch.func fallback, :mod:`lightning_gns.norms.generic`) and what its forward and backward
leave during one micro-batch (:class:`Seen`, reset as one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns._compat import BATCH_NORM, RMS_NORM
from lightning_gns.norms.rules import (
    GradSampleRule,
    NormRule,
    apply_rules,
    grad_sample_rule_for,
    linear_flat_total,
    linear_norm,
    norm_rule_for,
)
from lightning_gns.norms.tokens import TokenMap

NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, *RMS_NORM, nn.GroupNorm)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Unique parameters that require grad, in ``named_parameters`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def describe(name: str, module: nn.Module) -> str:
    """How messages name a module: ``'1' (BatchNorm2d)``, ``the model (Linear)`` at the root."""
    kind = type(module).__name__
    return f"'{name}' ({kind})" if name else f"the model ({kind})"


def coupled_modules(model: nn.Module) -> list[str]:
    """Modules in train mode that mix examples of a batch (BatchNorm and its subclasses): with
    them, per-example gradients are not defined (each example's output depends on the others)."""
    return [
        describe(name, m)
        for name, m in model.named_modules()
        if isinstance(m, BATCH_NORM) and m.training
    ]


def looks_like_norm(module: nn.Module) -> bool:
    """Normalization layers: LayerNorm/RMSNorm/GroupNorm and subclasses, and look-alikes of
    other libraries (a class named "...Norm" with a per-feature weight, e.g. LlamaRMSNorm),
    BatchNorm excepted (it mixes examples)."""
    if isinstance(module, NORM_LAYERS):
        return True
    if isinstance(module, BATCH_NORM):
        return False
    name = type(module).__name__.lower()
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    return name.endswith("norm") and bool(own) and all(p.dim() == 1 for p in own)


def unrecognised_norm_layers(model: nn.Module) -> list[str]:
    """Modules named like a normalization layer ("...Norm") that no norm rule covers."""
    return [
        describe(name, m)
        for name, m in model.named_modules()
        if "norm" in type(m).__name__.lower()
        and not isinstance(m, (*NORM_LAYERS, *BATCH_NORM))
        and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


@dataclass
class Seen:
    """What one micro-batch's forward and backward left at a site."""

    calls: int = 0
    activation: Tensor | None = None  # the input the rule needs
    grad_output: Tensor | None = None  # kept only during the structural check
    inputs: tuple[tuple, dict] | None = None  # generic: the forward's args and kwargs
    outputs: list[Any] = field(default_factory=list)  # generic: the output's leaves
    out_grads: dict[int, Tensor] = field(default_factory=dict)  # generic: their gradients
    live: dict[str, Tensor] = field(default_factory=dict)  # generic: the tensors the forward
    # used (FSDP2 unshards parameters for the forward only; elsewhere the parameters)
    tokens: TokenMap | None = None  # its rows are flattened or gathered tokens (MoE)
    gate_call: Any = None  # stacked experts: their gate's moe.GateCall (moe.GateTap)
    early: Tensor | None = None  # stacked experts: their norms, computed during backward


@dataclass
class Site:
    """One hooked module: its parameters and rules (resolved once), and this micro-batch's
    :class:`Seen`."""

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    rule: NormRule | None  # None: no rule, torch.func over the saved inputs
    grad_sample_rule: GradSampleRule | None
    shared: set[str] = field(default_factory=set)  # attrs whose weight is tied to another site
    seen: Seen = field(default_factory=Seen)
    handle: RemovableHandle | None = None
    active: bool = True
    positions: bool | None = None  # a 1-D input as long as the batch: positions (decided once)
    shared_inputs: frozenset[int] = frozenset()  # generic: input leaves not from the batch
    routed: bool = False  # its forward goes through norms/simultaneous.py while attached
    tokenwise: bool = False  # its rule may see (B, T, ...) tokens for (B·T, ...) rows (MoE)
    embedding: bool = field(init=False)  # an nn.Embedding: its input may be shared positions
    relative: bool = False  # T5's relative bias: measured through its owner's compute_bias
    lean_hook: Any = None  # the output-gradient hook of its plain 2-D calls (site_hooks.py)

    def __post_init__(self) -> None:
        self.embedding = isinstance(self.module, nn.Embedding)

    @property
    def generic(self) -> bool:
        return self.rule is None

    @property
    def label(self) -> str:
        return describe(self.name, self.module)

    def norms(self, a: Tensor, g: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Per-example squared norms of its own parameters and per-example gradients of tied
        ones (:func:`~lightning_gns.norms.rules.apply_rules`)."""
        assert self.rule is not None
        if not self.shared and self.rule is linear_norm and a.dim() == 2:
            return linear_flat_total(self.module, a, g), {}  # the MLP's case, fewest ops
        tied = frozenset(self.shared)
        return apply_rules(self.rule, self.grad_sample_rule, self.module, tied, a, g)

    def remove_hook(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def find_sites(model: nn.Module, layers: str) -> tuple[dict[str, Site], dict[str, str]]:
    """Modules with a per-example rule (all, or the normalization layers) and, with a reason,
    those left out. A weight shared by several sites is summed per example (grad-sample rule)
    or, without one, its sites are left out."""
    sites: dict[str, Site] = {}
    left_out: dict[str, str] = {}
    owners: dict[int, list[tuple[str, str]]] = {}
    for name, mod in model.named_modules():
        own = {k: p for k, p in mod.named_parameters(recurse=False) if p.requires_grad}
        if not own or not (layers == "all" or looks_like_norm(mod)):
            continue
        sites[name] = Site(name, mod, own, norm_rule_for(mod), grad_sample_rule_for(mod))
        for attr, p in own.items():
            owners.setdefault(id(p), []).append((name, attr))
    for name in [n for n, site in sites.items() if _held_elsewhere(n, site, sites, owners)]:
        del sites[name]  # e.g. BERT's cls.predictions.bias, the decoder's bias: not left out
        for owner in owners.values():
            owner[:] = [o for o in owner if o[0] != name]
    for owner in owners.values():
        if len(owner) < 2:
            continue
        for name, attr in owner:
            site = sites.get(name)
            if site is None:
                continue
            if site.grad_sample_rule is None:
                del sites[name]
                left_out[name] = f"weight '{attr}' is shared with another module"
            else:
                site.shared.add(attr)
    return sites, left_out


def _held_elsewhere(
    name: str, site: Site, sites: dict[str, Site], owners: dict[int, list[tuple[str, str]]]
) -> bool:
    """A module without a rule whose every parameter is also held by a module with a
    per-example gradient rule (a tied bias: ``self.decoder.bias = self.bias``). The holders
    cover it; the structural check verifies that their gradients make up the whole one."""
    if site.grad_sample_rule is not None or site.rule is not None:
        return False
    return all(
        any(n != name and sites[n].grad_sample_rule is not None for n, _ in owners[id(p)])
        for p in site.params.values()
    )
