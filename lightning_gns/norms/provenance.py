"""Which tensors were computed from the batch: the structural check's test of batch dimensions.

A layer's input whose dim 0 happens to equal the batch size need not hold examples: T5's
relative-position buckets are a (T, T) matrix computed from ``arange`` and broadcast over the
batch later, so with T = B a rule would take query positions for examples and give a wrong
per-layer value with no sign of error. During the structural check's forward, a
``TorchFunctionMode`` follows every torch operation and marks each result computed (directly
or through other results) from a tensor of the batch; an input that is not marked cannot hold
examples, whatever its shape. It runs on the check's micro-batch only (one Python call per
operation), and reads no tensor values.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_gns._compat import tree_flatten


def tensors_in(obj: Any) -> list[Tensor]:
    """The tensors among ``obj``'s leaves (nested lists, tuples, dicts)."""
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, Tensor)]


class BatchProvenance(TorchFunctionMode):
    """While active, marks every result of a torch operation with an input from the batch.

    Args:
        batch: the micro-batch as the model gets it (any nesting of tensors).
    """

    def __init__(self, batch: Any) -> None:
        super().__init__()
        self._marked: dict[int, weakref.ref[Tensor]] = {}  # by id (Tensor == is elementwise)
        for t in tensors_in(batch):
            self._mark(t)
        self.active = False

    def _mark(self, t: Tensor) -> None:
        self._marked[id(t)] = weakref.ref(t)

    def _is_marked(self, t: Tensor) -> bool:
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def __enter__(self) -> BatchProvenance:
        self.active = True
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        super().__exit__(*exc)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(self._is_marked(t) for t in tensors_in((args, kwargs))):
            for t in tensors_in(out):
                self._mark(t)
        return out

    def from_batch(self, x: object) -> bool:
        """Whether ``x`` was computed from the batch (True for anything but a tensor)."""
        return not isinstance(x, Tensor) or self._is_marked(x)
