"""Per-example squared gradient norms from module hooks, one rule per layer type.

Forward hooks keep each covered module's input, a hook on its output sees the output gradient,
and the module's rule (:mod:`lightning_gns.norms.rules`) turns the pair into per-example
squared norms without materialising per-example gradients (:mod:`~lightning_gns.norms.site_hooks`).
All results stay on the device: nothing on the per-step path reads a value back to the host.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_gns.norms import moe, relative_bias, site_hooks
from lightning_gns.norms.check import StructuralCheck
from lightning_gns.norms.record import LinearRows, MicroBatchRecord
from lightning_gns.norms.simultaneous import can_route, qualifies, route, unroute
from lightning_gns.norms.sites import Seen, Site, find_sites, trainable_parameters
from lightning_gns.norms.tensor_parallel import hooks_first
from lightning_gns.norms.token_sites import TokenScopes, tokenwise


class PerExampleNorms:
    """Per-example squared gradient norms of a model's covered modules.

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
        sharded: parameters are sharded between forwards (FSDP2): the structural check reads
            the live tensors (:mod:`lightning_gns.norms.live_check`); no simultaneous route.

    The first micro-batch after :meth:`start_check` runs the structural check
    (:mod:`lightning_gns.norms.check`), which leaves out, through :meth:`drop`, the modules
    that break the rules' assumptions, with the reason in :attr:`left_out`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str = "all",
        per_layer: bool = False,
        examples_per_batch: int | None = None,
        simultaneous: bool = True,
        sharded: bool = False,
    ) -> None:
        if layers not in ("all", "norm"):
            raise ValueError(f"layers must be 'all' or 'norm', got {layers!r}")
        k = examples_per_batch
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"examples_per_batch must be a positive int or None, got {k!r}")
        self.model = model
        self.per_layer = per_layer
        self.examples_per_batch = examples_per_batch
        self.simultaneous = simultaneous and not sharded
        self.sharded = sharded
        self.record = MicroBatchRecord(per_layer)
        self._rows: LinearRows | None = None
        self._params: list[nn.Parameter] | None = None
        self._check: StructuralCheck | None = None
        self.sites, self.left_out = find_sites(model, layers)
        self.scopes = TokenScopes(model, list(self.sites))  # token maps for MoE layers

    # -- what is covered ------------------------------------------------------------------
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

    def drop(self, name: str, reason: str) -> None:
        """Leave a site out for good, with the reason."""
        site = self.sites.pop(name, None)
        if site is None:
            return
        self._params = None
        self.record.forget_sinks()
        site.active = False
        site.remove_hook()
        self._unroute(site)
        self.left_out[name] = reason

    def adopt(self, name: str, parent: str) -> None:
        """The site ``parent`` (a torch.func site) takes over the parameters of site ``name``,
        which its forward uses directly (``nn.MultiheadAttention`` reads ``out_proj.weight``
        without calling ``out_proj``)."""
        child, host = self.sites.pop(name), self.sites[parent]
        rel = name[len(parent) + 1 :] if parent else name
        for attr, p in child.params.items():
            host.params[f"{rel}.{attr}"] = p
        child.remove_hook()
        self._unroute(child)
        self._params = None
        self.record.forget_sinks()

    def fail(self, site: Site, reason: str) -> None:
        """A module broke an assumption. In the structural check it is left out for good; later
        only this micro-batch is dropped, so the covered parameters never change mid-run."""
        if self._check is not None:
            self.drop(site.name, reason)
        elif self.record.bad is None:
            self.record.bad = f"module {site.label} {reason}"

    # -- set-up ---------------------------------------------------------------------------
    def attach(self) -> None:
        self.detach()
        self.record.forget_sinks()
        self.scopes.attach()
        for site in self.sites.values():
            site.tokenwise = tokenwise(site.module)
            if site.generic:
                hook = site_hooks.generic_hook(self, site)
                site.handle = site.module.register_forward_hook(hook, with_kwargs=True)
                if moe.token_rule_for(site.module) is not None:
                    moe.tap_gate(site.module)  # the experts' z, kept for their rule
                continue
            hook = site_hooks.forward_hook(self, site)
            if self.simultaneous and not site.shared and can_route(site.module):
                route(site.module, self._route_for(site), hook)  # the hook runs in its forward
                site.routed = True
                continue
            first = hooks_first(site.module)  # tensor parallel: before the style's output hook
            site.handle = site.module.register_forward_hook(hook, prepend=first)
            owner = relative_bias.bias_owner(self.model, site.name, site.module)
            if owner is not None:  # T5's relative position bias (norms/relative_bias.py)
                relative_bias.attach(owner, self, site)
                site.relative = True

    def detach(self) -> None:
        self.scopes.detach()
        for site in self.sites.values():
            site.remove_hook()
            self._unroute(site)
        if self._check is not None:
            self._check.stop()
            self._check = None
        self._reset(None)
        self._rows = None

    # -- per micro-batch ------------------------------------------------------------------
    @property
    def checking(self) -> bool:
        return self._check is not None

    def start_check(self, batch: Any = None) -> None:
        """Run the structural check on the next micro-batch (``batch``: its tensors as the model
        gets them, so the check can tell inputs computed from the batch from others)."""
        self._check = StructuralCheck(self, batch, live=self.sharded)

    def from_batch(self, x: object) -> bool | None:
        """During the check: whether ``x`` was computed from the batch (None: unknown)."""
        return self._check.from_batch(x) if self._check is not None else None

    def start_micro_batch(self, batch_size: int | None) -> None:
        """Called before the forward of each micro-batch with its number of examples."""
        self._reset(batch_size)
        self.scopes.start(batch_size)
        if batch_size is not None and self.sites:
            n = min(batch_size, self.examples_per_batch or batch_size)
            self.record.make_sinks(self.sites, n, self.params[0].device)

    def _reset(self, batch_size: int | None) -> None:
        self.record.reset(batch_size)
        for site in self.sites.values():
            if site.seen.calls or site.seen.inputs is not None:  # else still fresh
                site.seen = Seen()

    def close_micro_batch(self) -> tuple[Tensor | None, dict[str, Tensor], str | None]:
        """Per-example |g_j|² (B,) over covered parameters, per-layer ones, and a reason if the
        micro-batch cannot be used (a module reused within one forward, a missing batch dim)."""
        if self._check is not None:
            self._check.end_forward()
        for site in list(self.sites.values()):
            if site.generic and self.record.bad is None:
                site_hooks.close_generic(self, site)
        acc, layers = self.record.close()
        if self._check is not None:
            self._check.finish()
            self._check = None
            self.scopes.keep_used()
        bad = self.record.bad
        rows = self.record.rows
        self._rows = rows if rows and bad is None else None
        self._reset(None)
        return (None if bad else acc), layers, bad

    def take_rows(self) -> LinearRows | None:
        """With ``record.defer_rows``, the row norms of the plain 2-D Linears of the micro-batch
        just closed (:class:`LinearRows`; None: none, or it was not usable)."""
        rows, self._rows = self._rows, None
        return rows

    # -- the simultaneous route (norms/simultaneous.py) -----------------------------------
    def _unroute(self, site: Site) -> None:
        moe.untap_gate(site.module)
        if site.relative:
            owner = relative_bias.bias_owner(self.model, site.name, site.module)
            if owner is not None:
                relative_bias.detach(owner)
            site.relative = False
        if site.routed:
            unroute(site.module)
            site.routed = False

    def _route_for(self, site: Site):  # noqa: ANN202
        def sink_for(x: Tensor) -> Tensor | None:
            return self.route_sink(site, x)

        return sink_for

    def route_sink(self, site: Site, x: Tensor) -> Tensor | None:
        """The sink of this call's norms if it takes the simultaneous route; None: the plain
        forward and the hooks (the structural check, examples_per_batch, a broken micro-batch,
        a wrong batch, a call the route does not pay for)."""
        if not site.routed or self._check is not None or self.examples_per_batch is not None:
            return None
        record = self.record
        if record.bad is not None or self.sites.get(site.name) is not site:
            return None
        if record.batch_size is None or x.shape[0] != record.batch_size:
            return None
        if not qualifies(site.module, x):
            return None
        return record.sink_for(site)
