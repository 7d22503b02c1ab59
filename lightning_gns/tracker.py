"""The estimators' state: pending step records, smoothed moments per column, resumable.

Per step the tracker only keeps the source's record (device tensors and host counts; no
kernel, no host sync). At a read (a logging step) :func:`read_together` pools the pending
records of every process with **one** summing all-reduce (each record holds sums:
:mod:`lightning_gns.records`), turns each pooled step into unbiased |G|² and tr(Σ)
(:func:`~lightning_gns.estimator.pooled_estimates`), feeds the EMAs, and copies the small
moments tensor to the host once. So the estimate and its interval use every process's small
batches, and the EMA state is the same on every process (nothing else to reduce).

State and its reduction across processes, declared: ``pending`` records reduce by **sum** (at
the read); ``moments`` are identical on every process after a read (**replicated**).
Every process records the same steps (a step skipped on one records a NaN there, which the
sum carries to all: the step is skipped everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gns.estimator import (
    ADAPTIVE_DECAYS,
    FIELDS,
    GNSValues,
    check_decay,
    choose_window,
    ema_update,
    new_state,
    pooled_estimates,
    values_from_moments,
)
from lightning_gns.records import MODEL, StepNorms

COUNTS = 5  # per record after the columns: small count, Σ1/b, big count, Σ1/b, host skip


class GNSTracker:
    """Bias-corrected EMAs of |G|² and tr(Σ) for the model and optional per-layer columns.

    Args:
        ema_decay: EMA decay per optimizer step in (0, 1), a fixed window of about 1/(1 − β)
            steps; ``None`` (default) for the adaptive window: EMAs at
            :data:`~lightning_gns.estimator.ADAPTIVE_DECAYS` side by side, read out from the
            shortest one whose interval is precise.
        columns: names of the estimated quantities (``"model"`` first, then layers).
        running_mean: weigh every step equally instead (the analyzer's fixed set of batches).
        max_pending: after this many pending steps, one process feeds them to the EMAs; several
            pack them into one tensor until the next read (no sync either way).
    """

    def __init__(
        self,
        ema_decay: float | None = None,
        columns: Sequence[str] = (MODEL,),
        running_mean: bool = False,
        max_pending: int = 256,
        device: torch.device | str | None = None,
    ) -> None:
        self.ema_decay = check_decay(ema_decay)
        if running_mean:
            self.decays: tuple[float, ...] = (1.0,)
        else:
            self.decays = (self.ema_decay,) if self.ema_decay is not None else ADAPTIVE_DECAYS
        self.columns = list(columns)
        self.max_pending = max_pending
        rows = len(self.columns) * len(self.decays)  # row c·W + w: column c, window w
        self.moments = new_state(rows, device)
        self.host_skipped = torch.zeros((), dtype=torch.float64, device=device)
        self.last_host_skipped = 0  # at the last read: steps a process skipped for a known reason
        self._steps: list[StepNorms | None] = []  # since the last pack
        self._packed: list[Tensor] = []  # (n, 2C + COUNTS) blocks of earlier steps

    @property
    def device(self) -> torch.device:
        return self.moments.device

    def to(self, device: torch.device | str) -> GNSTracker:
        self.moments = self.moments.to(device)
        self.host_skipped = self.host_skipped.to(device)
        self._packed = [p.to(device) for p in self._packed]
        return self

    # -- per step ------------------------------------------------------------------------
    def record(self, step: StepNorms | None) -> None:
        """Add one optimizer step (``None``: skipped here for a reason the host knows)."""
        self._steps.append(step)
        if len(self._steps) >= self.max_pending:
            if _distributed():
                self._pack()  # pooled at the next read: (2C + 5) numbers per step meanwhile
            else:
                self.feed(self.take_pending())  # one process: nothing to pool

    @property
    def pending(self) -> int:
        """Steps recorded since the last read."""
        return len(self._steps) + sum(p.shape[0] for p in self._packed)

    def _pack(self) -> None:
        """The recorded steps as rows (columns' small sums, big parts, then the counts)."""
        if not self._steps:
            return
        c, st = len(self.columns), self.moments
        nan = torch.full((2 * c,), float("nan"), dtype=st.dtype, device=st.device)
        norms = torch.stack(
            [nan if s is None else torch.cat([s.small_sum, s.big_part]).to(st) for s in self._steps]
        )
        counts = [
            (1.0, 1.0, 1.0, 1.0, 1.0)
            if s is None
            else (s.small_count, s.small_inv, s.big_count, s.big_inv, 0.0)
            for s in self._steps
        ]
        host = torch.tensor(counts, dtype=st.dtype).to(st.device, non_blocking=True)
        self._packed.append(torch.cat([norms, host], dim=1))
        self._steps = []

    def take_pending(self) -> Tensor:
        """Every pending step as one (n, 2C + 5) tensor; clears them."""
        self._pack()
        width = 2 * len(self.columns) + COUNTS
        blocks, self._packed = self._packed, []
        if not blocks:
            return self.moments.new_zeros(0, width)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def feed(self, rows: Tensor) -> None:
        """EMA updates from pooled rows (device ops only)."""
        if rows.shape[0] == 0:
            return
        c = len(self.columns)
        small, big, counts = rows[:, :c], rows[:, c : 2 * c], rows[:, 2 * c :]
        g2, s = pooled_estimates(
            small, big, counts[:, :1], counts[:, 1:2], counts[:, 2:3], counts[:, 3:4]
        )
        self.host_skipped = self.host_skipped + (counts[:, 4] > 0).sum()
        self.update(g2, s)

    def update(self, grad_norm_sq: Tensor, trace_cov: Tensor) -> None:
        """EMA update with ``(n, columns)`` unbiased per-step estimates (every window)."""
        w = len(self.decays)
        beta = torch.tensor(self.decays, dtype=self.moments.dtype, device=self.moments.device)
        self.moments = ema_update(
            self.moments,
            grad_norm_sq.repeat_interleave(w, dim=1),
            trace_cov.repeat_interleave(w, dim=1),
            beta.repeat(len(self.columns)),
        )

    def reset(self) -> None:
        """Forget every step recorded (the state of a new tracker)."""
        self.moments = torch.zeros_like(self.moments)
        self.host_skipped = torch.zeros_like(self.host_skipped)
        self._steps, self._packed = [], []

    # -- read-out ------------------------------------------------------------------------
    def read(self, sync: bool = False) -> dict[str, GNSValues]:
        """Pool (across processes if ``sync``), feed, and read every column on the host."""
        return read_together([self], sync)[0]

    def values(self, rows: list[list[float]]) -> dict[str, GNSValues]:
        """Every column's read-out from this tracker's moments as host rows (with the adaptive
        window: the shortest window whose interval is precise)."""
        w = len(self.decays)
        return {
            name: choose_window([values_from_moments(*r) for r in rows[i * w : (i + 1) * w]])
            for i, name in enumerate(self.columns)
        }

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self, sync: bool = False) -> dict[str, Any]:
        """Plain numbers to resume from (pending steps are pooled and fed first: with ``sync``
        this is a collective, as Lightning's checkpointing is on every process)."""
        flush_together([self], sync)
        rows, w = self.moments.tolist(), len(self.decays)
        return {
            "ema_decay": self.ema_decay,
            "decays": list(self.decays),
            "fields": list(FIELDS),
            "moments": {name: rows[i * w : (i + 1) * w] for i, name in enumerate(self.columns)},
            "host_skipped": float(self.host_skipped),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> str | None:
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
        self.host_skipped.fill_(float(saved.get("host_skipped", 0.0)))
        self._steps, self._packed = [], []
        saved_decay = saved.get("ema_decay", self.ema_decay)
        if saved_decay == self.ema_decay:
            return None
        return (
            f"resuming with ema_decay={self.ema_decay} from a checkpoint written with "
            f"{saved_decay}; "
            f"the smoothed state is kept and ema_decay={self.ema_decay} applies from here on."
        )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def flush_together(
    trackers: Sequence[GNSTracker], sync: bool = False, extra: Tensor | None = None
) -> None:
    """Pool every tracker's pending steps with one summing all-reduce (``sync`` and several
    processes), then feed each tracker's EMAs. ``extra``: a 1-D tensor of the trackers' dtype
    summed across the processes in the same reduction (in place)."""
    blocks = [t.take_pending() for t in trackers]
    if sync and _distributed():
        parts = [b.flatten() for b in blocks] + ([] if extra is None else [extra])
        flat = torch.cat(parts) if parts else None
        if flat is not None and flat.numel() > 0:
            dist.all_reduce(flat)
            start = 0
            for i, b in enumerate(blocks):
                blocks[i] = flat[start : start + b.numel()].view_as(b)
                start += b.numel()
            if extra is not None:
                extra.copy_(flat[start:])
    for t, b in zip(trackers, blocks, strict=True):
        t.feed(b)


def read_together(trackers: Sequence[GNSTracker], sync: bool = False) -> list[dict[str, GNSValues]]:
    """Read several trackers with one pooling all-reduce of their pending steps and one copy
    of their moments (and host-skip counts) to the host."""
    flush_together(trackers, sync)
    parts = [t.moments.flatten() for t in trackers] + [t.host_skipped.reshape(1) for t in trackers]
    flat = torch.cat(parts).tolist()
    out, start = [], 0
    for t in trackers:
        rows, width = t.moments.shape
        block = flat[start : start + rows * width]
        out.append(t.values([block[r * width : (r + 1) * width] for r in range(rows)]))
        start += rows * width
    skipped = flat[start:]
    for t, n in zip(trackers, skipped, strict=True):
        t.last_host_skipped = int(n)
    return out
