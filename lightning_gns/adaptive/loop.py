"""The user's loop through a change of micro-batch: Lightning counts an epoch, its limit and its
validation schedule in batches, read once at set-up; a grown micro-batch makes fewer, larger
batches. :class:`UserLoop` keeps the user's schedule in examples of the micro-batch the run
started with (``limit_train_batches``, ``val_check_interval`` as a float or an int,
``check_val_every_n_epoch``) and tells Lightning, batch by batch, where the epoch ends and
whether to validate now. Nothing changes while the micro-batch is the user's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_gns._compat import set_epoch_length
from lightning_gns.adaptive.sampler import ResizableBatchSampler, epoch_batches


@dataclass
class UserLoop:
    """The user's schedule in batches of ``base_micro``: ``limit`` batches an epoch, a
    validation every ``val_every`` (None: Lightning's own, e.g. time-based), counted within
    each epoch or across epochs (``check_val_every_n_epoch=None``).

    Examples:
        >>> loop = UserLoop(base_micro=8, examples=100, limit=13, val_every=13)
        >>> loop.budget, loop.position(40), loop.position(100)
        (100, 5.0, 13.0)
        >>> loop.validates(start=96, end=100, epoch=0), loop.validates(start=0, end=96, epoch=0)
        (True, False)
    """

    base_micro: int
    examples: int
    limit: int
    val_every: int | None
    across_epochs: bool = False

    @classmethod
    def of(cls, trainer: Any, sampler: ResizableBatchSampler, base_micro: int) -> UserLoop:
        """The schedule Lightning reads at set-up, for an epoch of ``base_micro`` batches."""
        n = len(sampler.sampler)  # type: ignore[arg-type]
        full = epoch_batches([(0, base_micro)], n, sampler.drop_last)
        limit = trainer.limit_train_batches
        batches = min(full, limit) if isinstance(limit, int) else int(full * limit)
        interval, every = trainer.val_check_interval, None
        if getattr(trainer, "_val_check_time_interval", None) is None:
            if isinstance(interval, int):
                every = interval
            elif isinstance(interval, float):
                every = max(1, int(batches * interval))
        return cls(base_micro, n, max(batches, 1), every, trainer.check_val_every_n_epoch is None)

    @property
    def budget(self) -> int:
        """Examples an epoch trains on: its first ``limit`` batches of ``base_micro``."""
        return min(self.limit * self.base_micro, self.examples)

    def position(self, examples: float) -> float:
        """Where ``examples`` trained on in an epoch are, in batches of ``base_micro``."""
        return float(self.limit) if examples >= self.budget else examples / self.base_micro

    def validates(self, start: int, end: int, epoch: int) -> bool:
        """Whether the batch of examples [start, end) of ``epoch`` passes a validation point."""
        if self.val_every is None:
            return False
        offset = epoch * self.limit if self.across_epochs else 0
        first, last = offset + self.position(start), offset + self.position(end)
        return math.floor(last / self.val_every + 1e-9) > math.floor(first / self.val_every + 1e-9)

    def batches_at(self, micro: int, drop_last: bool) -> int:
        """Batches of an epoch drawn all at ``micro`` examples."""
        return epoch_batches([(0, micro)], self.budget, drop_last)

    def batches(self, sampler: ResizableBatchSampler) -> int:
        """Batches of the epoch being drawn until the epoch's examples are trained on."""
        return epoch_batches(sampler.sizes, self.budget, sampler.drop_last)


class LoopKeeper:
    """Keeps Lightning's loop on the user's schedule once the micro-batch has grown (private
    loop attributes: ``fit_loop.max_batches``, the combined loader's limits, the fetcher's
    length, ``trainer.val_check_batch``; fallback: Lightning's own, counted in batches)."""

    def __init__(self) -> None:
        self.loop: UserLoop | None = None
        self._seen: tuple | None = None  # the schedule last told to Lightning
        self._lightning: Any = None  # val_check_batch as Lightning set it

    def start(self, trainer: Any, sampler: ResizableBatchSampler | None, base: int | None) -> None:
        self.loop = UserLoop.of(trainer, sampler, base) if sampler and base else None

    def before_batch(self, trainer: Any, sampler: ResizableBatchSampler | None) -> None:
        """The epoch's length, when the sizes drawn changed (a resize, a new epoch)."""
        if self.loop is None or sampler is None or not self._grown(sampler):
            return
        key = (sampler.epoch, tuple(sampler.sizes))
        if key != self._seen:
            self._seen = key
            set_epoch_length(trainer, self.loop.batches(sampler))

    def after_batch(self, trainer: Any, sampler: ResizableBatchSampler | None, index: int) -> None:
        """Before Lightning asks whether to validate after batch ``index``: yes exactly where
        the user's schedule, in examples, puts a validation."""
        loop = self.loop
        if loop is None or sampler is None or loop.val_every is None:
            return
        if not self._grown(sampler):
            if self._lightning is not None:
                trainer.val_check_batch, self._lightning = self._lightning, None
            return
        if self._lightning is None:
            self._lightning = trainer.val_check_batch
        start = sampler.examples_before(index)
        end = min(start + sampler.size_at(index), loop.budget)
        if index + 1 >= loop.batches(sampler):  # the epoch's last (drop_last: short of it)
            end = loop.budget
        now = loop.validates(start, end, trainer.current_epoch)
        counted = index
        if loop.across_epochs:
            counted = getattr(trainer.fit_loop.epoch_loop, "total_batch_idx", index)
        trainer.val_check_batch = counted + 1 if now else counted + 2

    def _grown(self, sampler: ResizableBatchSampler) -> bool:
        assert self.loop is not None
        return any(size != self.loop.base_micro for _, size in sampler.sizes)


def epoch_size(
    trainer: Any, keeper: LoopKeeper, sampler: ResizableBatchSampler | None, micro: int | None
) -> tuple[float, float]:
    """(micro-batches, examples) of an epoch on this process at micro-batch ``micro`` (None:
    the loader's own, which does not resize); inf while unknown (before the data is set up,
    an iterable data set)."""
    if micro is not None and keeper.loop is not None and sampler is not None:
        loop = keeper.loop
        return float(max(loop.batches_at(micro, sampler.drop_last), 1)), float(loop.budget)
    n = trainer.num_training_batches
    if not (isinstance(n, (int, float)) and 1 <= n < math.inf):
        return math.inf, math.inf
    loader = trainer.train_dataloader
    batches = getattr(loader, "batch_sampler", None)
    try:  # (batch_size=None: the data set's items are batches, examples not known)
        examples = float(len(batches.sampler)) if batches is not None else math.inf
    except (AttributeError, TypeError):
        return float(n), math.inf
    if getattr(batches, "drop_last", False):
        examples -= examples % (getattr(loader, "batch_size", None) or 1)
    return float(n), examples


def cannot_grow(trainer: Any, max_micro_batch: int | None) -> str | None:
    """Why the micro-batch cannot grow although ``max_micro_batch`` asks for it (None: it can,
    or it was not asked), with the fix."""
    if max_micro_batch is None:
        return None
    loaders = trainer.train_dataloader
    flat = list(loaders.values()) if isinstance(loaders, dict) else loaders
    flat = flat if isinstance(flat, (list, tuple)) else [flat]
    found = [getattr(dl, "batch_sampler", None) for dl in flat if dl is not None]
    found = [s for s in found if s is not None]  # batch_size=None: the dataset yields batches
    if any(isinstance(s, ResizableBatchSampler) for s in found):
        return None
    names = ", ".join(sorted({type(s).__name__ for s in found})) or "no batch sampler"
    return (
        f"AdaptiveBatchSize: max_micro_batch={max_micro_batch}, but the training DataLoader "
        f"draws with {names}, which cannot grow: the batch grows by accumulate_grad_batches "
        "only. To grow the micro-batch, build the DataLoader with batch_sampler="
        "ResizableBatchSampler(sampler, batch_size) (lightning_gns.adaptive.sampler; it takes "
        "torch's BatchSampler arguments), or pass max_micro_batch=None to silence this"
    )


def warn_cannot_grow(trainer: Any, max_micro_batch: int | None) -> bool:
    """Warn once (rank 0) when the micro-batch cannot grow; True if warned."""
    message = cannot_grow(trainer, max_micro_batch)
    if message is not None:
        rank_zero_warn(message)
    return message is not None
