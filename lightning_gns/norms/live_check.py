"""The structural check's gradient test where parameters are sharded between forwards (FSDP2).

The plain check (:mod:`lightning_gns.norms.check`) hooks the registered parameters for their
whole micro-batch gradient and re-runs each module after backward. Under FSDP2 the registered
parameters are sharded DTensors: their hooks never see a micro-batch gradient, and a re-run
outside the forward would all-gather. :class:`LiveGradCheck` reads the *live* tensors instead:
a forward pre-hook (after FSDP's, which unshards) takes the tensors the module's forward uses
and hooks them for their whole local gradient; the module's own gradient is recomputed inside
its output-gradient hook, during backward, while FSDP holds the parameters unsharded again,
by calling ``type(module).forward`` on detached copies swapped in (no module hook runs, FSDP's
included; nothing is all-gathered). Only a relative error per site is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns._compat import tree_flatten
from lightning_gns.norms.generic import is_replaying, replaying
from lightning_gns.norms.sites import Site
from lightning_gns.norms.tensor_parallel import hooks_first, local

Hook = Callable[..., Any]


class LiveGradCheck:
    """Each site's own gradient against its live tensors' whole gradient, during one
    micro-batch's backward: :meth:`error` per site afterwards."""

    def __init__(self, sites: dict[str, Site]) -> None:
        self.sites = sites
        self.errors: dict[str, float] = {}  # sites that could not be verified: inf
        self.diffs: dict[int, tuple[float, float]] = {}  # id(live) -> (|own − whole|, |whole|)
        self._local: dict[int, Tensor] = {}  # id(live tensor) -> Σ own gradients of its sites
        self._owners: dict[int, list[str]] = {}
        self._live: dict[int, Tensor] = {}
        self._calls: dict[int, tuple[dict[str, int], tuple, dict]] = {}  # id(module) -> call
        self._pending: dict[str, tuple] = {}  # site -> a call of several outputs (_several)
        self._handles: list[RemovableHandle] = []
        for name, site in sites.items():
            module = site.module
            self._handles.append(
                module.register_forward_pre_hook(self._pre_hook(name, site), with_kwargs=True)
            )
            first = hooks_first(module)  # tensor parallel: the output before it is redistributed
            self._handles.append(
                module.register_forward_hook(self._forward_hook(site), prepend=first)
            )

    def stop(self) -> dict[str, float]:
        for h in self._handles:
            h.remove()
        self._handles, self._live, self._local, self._calls = [], {}, {}, {}
        self._pending = {}
        return dict(self.errors)

    def _pre_hook(self, name: str, site: Site) -> Hook:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if is_replaying():  # the torch.func fallback calls the module again
                return
            keys: dict[str, int] = {}
            for attr in site.params:
                t = getattr(module, attr, None) if "." not in attr else None
                if not isinstance(t, Tensor):
                    self.errors[name] = float("inf")  # an adopted parameter: not verifiable
                    continue
                keys[attr] = id(t)
                self._owners.setdefault(id(t), []).append(name)
                if id(t) not in self._live:
                    self._live[id(t)] = t
                    self._handles.append(t.register_hook(self._whole(id(t))))
            detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            self._calls[id(module)] = (keys, detached, kwargs)

        return hook

    def _forward_hook(self, site: Site) -> Hook:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if is_replaying():
                return
            call = self._calls.pop(id(module), None)
            if call is not None and not isinstance(output, Tensor):  # several (an MoE router)
                self._several(site, module, call, output)
            if call is None or not isinstance(output, Tensor) or not output.requires_grad:
                return
            output.register_hook(lambda g: self._own(site, module, call, g))

        return hook

    def _several(self, site: Site, module: nn.Module, call: tuple, output: object) -> None:
        """A module with several outputs (an MoE router: logits, weights, indices): each
        output's gradient is kept as it arrives; the own gradient is recomputed from those that
        came when its parameters' whole gradient arrives (:meth:`_whole`): by then every output
        that leads to it has its gradient."""
        grads: dict[int, Tensor] = {}
        for i, t in enumerate(tree_flatten(output)[0]):
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(lambda g, i=i: grads.__setitem__(i, g.detach()))
        self._pending[site.name] = (site, module, call, grads)

    def _own(
        self, site: Site, module: nn.Module, call: tuple, g: Tensor | dict[int, Tensor]
    ) -> None:
        """``g``: the output's gradient, or those of several outputs by position."""
        if is_replaying():
            return
        keys, args, kwargs = call
        try:
            copies = {a: getattr(module, a).detach().requires_grad_() for a in keys}
            with torch.enable_grad(), _swapped(module, copies), replaying():
                out = local(type(module).forward(module, *args, **kwargs))  # (TP: local shards)
                if isinstance(g, dict):  # several outputs: those that got a gradient
                    outs, gs = [tree_flatten(out)[0][i] for i in g], list(g.values())
                else:
                    outs, gs = [out], [local(g)]
                grads = torch.autograd.grad(outs, list(copies.values()), gs, allow_unused=True)
        except Exception:  # noqa: BLE001 - a check that cannot run must not break backward
            self.errors[site.name] = float("inf")
            return
        for key, gr in zip(keys.values(), grads, strict=True):
            if gr is not None:
                gr = local(gr.detach()).float()
                self._local[key] = gr if key not in self._local else self._local[key] + gr

    def _whole(self, key: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if is_replaying():  # the torch.func fallback or the check itself re-running
                return
            for name in self._owners.get(key, []):  # several outputs: their gradients are in
                pending = self._pending.pop(name, None)
                if pending is not None and pending[3]:
                    self._own(*pending)
            mine = self._local.pop(key, None)
            try:  # (a shape or placement mismatch must not break the user's backward)
                whole = local(grad.detach()).float()
                diff = float("inf") if mine is None else float((mine - whole).norm())
                self.diffs[key] = (diff, float(whole.norm()))
            except Exception:  # noqa: BLE001 - unverified: the site is left out
                self.diffs[key] = (float("inf"), 0.0)

        return hook

    def error(self, name: str, floor: float) -> float:
        """The site's largest relative error over its tensors, each compared at least at
        ``floor`` × the site's whole-gradient norm (a ~0 gradient's rounding is no error);
        inf where a tensor got no gradient or the site could not be verified."""
        if name in self.errors:
            return self.errors[name]
        keys = [k for k, owners in self._owners.items() if name in owners]
        seen = [self.diffs.get(k) for k in keys]
        if not keys or any(d is None for d in seen):
            return float("inf")
        pairs = [d for d in seen if d is not None]
        scale = sum(n * n for _, n in pairs) ** 0.5
        return max(diff / max(n, floor * scale, 1e-30) for diff, n in pairs)


@contextmanager
def _swapped(module: nn.Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """Replace a module's tensors for a moment: registered parameters, or the plain
    attributes FSDP1 sets during forward and backward."""
    params = module._parameters
    saved: dict[str, tuple[bool, object]] = {}
    for attr, t in tensors.items():
        if attr in params:
            saved[attr] = (True, params[attr])
            params[attr] = t  # type: ignore[assignment]
        else:
            saved[attr] = (False, module.__dict__.get(attr))
            module.__dict__[attr] = t
    try:
        yield
    finally:
        for attr, (registered, old) in saved.items():
            if registered:
                params[attr] = old  # type: ignore[assignment]
            else:
                module.__dict__[attr] = old
