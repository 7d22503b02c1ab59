"""Checking the promise "no host sync between logging steps".

Every function the package runs during a training step (the callback's per-step hooks, the
parameter and module hooks, the routed Linear, the compiled taps' backward) runs through
:func:`on_step_path` or :func:`watched`. Outside a check these cost nothing (hooks are
registered unwrapped; :func:`watched` is one flag test). Inside :func:`forbid_host_sync`
torch's host reads are wrapped (not through a TorchFunctionMode: the structural check pushes
one of its own), and every read made inside those functions is recorded (``.item()``,
``.tolist()``, ``bool()``, ``float()``, ``.cpu()``, ``torch.equal``, ``nonzero``, ...; on CUDA
also what ``torch.cuda.set_sync_debug_mode("error")`` catches), except where the package
reads on purpose: the first optimizer step (the structural check, the batch probe) and
logging steps.

Example::

    with forbid_host_sync() as found:  # raises HostSyncError at exit if anything was found
        trainer.fit(model)
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# What reads a tensor's value back to the host: Tensor methods and torch functions.
TENSOR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
TORCH_READS = ("equal", "nonzero", "unique", "unique_consecutive", "masked_select")


class HostSyncError(RuntimeError):
    """A host read happened on the per-step path of a non-logging step."""


@dataclass
class _Check:
    enabled: bool = False
    allowed: int = 0  # > 0: a region where reads are allowed (first step, logging)
    depth: int = 0  # nested watched regions
    found: list[str] = field(default_factory=list)


CHECK = _Check()


def _recording(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that records its call while a watched region runs (and reads are not allowed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if CHECK.depth > 0 and CHECK.allowed == 0:
            if name != "to" or _to_cpu(args, kwargs):
                where = "".join(traceback.format_stack(limit=6)[:-1])
                CHECK.found.append(f"{name}() on the per-step path:\n{where}")
        return fn(*args, **kwargs)

    return wrapper


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    target = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
    return bool(target) and torch.device(target[0]).type == "cpu" and args[0].device.type != "cpu"


def _install() -> list[tuple[Any, str, Any]]:
    """Wrap every host read (undone by :func:`_uninstall`)."""
    saved = []
    for owner, names in ((torch.Tensor, (*TENSOR_READS, "to")), (torch, TORCH_READS)):
        for name in names:
            fn = getattr(owner, name)
            saved.append((owner, name, fn))
            setattr(owner, name, _recording(name, fn))
    return saved


def _uninstall(saved: list[tuple[Any, str, Any]]) -> None:
    for owner, name, fn in reversed(saved):
        setattr(owner, name, fn)


@contextmanager
def watched() -> Iterator[None]:
    """The per-step region of a function the package runs (one flag test outside a check)."""
    if not CHECK.enabled or CHECK.depth > 0:
        yield
        return
    CHECK.depth += 1
    cuda = torch.cuda.is_available() and CHECK.allowed == 0
    old = torch.cuda.get_sync_debug_mode() if cuda else 0
    try:
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(old)
        CHECK.depth -= 1


def on_step_path(fn: F) -> F:
    """``fn`` itself outside a check (registered hooks cost nothing extra); inside
    :func:`forbid_host_sync`, ``fn`` under :func:`watched`."""
    if not CHECK.enabled:
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with watched():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextmanager
def allowed() -> Iterator[None]:
    """A region where the package reads values on purpose (first step, logging steps)."""
    cuda = CHECK.enabled and torch.cuda.is_available()
    old = torch.cuda.get_sync_debug_mode() if cuda else 0
    CHECK.allowed += 1
    try:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        yield
    finally:
        CHECK.allowed -= 1
        if cuda:
            torch.cuda.set_sync_debug_mode(old)


@contextmanager
def forbid_host_sync(raise_at_exit: bool = True) -> Iterator[list[str]]:
    """Record every host read on the package's per-step path (see the module docstring);
    yields the list of findings and, with ``raise_at_exit``, raises :class:`HostSyncError`
    at exit if it is not empty. Enter it before ``trainer.fit`` (hooks are wrapped when they
    are registered)."""
    CHECK.enabled, CHECK.found = True, []
    saved = _install()
    try:
        yield CHECK.found
    finally:
        CHECK.enabled = False
        _uninstall(saved)
    if raise_at_exit and CHECK.found:
        raise HostSyncError(f"{len(CHECK.found)} host read(s):\n" + "\n".join(CHECK.found[:5]))


class Allowance:
    """:func:`allowed` over a span of callbacks (the first optimizer step): reads are allowed
    from construction until :meth:`close` (idempotent)."""

    def __init__(self) -> None:
        CHECK.allowed += 1
        self.open = True

    def close(self) -> None:
        if self.open:
            self.open = False
            CHECK.allowed -= 1
