"""The estimators' state: smoothed moments per column, reduced across processes, resumable.

Per step the tracker only appends the source's device tensors to a pending list (no kernel,
no host sync). :meth:`GNSTracker.flush` turns pending steps into unbiased |G|² and tr(Σ)
estimates (:mod:`lightning_gns.estimator`) and feeds the EMAs in a few vector ops; it runs at
reading time, or when ``max_pending`` steps have piled up. :meth:`GNSTracker.read` is the one
host read: an optional cross-process reduction of the small moments tensor, then one copy;
:func:`read_together` reads several trackers with one reduction.

The state is a ``torchmetrics.Metric`` state (``dist_reduce_fx="mean"``): each process keeps
its own moments and only reading combines them (one all-reduce of the mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from lightning_gns.estimator import (
    ADAPTIVE_DECAYS,
    FIELDS,
    GNSValues,
    check_decay,
    choose_window,
    ema_update,
    grad_norm_sq,
    new_state,
    trace_cov,
    values_from_moments,
)
from lightning_gns.sources import MODEL, StepNorms


class GNSTracker(Metric):
    """Bias-corrected EMAs of |G|² and tr(Σ) for the model and optional per-layer columns.

    Args:
        ema_decay: EMA decay per optimizer step in (0, 1), a fixed window of about 1/(1 − β)
            steps; ``None`` (default) for the adaptive window: EMAs at
            :data:`~lightning_gns.estimator.ADAPTIVE_DECAYS` side by side, read out from the
            shortest one whose interval is precise.
        columns: names of the estimated quantities (``"model"`` first, then layers).
        max_pending: flush after this many recorded steps even if nobody reads.
        running_mean: weigh every step equally instead (the analyzer's fixed set of batches).
    """

    full_state_update = False

    def __init__(
        self,
        ema_decay: float | None = None,
        columns: Sequence[str] = (MODEL,),
        max_pending: int = 256,
        running_mean: bool = False,
    ) -> None:
        super().__init__()
        self.ema_decay = check_decay(ema_decay)
        if running_mean:
            self.decays: tuple[float, ...] = (1.0,)
        else:
            self.decays = (self.ema_decay,) if self.ema_decay is not None else ADAPTIVE_DECAYS
        self.columns = list(columns)
        self.max_pending = max_pending
        rows = len(self.columns) * len(self.decays)  # row c·W + w: column c, window w
        self.add_state("moments", new_state(rows), dist_reduce_fx="mean")
        self.pending: list[StepNorms | None] = []  # None: a step that could not be used

    # -- per step ------------------------------------------------------------------------
    def record(self, step: StepNorms | None) -> None:
        """Add one optimizer step (``None``: skipped; it counts as skipped and stale)."""
        self.pending.append(step)
        if len(self.pending) >= self.max_pending:
            self.flush()

    def flush(self) -> None:
        """Feed the pending steps to the EMAs (device ops only)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        st = self.moments
        nan = torch.full((len(self.columns),), float("nan"), dtype=st.dtype, device=st.device)
        small = torch.stack([nan if p is None else p.small_sq.to(st) for p in pending])
        big = torch.stack([nan if p is None else p.big_sq.to(st) for p in pending])
        sizes = [(1.0, 2.0) if p is None else (p.b_small, p.b_big) for p in pending]
        bs = torch.tensor(sizes, dtype=st.dtype, device=st.device)
        b_small, b_big = bs[:, :1], bs[:, 1:]
        self.update(grad_norm_sq(small, big, b_small, b_big), trace_cov(small, big, b_small, b_big))

    def update(self, grad_norm_sq: Tensor, trace_cov: Tensor) -> None:  # type: ignore[override]
        """EMA update with ``(n, columns)`` unbiased per-step estimates (every window)."""
        w = len(self.decays)
        beta = torch.tensor(self.decays, dtype=self.moments.dtype, device=self.moments.device)
        self.moments = ema_update(
            self.moments,
            grad_norm_sq.repeat_interleave(w, dim=1),
            trace_cov.repeat_interleave(w, dim=1),
            beta.repeat(len(self.columns)),
        )

    def compute(self) -> Tensor:
        return self.moments

    # -- read-out ------------------------------------------------------------------------
    def read(self, sync: bool = False) -> dict[str, GNSValues]:
        """Flush, reduce across processes if ``sync``, and read every column on the host (with
        the adaptive window: the shortest window whose interval is precise)."""
        return read_together([self], sync)[0]

    def values(self, rows: list[list[float]]) -> dict[str, GNSValues]:
        """Every column's read-out from this tracker's moments as host rows."""
        w = len(self.decays)
        return {
            name: choose_window([values_from_moments(*r) for r in rows[i * w : (i + 1) * w]])
            for i, name in enumerate(self.columns)
        }

    # -- checkpoints ---------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        """Plain numbers to resume from: decay, column names, moments per column."""
        self.flush()
        rows, w = self.moments.tolist(), len(self.decays)
        return {
            "ema_decay": self.ema_decay,
            "decays": list(self.decays),
            "fields": list(FIELDS),
            "moments": {name: rows[i * w : (i + 1) * w] for i, name in enumerate(self.columns)},
        }

    def restore(self, saved: dict[str, Any]) -> str | None:
        """Take the moments of the columns that exist in both; the decay stays this one's (a
        note says so when the saved one differs)."""
        rows, w = saved.get("moments", {}), len(self.decays)
        saved_decays = list(saved.get("decays", []))
        state = self.moments.clone()
        for i, name in enumerate(self.columns):
            saved_rows = rows.get(name, [])
            for j, decay in enumerate(self.decays):
                # the same window, or the same position when the number of windows matches
                same = decay in saved_decays
                k = saved_decays.index(decay) if same else (j if len(saved_decays) == w else None)
                if k is not None and k < len(saved_rows) and len(saved_rows[k]) == len(FIELDS):
                    state[i * w + j] = torch.tensor(saved_rows[k], dtype=state.dtype)
        self.moments = state
        self.pending = []
        saved_decay = saved.get("ema_decay", self.ema_decay)
        if saved_decay == self.ema_decay:
            return None
        return (
            f"resuming with ema_decay={self.ema_decay} from a checkpoint written with "
            f"{saved_decay}; "
            f"the smoothed state is kept and ema_decay={self.ema_decay} applies from here on."
        )


def read_together(trackers: Sequence[GNSTracker], sync: bool = False) -> list[dict[str, GNSValues]]:
    """Read several trackers with one cross-process reduction (the mean the state declares) of
    their moments side by side, and one copy to the host."""
    for t in trackers:
        t.flush()
    moments = torch.cat([t.moments for t in trackers])
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        moments = moments.clone()
        dist.all_reduce(moments)
        moments /= dist.get_world_size()
    rows, out, start = moments.tolist(), [], 0
    for t in trackers:
        n = t.moments.shape[0]
        out.append(t.values(rows[start : start + n]))
        start += n
    return out
