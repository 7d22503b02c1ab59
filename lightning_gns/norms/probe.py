"""The batch probe: how many examples the model's own layers see in one micro-batch."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_gns._compat import EagerWindow
from lightning_gns.norms.positions import not_a_batch


class BatchDimProbe:
    """Sees the batch dimension (0, or 1 where ``batch_first=False``) of the first input of every
    module with parameters during one forward: the model's own idea of how many examples a
    micro-batch holds (the most common value). Reads shapes and, for 1-D integer inputs, values
    (positions are not a batch): run on the first training micro-batch only.

    A compiled model runs that forward eagerly (traced, the hooks would split its graph)."""

    def __init__(self, model: nn.Module) -> None:
        self.sizes: list[int] = []
        self._handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if any(True for _ in m.parameters(recurse=False))
        ]
        self._eager = EagerWindow()

    def _hook(self, module: nn.Module, args: tuple, output: object) -> None:
        dim = 1 if getattr(module, "batch_first", True) is False else 0  # (T, B, ...) layers
        if args and isinstance(args[0], Tensor) and args[0].dim() > dim:
            if not not_a_batch(args[0]):
                self.sizes.append(int(args[0].shape[dim]))

    def close(self) -> int | None:
        """Remove the hooks; the most common batch dimension seen, if any."""
        self._eager.close()
        for h in self._handles:
            h.remove()
        self._handles = []
        if not self.sizes:
            return None
        return max(set(self.sizes), key=self.sizes.count)
