"""The record types that flow from the sources to the tracker (no logic above plain math).

One :class:`StepNorms` per optimizer step and process holds *sums*, not means, so that the
records of all processes pool by one summing all-reduce (:mod:`lightning_gns.tracker`):

* small batches (examples or micro-batches): Σ_i |g_i|² and, for their sizes b_i, the count
  and Σ_i 1/b_i; pooled, E[mean_i |g_i|²] = |G|² + tr(Σ)/B_small with
  B_small = count/Σ(1/b_i) (the harmonic mean of the b_i);
* the big batch: this process's share of |G_big|² (DDP: |G_big|²/world, each process holds
  all of it; sharded: the squared norm of its own shard), and for the gradient the optimizer
  steps with, a mean of M equally weighted parts of sizes b_j (micro-batch means; examples
  under a sum reduction), M and Σ_j 1/b_j: Var = tr(Σ)·Σ(1/b_j)/M², so B_big = M²/Σ(1/b_j).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Reduction = Literal["mean", "sum"]
MODEL = "model"  # the column of the whole (covered) model; per-layer columns follow
PRECONDITIONED = "preconditioned"  # the column of the optimizer-preconditioned model


class SkipStep(Exception):
    """This step gives no usable sample. ``silent``: expected, on every process alike (the
    structural check, an optimizer without state yet): nothing is recorded or warned."""

    def __init__(self, reason: str, silent: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.silent = reason, silent


@dataclass(frozen=True)
class Units:
    """How this step's backward scaled the gradients (undone in :mod:`lightning_gns.sources`):
    Lightning's 1/``accumulate`` on the loss, the loss ``reduction``, the AMP loss scale
    (``inv_loss_scale_sq`` = 1/s², for squared norms), and the ``world_size`` processes whose
    gradients the optimizer's ``.grad`` averages."""

    accumulate: int = 1
    reduction: Reduction = "mean"
    inv_loss_scale_sq: Tensor | float = 1.0
    world_size: int = 1


@dataclass(frozen=True)
class StepNorms:
    """One optimizer step of one process, per column (model, then layers); see the module
    docstring. Tensors stay on the device; the counts are host numbers."""

    small_sum: Tensor  # (C,) Σ_i |g_i|² over this process's small batches, mean-per-example units
    big_part: Tensor  # (C,) this process's share of |G_big|²
    small_count: float  # small batches here
    small_inv: float  # Σ_i 1/b_i over them
    big_count: float  # equally weighted parts of the big gradient here (M)
    big_inv: float  # Σ_j 1/b_j over them

    @property
    def b_small(self) -> float:
        """B_small of this process alone."""
        return self.small_count / self.small_inv

    @property
    def b_big(self) -> float:
        """B_big of this process's parts alone (the world's pools every process's parts)."""
        return self.big_count**2 / self.big_inv
