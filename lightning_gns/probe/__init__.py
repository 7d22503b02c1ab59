"""The branched critical batch size, measured inside a run and undone (Merrill et al. 2025).

:class:`CriticalBatchProbe` (the callback), :mod:`~lightning_gns.probe.branches` (the
decision and its bootstrap, pure functions), :mod:`~lightning_gns.probe.restore` (the exact
snapshot), :mod:`~lightning_gns.probe.runner` (the branches' batches, steps and scores).
"""

from lightning_gns.probe.callback import CriticalBatchProbe

__all__ = ["CriticalBatchProbe"]
