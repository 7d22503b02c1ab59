"""A batch sampler whose batch size can change between optimizer steps, without rebuilding the
DataLoader, so :class:`~lightning_gns.adaptive.AdaptiveBatchSize` can grow the micro-batch.

``DataLoader(data, batch_sampler=ResizableBatchSampler(RandomSampler(data), 32))`` behaves like
``batch_size=32, shuffle=True`` (the same first epoch; an inner sampler drawing from torch's
global RNG, ``RandomSampler`` or ``WeightedRandomSampler`` without a generator, draws its
later epochs from a generator seeded at the first, so that a resumed run draws them too).
:meth:`ResizableBatchSampler.resize` schedules a new size
from a batch index of the epoch being drawn: batches already drawn keep their size (the
DataLoader's workers draw ``prefetch_factor × num_workers`` batches ahead; Lightning draws
none ahead of a sized loader), so a change waits for those. Under DDP Lightning rebuilds the
sampler around a ``DistributedSampler`` (the constructor takes ``sampler, batch_size,
drop_last`` like torch's ``BatchSampler``); every rank draws the same number of batches.

Resuming mid-epoch: :meth:`state_dict` records the epoch's order (the inner sampler's
generator, or a global-RNG sampler's seed and the generator of later seeds; a
``DistributedSampler`` orders by seed and epoch), the sizes scheduled and how many batches were
consumed; the first iteration after :func:`resume_next` (or :meth:`load_state_dict`) redraws
the same order and skips them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

import torch
from torch.utils.data import BatchSampler, Sampler

_RESUME: list[dict[str, Any]] = []  # state for the next sampler iteration (one fit at a time)


def resume_next(state: dict[str, Any] | None) -> None:
    """Hand a checkpoint's sampler state to the next :class:`ResizableBatchSampler` iteration
    in this process (Lightning iterates a resumed run's loader before any callback sees it)."""
    _RESUME.clear()
    if state:
        _RESUME.append(dict(state))


class ResizableBatchSampler(BatchSampler):
    """``BatchSampler`` whose size :meth:`resize` changes from a given batch of the epoch on.

    Args:
        sampler: the order of examples (``RandomSampler``, ``SequentialSampler``, ...).
        batch_size: examples per batch at the start.
        drop_last: drop a last batch smaller than the size then in force.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.epoch = 0  # the epoch being drawn (or the last one)
        self.drawn = 0  # batches drawn in it
        self._sizes: list[tuple[int, int]] = [(0, batch_size)]  # (from batch, size) in it
        self._started = False  # an epoch was started
        self._epoch_hint: int | None = None  # from set_epoch
        self._live: object | None = None  # the iteration that may update the counters
        self._order: dict[str, Any] = {}  # how this epoch's order was drawn (generator/seed)
        self._chain: torch.Generator | None = None  # later epochs' seeds (global-RNG samplers)
        self._resume: dict[str, Any] | None = None
        self.resumed = False  # an iteration continued a checkpoint's epoch
        self._setup: tuple | None = None  # the epoch the latest iteration draws
        self._setup_drew = False

    # -- sizes ----------------------------------------------------------------------------
    def size_at(self, index: int) -> int:
        """The size of batch ``index`` of the epoch being drawn."""
        return next(s for start, s in reversed(self._sizes) if start <= index)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The epoch's schedule: (from batch, size), in order."""
        return list(self._sizes)

    def examples_before(self, index: int) -> int:
        """Examples in the batches of the epoch before batch ``index`` (all full)."""
        total = 0
        for k, (start, size) in enumerate(self._sizes):
            end = self._sizes[k + 1][0] if k + 1 < len(self._sizes) else index
            total += size * max(0, min(end, index) - start)
        return total

    def resize(self, size: int, at: int) -> tuple[int, int]:
        """Batches from index ``at`` of the epoch being drawn on have ``size`` examples (from the
        next epoch's start if this one ends first). Returns (epoch, index) where it starts."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.batch_size = size  # every later epoch
        if not self._started:
            self._sizes = [(0, size)]
            return self.epoch, 0
        if at >= len(self):
            return self.epoch + 1, 0
        if at < self.drawn:
            raise ValueError(f"batch {at} of this epoch was drawn already ({self.drawn} were)")
        self._sizes = [(s, b) for s, b in self._sizes if s < at] + [(at, size)]
        return self.epoch, at

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration draws (also handed to the inner sampler)."""
        self._epoch_hint = epoch

    def __len__(self) -> int:
        return epoch_batches(self._sizes, self._n(), self.drop_last)

    def _n(self) -> int:
        if not isinstance(self.sampler, Sized):
            raise TypeError("ResizableBatchSampler needs a sampler with a length")
        return len(self.sampler)

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        """Starts the epoch now (its number and sizes: ``len`` is right at once); the order is
        drawn at the first batch, as the inner sampler draws it. An iteration that drew
        nothing (torch's worker iterator calls ``iter`` twice) is restarted, not counted."""
        if self._setup is None or self._setup_drew:
            self._setup, self._setup_drew = self._new_epoch(), False
        epoch, skip, sizes, order, replay = self._setup
        token = object()
        self.epoch, self.drawn, self._started, self._live = epoch, skip, True, token
        self._sizes = list(sizes)
        return self._batches(token, skip, order, replay)

    def _new_epoch(self) -> tuple[int, int, list, dict | None, dict | None]:
        """(epoch, batches to skip, sizes, order to restore, order of an ended epoch to redraw
        first) of the next iteration: a checkpoint's epoch, or the next one."""
        resume, replay, skip, order = self._take_resume(), None, 0, None
        if resume is not None:
            epoch, skip = int(resume["epoch"]), int(resume["consumed"])
            sizes = [(int(a), int(b)) for a, b in resume["sizes"]]
            self.batch_size = int(resume["batch_size"])
            order = resume.get("order") or {}
            if skip >= epoch_batches(sizes, self._n(), self.drop_last):  # that epoch had ended
                replay, order, epoch, skip = order, None, epoch + 1, 0  # redraw it: its RNG
                sizes = [(0, self.batch_size)]
        else:
            hint, self._epoch_hint = self._epoch_hint, None
            epoch = hint if hint is not None else self.epoch + self._started
            sizes = [(0, self.batch_size)]
        return epoch, skip, sizes, order, replay

    def _batches(
        self, token: object, skip: int, order: dict | None, replay: dict | None
    ) -> Iterator[list[int]]:
        if replay is not None:
            for _ in self._draw_order(self.epoch - 1, replay):
                pass
        indices = self._draw_order(self.epoch, order)
        done = sum(self.size_at(i) for i in range(skip))
        if done:
            next(islice(indices, done - 1, done), None)  # the consumed batches' examples
        index = skip
        while True:
            size = self.size_at(index)
            batch = list(islice(indices, size))
            if not batch or (self.drop_last and len(batch) < size):
                return
            if self._live is token:
                self.drawn, self._setup_drew = index + 1, True
            yield batch
            index += 1

    def _draw_order(self, epoch: int, order: dict[str, Any] | None) -> Iterator[int]:
        """The inner sampler's order for ``epoch``, recording (or restoring) how it is drawn."""
        sampler: Any = self.sampler  # any sampler; set_epoch and generator where it has them
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
        generator = getattr(sampler, "generator", None)
        if isinstance(generator, torch.Generator):
            if order and "generator" in order:
                generator.set_state(order["generator"])
            self._order = {"generator": generator.get_state()}
            return iter(sampler)
        if hasattr(sampler, "generator") and generator is None:
            # A RandomSampler (WeightedRandomSampler) without a generator draws from torch's
            # global RNG, which a resumed process does not share: the first epoch's seed is
            # drawn as RandomSampler draws it (the same order as without this class), later
            # epochs' seeds from a generator seeded with it, kept in the state.
            seed = self._epoch_seed(order)
            chain = self._chain.get_state() if self._chain is not None else None
            self._order = {"seed": seed, "chain": chain}
            sampler.generator = torch.Generator().manual_seed(seed)
            try:
                it = iter(sampler)
                first = next(it, None)
            finally:
                sampler.generator = None
            return it if first is None else _chain(first, it)
        self._order = {}
        return iter(sampler)

    def _epoch_seed(self, order: dict[str, Any] | None) -> int:
        if order and "seed" in order:
            if isinstance(order.get("chain"), torch.Tensor):
                self._chain = torch.Generator()
                self._chain.set_state(order["chain"])
            return int(order["seed"])
        if self._chain is None:
            seed = _global_seed()
            self._chain = torch.Generator().manual_seed(seed)
            return seed
        return int(torch.randint(0, 2**62, (), generator=self._chain).item())

    def _take_resume(self) -> dict[str, Any] | None:
        state, self._resume = self._resume, None
        if state is None and _RESUME:
            state = _RESUME.pop()
        self.resumed = self.resumed or state is not None
        return state

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self, consumed: int) -> dict[str, Any]:
        """The sampler after ``consumed`` batches of the epoch being drawn were trained on."""
        return {
            "epoch": self.epoch,
            "consumed": consumed if self._started else 0,
            "sizes": [list(x) for x in self._sizes],
            "batch_size": self.batch_size,
            "order": dict(self._order),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next iteration (see :func:`resume_next` for Lightning's order)."""
        self._resume = dict(state)
        self.batch_size = int(state["batch_size"])


def epoch_batches(sizes: list[tuple[int, int]], n: int, drop_last: bool) -> int:
    """Batches in an epoch of ``n`` examples under a schedule of (from batch, size).

    Examples:
        >>> epoch_batches([(0, 8), (3, 16)], 100, drop_last=False)  # 3 × 8, 4 × 16, 1 × 12
        8
    """
    index = used = 0
    for k, (_, size) in enumerate(sizes):
        end = sizes[k + 1][0] if k + 1 < len(sizes) else math.inf
        while index < end and used < n:
            take = min(size, n - used)
            if drop_last and take < size:
                return index
            used += take
            index += 1
    return index


def _chain(first: int, rest: Iterator[int]) -> Iterator[int]:
    yield first
    yield from rest


def _global_seed() -> int:
    """A seed from torch's global RNG, drawn as ``RandomSampler`` draws it."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


# -- Lightning glue ------------------------------------------------------------------------


def find_sampler(trainer: Any) -> ResizableBatchSampler | None:
    """The training DataLoader's :class:`ResizableBatchSampler` (None: another sampler)."""
    loaders = trainer.train_dataloader
    if loaders is None:
        return None
    flat = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    if isinstance(loaders, dict):
        flat = list(loaders.values())
    found = [getattr(dl, "batch_sampler", None) for dl in flat]
    found = [s for s in found if isinstance(s, ResizableBatchSampler)]
    return found[0] if len(found) == 1 else None
