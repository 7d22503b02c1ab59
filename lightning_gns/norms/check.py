"""The structural check run on the first micro-batch of the per-example source.

Per-example rules assume that each covered module is called once per forward, on inputs whose
dim 0 is the batch, and that its parameters get gradient only through that call. The check
records each parameter's whole micro-batch gradient, recomputes every module's own gradient
from its saved input and output gradient, and leaves out the modules where the two differ
(weights also used through ``F.linear``, modules reused, positional embeddings on ``arange``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns._compat import EagerWindow
from lightning_gns.norms.generic import as_param_dtype, leaves_of, replaying
from lightning_gns.norms.sites import Site

TOLERANCE = 1e-2  # relative difference between a module's own and the whole gradient
SCALE_FLOOR = 1e-3  # ... relative to at least this fraction of the module's whole gradient


class Checked(Protocol):
    """What the check reads and changes (:class:`~.per_example.PerExampleNorms`)."""

    sites: dict[str, Site]

    @property
    def params(self) -> list[nn.Parameter]: ...

    def drop(self, name: str, reason: str) -> None: ...

    def adopt(self, name: str, parent: str) -> None: ...


class StructuralCheck:
    """Records whole gradients during one backward, then verifies each site against them."""

    def __init__(self, norms: Checked) -> None:
        self.norms = norms
        self.grads: dict[int, Tensor] = {}
        self.handles: list[RemovableHandle] = [
            p.register_hook(self._recorder(id(p))) for p in norms.params
        ]
        self._eager = EagerWindow()

    def _recorder(self, key: int):  # noqa: ANN202
        def rec(grad: Tensor) -> None:
            self.grads[key] = grad.detach().clone()

        return rec

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._eager.close()

    def finish(self) -> None:
        """Leave out every site whose own gradient is not its parameters' whole gradient."""
        self.stop()  # the recomputation below must not overwrite the totals
        norms = self.norms
        _adopt_uncalled(norms)
        local: dict[int, Tensor] = {}
        for name, site in list(norms.sites.items()):
            reason = _call_problem(site)
            if reason is None:
                try:
                    with replaying():
                        for attr, gr in _local_grads(site).items():
                            key = id(site.params[attr])
                            local[key] = gr if key not in local else local[key] + gr
                except Exception as err:  # noqa: BLE001 - anything odd means: do not trust it
                    reason = f"could not verify its gradient ({err})"
            if reason is not None:
                norms.drop(name, reason)
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
                    reason = f"'{attr}' also gets gradient from outside this module (tied/reused?)"
                    norms.drop(name, reason)
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
