"""An exact snapshot of a training run's state, and the quiet room the branches train in.

:class:`Snapshot` keeps what a branch changes: every parameter, gradient and buffer, each
module's train/eval mode, the optimizer's state and parameter groups, the schedulers' states
and every random generator (torch, CUDA when started, numpy, Python's ``random``).
:meth:`Snapshot.restore` writes them back in place (the same tensor objects, so whatever holds
a reference sees the old values). :func:`quiet` switches off this package's own hooks (the
norms, the adaptive rate) and ``self.log`` while the branches run; the model's and the user's
hooks keep running, so the branches train the model as it is.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)
TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
OPTIMIZER_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


def _put(holder: dict[Any, Any], key: Any, value: Any) -> None:
    """``holder[key] = value``, in place when both are tensors of one shape, dtype, device."""
    now = holder.get(key)
    if (
        isinstance(value, Tensor)
        and isinstance(now, Tensor)
        and now.shape == value.shape
        and now.dtype == value.dtype
        and now.device == value.device
    ):
        with torch.no_grad():
            now.copy_(value)
    else:
        holder[key] = _clone(value)


def rng_state() -> dict[str, Any]:
    """Every global random generator's state."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Snapshot:
    """The state of ``module``, ``optimizer`` and ``schedulers`` at one moment.

    Examples:
        >>> net = nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(net.parameters())
        >>> saved = Snapshot.take(net, opt, [])
        >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> saved.restore()
        >>> bool(torch.equal(net.weight, saved.params[0])), opt.state[net.weight]
        (True, {})
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    schedulers: list[Any]
    params: list[Tensor]
    grads: list[Tensor | None]
    buffers: list[Tensor]
    training: list[bool]
    state: dict[Tensor, dict[str, Any]]
    groups: list[dict[str, Any]]
    scheduler_states: list[dict[str, Any]]
    rng: dict[str, Any]

    @classmethod
    def take(
        cls, module: nn.Module, optimizer: torch.optim.Optimizer, schedulers: list[Any]
    ) -> Snapshot:
        params = list(module.parameters())
        with torch.no_grad():
            return cls(
                module,
                optimizer,
                schedulers,
                [p.detach().clone() for p in params],
                [None if p.grad is None else p.grad.detach().clone() for p in params],
                [b.detach().clone() for b in module.buffers()],
                [m.training for m in module.modules()],
                {p: {k: _clone(v) for k, v in s.items()} for p, s in optimizer.state.items()},
                [
                    {k: _clone(v) for k, v in g.items() if k != "params"}
                    for g in optimizer.param_groups
                ],  # fmt: skip
                [copy.deepcopy(s.state_dict()) for s in schedulers],
                rng_state(),
            )

    def restore(self) -> None:
        """Everything back as it was, in place."""
        with torch.no_grad():
            for p, saved in zip(self.module.parameters(), self.params, strict=True):
                p.copy_(saved)
            for p, grad in zip(self.module.parameters(), self.grads, strict=True):
                if grad is None:
                    p.grad = None
                elif p.grad is not None and p.grad.shape == grad.shape:
                    p.grad.copy_(grad)
                else:
                    p.grad = grad.clone()
            for b, saved in zip(self.module.buffers(), self.buffers, strict=True):
                b.copy_(saved)
        for m, mode in zip(self.module.modules(), self.training, strict=True):
            m.training = mode
        state = self.optimizer.state
        for t in [t for t in state if t not in self.state]:
            del state[t]
        for t, saved_state in self.state.items():
            now = state[t]
            for key in [k for k in now if k not in saved_state]:
                del now[key]
            for key, value in saved_state.items():
                _put(now, key, value)
        for group, saved_group in zip(self.optimizer.param_groups, self.groups, strict=True):
            for key in [k for k in group if k != "params" and k not in saved_group]:
                del group[key]
            for key, value in saved_group.items():
                _put(group, key, value)
        for scheduler, saved_scheduler in zip(self.schedulers, self.scheduler_states, strict=True):
            scheduler.load_state_dict(copy.deepcopy(saved_scheduler))
        set_rng_state(self.rng)


def _ours(hook: Any) -> bool:
    """Whether ``hook`` was defined in this package (a function, method, partial or object)."""
    fn = getattr(hook, "func", hook)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # a bound method
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return module == "lightning_gns" or module.startswith("lightning_gns.")


def _silence(holders: list[Any], names: tuple[str, ...]) -> list[tuple[dict[Any, Any], list]]:
    """Take this package's hooks out of ``holders``' hook dicts; (dict, its items) to restore."""
    cleared = []
    for holder in holders:
        for name in names:
            hooks = getattr(holder, name, None)
            if isinstance(hooks, dict) and any(_ours(h) for h in hooks.values()):
                cleared.append((hooks, list(hooks.items())))
                for key in [k for k, h in hooks.items() if _ours(h)]:
                    del hooks[key]  # in place: autograd holds a parameter's dict itself
    return cleared


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def quiet(module: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """None of this package's hooks and no ``self.log`` sees what runs inside; the model's
    and the user's own hooks (weight norm, pruning, a pre-hook) keep running.

    Examples:
        >>> from torch.nn.utils import prune
        >>> from lightning_gns.probe.restore import _no_log
        >>> net = prune.l1_unstructured(nn.Linear(2, 1), "weight", amount=0.5)  # torch's pre-hook
        >>> _ = net.register_forward_hook(_no_log)  # stands for one of the package's hooks
        >>> with quiet(net, torch.optim.SGD(net.parameters(), lr=0.1)):
        ...     inside = len(net._forward_pre_hooks), len(net._forward_hooks)
        >>> inside, (len(net._forward_pre_hooks), len(net._forward_hooks))
        ((1, 0), (1, 1))
    """
    cleared = _silence(list(module.modules()), MODULE_HOOKS)
    cleared += _silence(list(module.parameters()), TENSOR_HOOKS)
    cleared += _silence([optimizer], OPTIMIZER_HOOKS)
    patched = [n for n in ("log", "log_dict") if hasattr(module, n) and n not in vars(module)]
    for name in patched:
        setattr(module, name, _no_log)
    try:
        yield
    finally:
        for name in patched:
            delattr(module, name)
        for hooks, items in cleared:
            hooks.clear()
            hooks.update(items)
