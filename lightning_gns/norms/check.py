"""The structural check run on the first micro-batch of the per-example source.

Per-example rules assume that each covered module is called once per forward, on inputs whose
dim 0 is the batch, and that its parameters get gradient only through that call. The check
records each parameter's whole micro-batch gradient, recomputes every module's own gradient
from its saved input and output gradient, and leaves out the modules where the two differ
(weights also used through ``F.linear``, modules reused, positional embeddings on ``arange``).
During its forward it also follows which tensors were computed from the batch
(:mod:`lightning_gns.norms.provenance`): a layer whose input was not cannot be measured per
example through dim 0, even where that dim equals the batch size by coincidence.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns._compat import EagerWindow, in_backward_pass
from lightning_gns.norms.generic import as_param_dtype, leaves_of, replaying
from lightning_gns.norms.live_check import LiveGradCheck
from lightning_gns.norms.provenance import BatchProvenance
from lightning_gns.norms.record import MicroBatchRecord
from lightning_gns.norms.sites import Site
from lightning_gns.norms.token_sites import token_check_problem, token_local_grads

TOLERANCE = 1e-2  # relative difference between a module's own and the whole gradient
OUTSIDE = "also gets gradient from outside this module (tied/reused?)"
SCALE_FLOOR = 1e-3  # ... relative to at least this fraction of the module's whole gradient
UNUSED = (
    "not called in the first step, whose batch gave its parameters no gradient (not verified, "
    "so not measured per example; source='micro_batch' measures every parameter)"
)


class Checked(Protocol):
    """What the check reads and changes (:class:`~.per_example.PerExampleNorms`)."""

    sites: dict[str, Site]
    record: MicroBatchRecord

    @property
    def params(self) -> list[nn.Parameter]: ...

    def drop(self, name: str, reason: str) -> None: ...

    def adopt(self, name: str, parent: str) -> None: ...


class StructuralCheck:
    """Records whole gradients during one backward, then verifies each site against them."""

    def __init__(self, norms: Checked, batch: Any = None, live: bool = False) -> None:
        self.norms = norms
        self.grads: dict[int, Tensor] = {}
        # sharded parameters (FSDP2): the tensors the forward uses, compared during backward
        self.live = LiveGradCheck(norms.sites) if live else None
        self.handles: list[RemovableHandle] = [
            p.register_hook(self._recorder(id(p))) for p in (norms.params if not live else [])
        ]
        self._eager = EagerWindow()
        # which inputs were computed from the batch (None: not known, shapes decide)
        self.provenance = BatchProvenance(batch).__enter__() if batch is not None else None

    def end_forward(self) -> None:
        """Stop following provenance (it is needed in the forward only)."""
        if self.provenance is not None and self.provenance.active:
            self.provenance.__exit__(None, None, None)

    def from_batch(self, x: object) -> bool | None:
        """Whether ``x`` was computed from the batch (None: no batch was given, or a forward
        inside backward: a reentrant checkpoint recomputes its segment on detached inputs,
        which were never followed)."""
        if self.provenance is None or in_backward_pass():
            return None
        return self.provenance.from_batch(x)

    def _recorder(self, key: int):  # noqa: ANN202
        def rec(grad: Tensor) -> None:
            self.grads[key] = grad.detach().clone()

        return rec

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.live is not None:
            self.live.stop()
        self._eager.close()
        self.end_forward()

    def finish(self) -> None:
        """Leave out every site whose own gradient is not its parameters' whole gradient."""
        self.stop()  # the recomputation below must not overwrite the totals
        norms = self.norms
        _adopt_uncalled(norms)
        local: dict[int, Tensor] = {}
        for name, site in list(norms.sites.items()):
            reason = _call_problem(site)
            grads = (self.grads.get(id(p)) for p in site.params.values())
            if site.seen.calls == 0 and self.live is None and all(g is None for g in grads):
                reason = UNUSED  # (not a direct use of its parameters: none at all)
            if reason is None:  # a router on flattened tokens must not mix examples
                reason = token_check_problem(site, norms.record.batch_size)
            if reason is None and self.live is not None:
                if self.live.error(name, SCALE_FLOOR) > TOLERANCE:
                    reason = (
                        OUTSIDE
                        if self.live.error(name, SCALE_FLOOR) < float("inf")
                        else ("its gradient could not be verified under sharding")
                    )
            elif reason is None:
                try:
                    with replaying():
                        for attr, gr in _local_grads(site).items():
                            key = id(site.params[attr])
                            local[key] = gr if key not in local else local[key] + gr
                except Exception as err:  # noqa: BLE001 - anything odd means: do not trust it
                    reason = f"could not verify its gradient ({err})"
            if reason is not None:
                norms.drop(name, reason)
        if self.live is not None:
            self.grads = {}
            return
        for name, site in list(norms.sites.items()):
            totals = [self.grads.get(id(p)) for p in site.params.values()]
            # a parameter whose gradient is ~0 against its module's (a key bias under softmax)
            # is compared at the module's scale: rounding noise is not a second use
            seen = [t.float().norm() for t in totals if t is not None]
            scale = float(torch.stack(seen).norm()) if seen else 0.0
            for attr, p in site.params.items():
                total, mine = self.grads.get(id(p)), local.get(id(p))
                if total is None or mine is None:
                    norms.drop(name, f"no gradient seen for '{attr}'")
                    break
                size = max(float(total.float().norm()), SCALE_FLOOR * scale, 1e-30)
                rel = float((mine - total.float()).norm()) / size
                if rel > TOLERANCE:
                    norms.drop(name, f"'{attr}' {OUTSIDE}")
                    break
        self.grads = {}


def _adopt_uncalled(norms: Checked) -> None:
    """A module whose parameters its parent uses directly (``nn.MultiheadAttention`` reads
    ``out_proj.weight`` without calling ``out_proj``) is never called: when the nearest called
    ancestor is covered by the torch.func fallback, that ancestor takes its parameters."""
    for name, site in list(norms.sites.items()):
        if site.seen.calls != 0 or not name:
            continue
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent_name = ".".join(parts[:cut])
            parent = norms.sites.get(parent_name)
            if parent is not None and parent.generic and parent.seen.calls == 1:
                norms.adopt(name, parent_name)
                break


def _call_problem(site: Site) -> str | None:
    seen = site.seen
    if seen.calls == 0:
        return "not called through its forward (parameters used directly)"
    if seen.calls > 1:
        return f"called {seen.calls} times in one forward"
    if site.generic:
        return None if seen.out_grads else "its output got no gradient in backward"
    if seen.grad_output is None or seen.activation is None:
        return "its output got no gradient in backward"
    return None


def _local_grads(site: Site) -> dict[str, Tensor]:
    """The gradient of the site's parameters through this module alone (float32)."""
    params = list(site.params.values())
    own = token_local_grads(site)  # stacked experts: their rule's own recomputation
    if own is not None:
        return own
    if site.generic:
        grads = _generic_local_grads(site, params)
    else:
        mod, a, g = site.module, site.seen.activation, site.seen.grad_output
        assert a is not None and g is not None
        x = a.detach().to(params[0].dtype) if a.is_floating_point() else a.detach()
        with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            out = mod(x)
            grads = torch.autograd.grad(out, params, g.to(out.dtype), allow_unused=True)
    return {
        attr: gr.float()
        for (attr, _), gr in zip(site.params.items(), grads, strict=True)
        if gr is not None
    }


def _generic_local_grads(site: Site, params: list[nn.Parameter]) -> tuple:
    """Re-run a rule-less module on its saved inputs; gradients from its saved output grads."""
    seen = site.seen
    assert seen.inputs is not None
    args, kwargs = as_param_dtype(seen.inputs, site.params)
    with torch.enable_grad(), torch.autocast(device_type=params[0].device.type, enabled=False):
        out = leaves_of(site.module(*args, **kwargs))
        used = sorted(seen.out_grads)
        return torch.autograd.grad(
            [out[i] for i in used],
            params,
            [seen.out_grads[i].to(out[i].dtype) for i in used],
            allow_unused=True,
        )
