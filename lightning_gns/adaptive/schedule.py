"""The batch a run is at, and its changes: decided at a read-out, applied where a whole
accumulation window starts that no DataLoader worker has drawn yet (the same batch index on
every rank), kept with their reasons, checkpointed (a change decided but not yet applied
too, so a resumed run changes at the same step as the uninterrupted one)."""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from lightning_gns.adaptive.ladder import Change, Pending, batch_text
from lightning_gns.adaptive.per_step import max_over_ranks
from lightning_gns.adaptive.sampler import ResizableBatchSampler


class BatchSchedule:
    """Accumulation and micro-batch now (micro None: not resizable), the pending change, the
    changes so far, and why the batch stays (said once per kind of reason)."""

    def __init__(self) -> None:
        self.accumulate: int | None = None
        self.micro: int | None = None
        self.pending: Pending | None = None
        self.changes: list[Change] = []
        self.last_change = 0  # optimizer steps before the last change
        self.waiting: str | None = None
        self._said: set[str] = set()

    @property
    def now(self) -> tuple[int, int | None]:
        assert self.accumulate is not None
        return self.accumulate, self.micro

    def steps_since_change(self, done: int) -> int | None:
        return done - self.last_change if self.changes else None

    def follow(
        self, sampler: ResizableBatchSampler | None, before: ResizableBatchSampler | None,
        epoch: int,
    ) -> bool:  # fmt: skip
        """At an epoch start: the micro-batch is the resizable sampler's (None without one);
        a reloaded DataLoader's sampler is set to the size in force. True: the first sampler
        (its size is the user's micro-batch)."""
        first = False
        if sampler is not None and sampler is not before:  # first epoch, or reloaded
            if self.micro is None:
                self.micro, first = sampler.batch_size, True
            elif not sampler.resumed:  # a reloaded DataLoader: its sampler starts as built
                p = self.pending
                due = p is not None and p.micro is not None and p.epoch <= epoch
                sampler.batch_size = p.micro if due and p is not None and p.micro else self.micro
        if sampler is None:
            self.micro = None
        else:
            sampler.set_epoch(epoch)
        return first

    def schedule(
        self,
        trainer: Any,
        target: tuple[int, int | None],
        why: str,
        noise: float,
        sampler: ResizableBatchSampler | None,
        ready: int,
    ) -> None:
        """Pend ``target`` from the first batch that starts a whole window of both the old
        and the new accumulation and that no worker has drawn (the largest over ranks), or
        from the next epoch; a new micro-batch is scheduled in the sampler from there."""
        accumulate, micro = target
        resize = sampler if micro != self.micro and micro is not None else None
        drawn = max_over_ranks(trainer, max(ready, resize.drawn)) if resize else ready
        window = max(self.now[0], accumulate)
        at = -(-drawn // window) * window
        epoch = trainer.current_epoch
        if resize is not None and micro is not None:
            epoch, at = resize.resize(micro, at)  # the epoch's length: adaptive.loop
        elif at >= trainer.num_training_batches:
            epoch, at = epoch + 1, 0
        self.pending = Pending(accumulate, micro, why, noise, epoch, at)

    def due(self, epoch: int, index: int) -> Pending | None:
        """The pending change if batch ``index`` of ``epoch`` is where it starts."""
        p = self.pending
        return p if p is not None and (epoch, index) >= (p.epoch, p.index) else None

    def take(self, p: Pending, step: int, batch: float, lr_scale: float) -> Change:
        """Apply ``p`` after ``step`` optimizer steps (the new batch, its LR multiplier)."""
        old, old_micro = self.now
        self.accumulate, self.micro, self.pending = p.accumulate, p.micro, None
        self.last_change, self.waiting = step, None
        self._said.clear()
        change = Change(step, old, p.accumulate, batch, lr_scale, p.reason, old_micro, p.micro)
        self.changes.append(change)
        return change

    def wait(self, reason: str) -> bool:
        """Keep why the batch stays; True the first time for its kind of reason (the same
        words with other numbers are the same kind), to be said then."""
        self.waiting = reason
        kind = re.sub(r"[0-9][0-9,.]*", "#", reason)
        new = kind not in self._said
        self._said.add(kind)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {
            "accumulate": self.accumulate,
            "micro": self.micro,
            "last_change": self.last_change,
            "changes": [asdict(c) for c in self.changes],
            "pending": asdict(self.pending) if self.pending is not None else None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.accumulate, self.micro = sd.get("accumulate"), sd.get("micro")
        self.last_change = int(sd.get("last_change", 0))
        self.changes = [Change(**c) for c in sd.get("changes", [])]
        pending = sd.get("pending")
        self.pending = Pending(**pending) if pending else None


def change_message(change: Change, old_batch: float, scaling: str, adam: str) -> str:
    """The line a change is logged with, and its reason."""
    parts = []
    if change.old_micro != change.new_micro:
        parts.append(f"micro-batch {change.old_micro} -> {change.new_micro}")
    if change.old != change.new:
        parts.append(f"accumulate_grad_batches {change.old} -> {change.new}")
    return (
        f"AdaptiveBatchSize: step {change.step}: batch {batch_text(old_batch)} -> "
        f"{batch_text(change.batch_size)} ({', '.join(parts)}), learning rate × "
        f"{change.lr_scale:.4g} ({scaling}{adam}) because {change.reason}"
    )
