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

from lightning_gns.norms.generic import is_replaying, replaying
from lightning_gns.norms.sites import Site

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
        self._handles: list[RemovableHandle] = []
        for name, site in sites.items():
            module = site.module
            self._handles.append(
                module.register_forward_pre_hook(self._pre_hook(name, site), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._forward_hook(site)))

    def stop(self) -> dict[str, float]:
        for h in self._handles:
            h.remove()
        self._handles, self._live, self._local, self._calls = [], {}, {}, {}
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
            if call is None or not isinstance(output, Tensor) or not output.requires_grad:
                return
            output.register_hook(lambda g: self._own(site, module, call, g))

        return hook

    def _own(self, site: Site, module: nn.Module, call: tuple, g: Tensor) -> None:
        if is_replaying():
            return
        keys, args, kwargs = call
        try:
            copies = {a: getattr(module, a).detach().requires_grad_() for a in keys}
            with torch.enable_grad(), _swapped(module, copies), replaying():
                out = type(module).forward(module, *args, **kwargs)
                grads = torch.autograd.grad(out, list(copies.values()), g, allow_unused=True)
        except Exception:  # noqa: BLE001 - a check that cannot run must not break backward
            self.errors[site.name] = float("inf")
            return
        for key, gr in zip(keys.values(), grads, strict=True):
            if gr is not None:
                gr = gr.detach().float()
                self._local[key] = gr if key not in self._local else self._local[key] + gr

    def _whole(self, key: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if is_replaying():  # the torch.func fallback or the check itself re-running
                return
            mine = self._local.pop(key, None)
            whole = grad.detach().float()
            diff = float("inf") if mine is None else float((mine - whole).norm())
            self.diffs[key] = (diff, float(whole.norm()))

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
