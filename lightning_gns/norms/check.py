"""The structural check run on the first micro-batch of the per-example source.

Per-example rules assume that each covered module is called once per forward, on inputs whose
dim 0 is the batch, and that its parameters get gradient only through that call. The check
records each parameter's whole micro-batch gradient, recomputes every module's own gradient
from its saved input and output gradient, and leaves out the modules where the two differ
(weights also used through ``F.linear``, modules reused, positional embeddings on ``arange``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns.norms.generic import as_param_dtype, leaves_of, replaying

if TYPE_CHECKING:
    from lightning_gns.norms.hooks import PerExampleNorms, _Site

TOLERANCE = 1e-2  # relative difference between a module's own and the whole gradient
SCALE_FLOOR = 1e-3  # ... relative to at least this fraction of the module's whole gradient


def not_a_batch(x: object) -> bool:
    """Inputs whose dim 0 cannot be examples: a parameter, or positions arange(s, s + n) (a
    positional embedding), which would pass the batch-size check when n equals the batch."""
    if isinstance(x, nn.Parameter):
        return True
    if isinstance(x, Tensor) and x.dim() == 1 and x.numel() > 1 and not x.is_floating_point():
        steps = torch.arange(x.numel(), device=x.device, dtype=x.dtype)
        return bool(torch.equal(x - x[0], steps))
    return False


# A compiled model runs the steps that record Python state in hooks (the structural check, the
# batch probe) eagerly: traced, such hooks split the graph, and dynamo keeps the split code after
# they are gone (hooks are not guarded). Windows may overlap (two callbacks on one model): the
# first to start turns compilation off, the last to stop restores it.
_EAGER: dict[str, Any] = {"depth": 0, "restore": None}


class EagerWindow:
    """Compiled code runs eagerly from construction until :meth:`close` (idempotent)."""

    def __init__(self) -> None:
        if _EAGER["depth"] == 0:
            _EAGER["restore"] = torch.compiler.set_stance("force_eager")
        _EAGER["depth"] += 1
        self.open = True

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        _EAGER["depth"] -= 1
        if _EAGER["depth"] == 0:
            _EAGER["restore"].__exit__(None, None, None)
            _EAGER["restore"] = None


class StructuralCheck:
    """Records whole gradients during one backward, then verifies each site against them."""

    def __init__(self, norms: PerExampleNorms) -> None:
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
                norms.leave_out(name, reason)
        for name, site in list(norms.sites.items()):
            totals = [self.grads.get(id(p)) for p in site.params.values()]
            # a parameter whose gradient is ~0 against its module's (a key bias under softmax)
            # is compared at the module's scale: rounding noise is not a second use
            seen = [t.float().norm() for t in totals if t is not None]
            scale = float(torch.stack(seen).norm()) if seen else 0.0
            for attr, p in site.params.items():
                total, mine = self.grads.get(id(p)), local.get(id(p))
                if total is None or mine is None:
                    norms.leave_out(name, f"no gradient seen for '{attr}'")
                    break
                size = max(float(total.float().norm()), SCALE_FLOOR * scale, 1e-30)
                err = float((mine - total.float()).norm()) / size
                if err > TOLERANCE:
                    reason = f"'{attr}' also gets gradient from outside this module (tied/reused?)"
                    norms.leave_out(name, reason)
                    break
        self.grads = {}


def _adopt_uncalled(norms: PerExampleNorms) -> None:
    """A module whose parameters its parent uses directly (``nn.MultiheadAttention`` reads
    ``out_proj.weight`` without calling ``out_proj``) is never called: when the nearest called
    ancestor is covered by the torch.func fallback, that ancestor takes its parameters."""
    for name, site in list(norms.sites.items()):
        if site.calls != 0 or not name:
            continue
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = norms.sites.get(".".join(parts[:cut]))
            if parent is not None and parent.generic and parent.calls == 1:
                rel = ".".join(parts[cut:])
                for attr, p in site.params.items():
                    parent.params[f"{rel}.{attr}"] = p
                del norms.sites[name]
                norms.invalidate()
                break


def _call_problem(site: _Site) -> str | None:
    if site.calls == 0:
        return "not called through its forward (parameters used directly)"
    if site.calls > 1:
        return f"called {site.calls} times in one forward"
    if site.generic:
        return None if site.out_grads else "its output got no gradient in backward"
    if site.grad_output is None or site.activation is None:
        return "its output got no gradient in backward"
    return None


def _local_grads(site: _Site) -> dict[str, Tensor]:
    """The gradient of the site's parameters through this module alone (float32)."""
    params = list(site.params.values())
    if site.generic:
        grads = _generic_local_grads(site, params)
    else:
        mod, a, g = site.module, site.activation, site.grad_output
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


def _generic_local_grads(site: _Site, params: list[nn.Parameter]) -> tuple:
    """Re-run a rule-less module on its saved inputs; gradients from its saved output grads."""
    assert site.inputs is not None
    args, kwargs = as_param_dtype(site.inputs, site.params)
    with torch.enable_grad(), torch.autocast(device_type=params[0].device.type, enabled=False):
        out = leaves_of(site.module(*args, **kwargs))
        used = sorted(site.out_grads)
        return torch.autograd.grad(
            [out[i] for i in used],
            params,
            [site.out_grads[i].to(out[i].dtype) for i in used],
            allow_unused=True,
        )
