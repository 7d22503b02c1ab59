"""Every private torch or Lightning internal the package reads, each behind a guarded lookup.

Each name here is looked up once, at import, and has a defined fallback for a torch or
Lightning that no longer has it. A fallback may cost speed or a feature (named in each
docstring), never the user's run: nothing here raises inside the user's forward or backward.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

# -- torch: autograd and functorch state --------------------------------------------------------

_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_saved_tensor_hooks = getattr(
    getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None
)


def functorch_transforms_active() -> bool:
    """Inside ``vmap``/``grad`` (torch.func). Fallback: True, so the simultaneous route is not
    taken (the plain forward always works; the route only saves time)."""
    if _functorch_active is None:
        return True
    try:
        return bool(_functorch_active())
    except Exception:  # noqa: BLE001 - a changed internal must not break a forward
        return True


def in_backward_pass() -> bool:
    """A forward inside a backward pass (activation checkpointing recomputing a segment).
    Fallback: False (a recomputed layer is then left out as "called 2 times", with a warning)."""
    if _graph_task_id is None:
        return False
    try:
        return int(_graph_task_id()) >= 0
    except Exception:  # noqa: BLE001
        return False


def saving_through_hooks() -> bool:
    """Saved tensors go through hooks (non-reentrant checkpointing, CPU offload). Fallback:
    False (the eager hooks then hold each covered layer's input until backward)."""
    if _saved_tensor_hooks is None:
        return False
    try:
        return _saved_tensor_hooks(False) is not None
    except Exception:  # noqa: BLE001
        return False


def view_base(t: Tensor) -> Tensor | None:
    """The tensor ``t`` is a view of (``Tensor._base``). Fallback: None (the hook then goes on
    ``t`` itself: only an in-place op right after the layer can reroute it)."""
    return getattr(t, "_base", None)


def saved_on_node(node: Any, name: str) -> Any:
    """What an autograd node saved for backward (``node._saved_<name>``: a view's input sizes,
    an index's indices), or None. The mixture-of-experts rules read where flattened tokens came
    from this way. Fallback: None (the token map is then unknown and those layers are left out
    with the reason, as without the rules)."""
    try:
        return getattr(node, f"_saved_{name}", None)
    except Exception:  # noqa: BLE001 - a changed internal must not break a forward
        return None


_foreach_norm = getattr(torch, "_foreach_norm", None)


def norms_fp32(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor's 2-norm in float32 (``torch._foreach_norm``: one kernel for all of them;
    fallback: one ``vector_norm`` each)."""
    if _foreach_norm is not None:
        return list(_foreach_norm(tensors, 2.0, dtype=torch.float32))
    return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]


# -- torch: module classes without a public base ------------------------------------------------

BATCH_NORM: tuple[type[nn.Module], ...] = (
    (nn.modules.batchnorm._BatchNorm,)
    if hasattr(nn.modules, "batchnorm") and hasattr(nn.modules.batchnorm, "_BatchNorm")
    else (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
)
DROPOUT: tuple[type[nn.Module], ...] = (
    (nn.modules.dropout._DropoutNd,)
    if hasattr(nn.modules, "dropout") and hasattr(nn.modules.dropout, "_DropoutNd")
    else (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
)
# nn.RMSNorm exists from torch 2.4
RMS_NORM: tuple[type[nn.Module], ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


def conv_padding(conv: Any) -> tuple[int, ...]:
    """``F.pad`` amounts of a convolution (last dim first), as its forward pads: the private
    ``_reversed_padding_repeated_twice``, else computed from ``padding`` ('same' included)."""
    cached = getattr(conv, "_reversed_padding_repeated_twice", None)
    if cached is not None:
        return tuple(cached)
    nd = len(conv.kernel_size)
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * (2 * nd)
        out: list[int] = []  # 'same': total d(k − 1), the extra one on the right
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size), strict=True):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    pads = (pad,) * nd if isinstance(pad, int) else tuple(pad)
    return tuple(p for p in reversed(pads) for _ in range(2))


# -- torch: pytrees ---------------------------------------------------------------------------

try:
    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
except ImportError:  # pragma: no cover - a minimal pytree over lists, tuples and dicts

    def tree_flatten(tree: Any) -> tuple[list[Any], Any]:  # type: ignore[misc]
        if isinstance(tree, (list, tuple)):
            parts = [tree_flatten(x) for x in tree]
            return [v for p in parts for v in p[0]], (type(tree), [p[1] for p in parts])
        if isinstance(tree, dict):
            keys = list(tree)
            parts = [tree_flatten(tree[k]) for k in keys]
            return [v for p in parts for v in p[0]], (dict, keys, [p[1] for p in parts])
        return [tree], None

    def tree_unflatten(leaves: list[Any], spec: Any) -> Any:  # type: ignore[misc]
        it = iter(leaves)

        def build(s: Any) -> Any:
            if s is None:
                return next(it)
            if s[0] is dict:
                return {k: build(c) for k, c in zip(s[1], s[2], strict=True)}
            return s[0](build(c) for c in s[1])

        return build(spec)

    def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:  # type: ignore[misc]
        leaves, spec = tree_flatten(tree)
        return tree_unflatten([fn(x) for x in leaves], spec)


# -- torch.compile --------------------------------------------------------------------------

_optimized_module = getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)


def is_compiled_module(module: nn.Module) -> bool:
    """A module wrapped by ``torch.compile`` (dynamo's ``OptimizedModule``, else by name)."""
    if _optimized_module is not None:
        return isinstance(module, _optimized_module)
    return type(module).__name__ == "OptimizedModule"


_EAGER: dict[str, Any] = {"depth": 0, "restore": None}


class EagerWindow:
    """Compiled code runs eagerly from construction until :meth:`close` (idempotent).

    The steps that record Python state in hooks (the structural check, the batch probe) run
    eagerly: traced, such hooks split the graph, and dynamo keeps the split code after they are
    gone (hooks are not guarded). Windows may overlap (two callbacks on one model): the first
    to open turns compilation off (``torch.compiler.set_stance("force_eager")``, torch ≥ 2.6),
    the last to close restores it. Fallback without ``set_stance``: nothing is switched (the
    first step of a compiled model then keeps a few graph breaks).
    """

    def __init__(self) -> None:
        if _EAGER["depth"] == 0:
            set_stance = getattr(torch.compiler, "set_stance", None)
            _EAGER["restore"] = set_stance("force_eager") if set_stance is not None else None
        _EAGER["depth"] += 1
        self.open = True

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        _EAGER["depth"] -= 1
        if _EAGER["depth"] == 0:
            restore: AbstractContextManager[Any] | None = _EAGER["restore"]
            _EAGER["restore"] = None
            if restore is not None:
                restore.__exit__(None, None, None)


def eager_depth() -> int:
    """Open :class:`EagerWindow` s (0 when torch.compile is as the user left it)."""
    return int(_EAGER["depth"])


# -- Lightning ----------------------------------------------------------------------------------


def loss_scale(trainer: Any) -> Tensor | float | None:
    """The AMP loss scale of this step as a device tensor (no host sync), 1.0 without AMP, or
    None if it cannot be read. ``GradScaler._scale`` is private; the fallback ``get_scale()``
    is public but reads the value back to the host."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None:
        return 1.0
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, Tensor):
        return scale
    try:
        return float(scaler.get_scale())
    except Exception:  # noqa: BLE001
        return None


def compiled_by_lightning(pl_module: Any) -> bool:
    """Lightning's ``from_compiled`` marks a module it unwrapped (private ``_compiler_ctx``)."""
    return getattr(pl_module, "_compiler_ctx", None) is not None


def set_callback_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Values into ``trainer.callback_metrics`` (read by EarlyStopping, ModelCheckpoint and
    sweeps). Lightning documents the dict as read-only; writing into it is how callbacks share
    values today. Fallback: nothing (the loggers still get every value)."""
    target = getattr(trainer, "callback_metrics", None)
    if not isinstance(target, dict):
        return
    for key, value in metrics.items():
        target[key] = torch.tensor(value)


def batches_ready(trainer: Any, fallback: int) -> int:
    """Batches of this epoch the training loop has fetched (private ``batch_progress``);
    fallback: the caller's own count from the hooks' ``batch_idx``."""
    try:
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
    except AttributeError:
        return fallback


def set_epoch_length(trainer: Any, n: int) -> None:
    """Tell Lightning the epoch now has ``n`` batches (a grown micro-batch): it reads the length
    once, at set-up, for the end of the epoch, epoch-end validation and the progress bar.
    Private loop attributes (one train loader only); fallback: nothing (Lightning ends the
    epoch when the loader does)."""
    loop = trainer.fit_loop
    loader = getattr(loop, "_combined_loader", None)
    if loader is None or len(getattr(loader, "flattened", [])) != 1:
        return
    loader.limits = [n]
    loop.max_batches = n
    fetcher = getattr(loop, "_data_fetcher", None)
    if fetcher is not None and getattr(fetcher, "length", None) is not None:
        fetcher.length = n


@contextmanager
def nothing() -> Iterator[None]:
    yield


# -- torch.distributed.fsdp: sharded parameters --------------------------------------------------


def fsdp1_flat_param(unit: Any) -> Any:
    """The ``FlatParameter`` of an FSDP1 unit (``unit._handle.flat_param``; FSDP1 has no public
    accessor), or None. Fallback: None (the unit is then not measured; the set-up is refused)."""
    handle = getattr(unit, "_handle", None)
    return getattr(handle, "flat_param", None)


def fsdp1_sharded(unit: Any) -> bool:
    """Whether an FSDP1 unit shards its flat parameter (False for ``NO_SHARD``)."""
    handle = getattr(unit, "_handle", None)
    return bool(getattr(handle, "uses_sharded_strategy", True))


def shard_padding(flat_param: Any) -> int:
    """Zero elements FSDP1 appends to a flat parameter's local shard (``_shard_numel_padded``)."""
    return int(getattr(flat_param, "_shard_numel_padded", 0) or 0)


def fsdp2_param_group(unit: Any) -> Any:
    """An FSDP2 unit's parameter group (``unit._get_fsdp_state()._fsdp_param_group``), or None
    (a unit without parameters, or a torch whose internals changed)."""
    try:
        return unit._get_fsdp_state()._fsdp_param_group
    except AttributeError:
        return None


def fsdp2_unsharded(unit: Any) -> list[Tensor] | None:
    """The unsharded parameters an FSDP2 unit's forward uses (``FSDPParam._unsharded_param``,
    created at the first all-gather and reused). None when the internals are not there: then
    the caller falls back to the unit's non-DTensor parameters during its forward."""
    group = fsdp2_param_group(unit)
    params = getattr(group, "fsdp_params", None)
    if params is None:
        return None
    return [fp._unsharded_param for fp in params if hasattr(fp, "_unsharded_param")]


# -- Python: a misspelled keyword argument ------------------------------------------------------


def _close_names(key: str, names: list[str]) -> list[str]:
    """The argument names a misspelled ``key`` most likely meant: prefixes first, then
    :func:`difflib.get_close_matches`."""
    prefixed = [n for n in names if n.startswith(key) or key.startswith(n)]
    return prefixed or difflib.get_close_matches(key, names, n=2, cutoff=0.6)


def check_keywords(cls: type, kwargs: dict[str, Any]) -> None:
    """Raise Python's own ``TypeError`` for a keyword ``cls.__init__`` does not take, with the
    argument most likely meant (``ema`` -> ``ema_decay``) or the ones it takes."""
    params = inspect.signature(cls).parameters  # its __init__'s, without self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    for key in kwargs:
        if key not in names:
            close = _close_names(key, names)
            hint = (
                f"did you mean {' or '.join(map(repr, close))}?"
                if close
                else f"it takes {', '.join(names)}"
            )
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}; {hint}")


class SuggestsArguments:
    """A base whose constructor answers a misspelled keyword with the argument meant
    (``GradientNoiseScale(ema=2)``: "did you mean 'ema_decay'?") instead of Python's bare
    "unexpected keyword argument". It checks in ``__new__``, so ``__init__`` and its signature
    (LightningCLI, the docs) stay as they are."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        check_keywords(cls, kwargs)
        return super().__new__(cls)
