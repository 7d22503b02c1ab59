"""AdaptiveBatchSize's decisions and changes, apart from its Lightning hooks: at a read-out
(every ``check_every_n_steps`` steps) rank 0 decides with the rules of
:mod:`lightning_gns.adaptive.ladder` and every rank schedules the same change; at the batch it
starts, the change is applied: accumulation, micro-batch, learning-rate multiplier, Adam's second
moment, a fresh B_noise window, and a line with the reason."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_gns import _compat, keys
from lightning_gns.adaptive import rules
from lightning_gns.adaptive.ladder import Decision, Ladder, Pending, Rules, batch_text
from lightning_gns.adaptive.per_step import LRScaler, NoiseWindow, StepTimer, rescale_second_moment
from lightning_gns.adaptive.rules import lr_scale
from lightning_gns.adaptive.sampler import ResizableBatchSampler, resume_next
from lightning_gns.adaptive.schedule import BatchSchedule, change_message
from lightning_gns.estimator import GNSValues
from lightning_gns.norms.preconditioner import GRADIENT_SCALES, keeps_second_moment
from lightning_gns.norms.tensor_parallel import data_parallel_size
from lightning_gns.publish import publish

if TYPE_CHECKING:
    from lightning_gns.callback import GradientNoiseScale


class Growing:
    """The decision at a read-out and the change at its batch (mixed into AdaptiveBatchSize)."""

    rule: str
    lr_scaling: str
    lr_scale: float
    rescale_second_moment: bool
    batches: BatchSchedule
    _ladder: Ladder
    _rules: Rules
    _window: NoiseWindow
    _timer: StepTimer
    _lr: LRScaler | None
    _gns: GradientNoiseScale | None
    _sampler: ResizableBatchSampler | None
    _probing: bool
    _ready: int
    probe: int
    factor: int
    max_accumulate: int

    # -- decisions ------------------------------------------------------------------------
    def _decide(self, trainer: pl.Trainer, done: int) -> None:
        """Read the window (one reduction across ranks), let rank 0 choose, every rank takes
        its choice (one broadcast) and schedules it for the same batch index."""
        if self._gns is not None and self._gns.agree_once():
            self._window.restart()  # its steps mixed modules left out since (meter.py)
        values = self._window.read(sync=trainer.world_size > 1)
        noise, _ = rules.noise_bound(values)
        now = self.batches.now
        if self.lr_scaling == "adascale":  # the gain follows the estimate at every read
            self._set_lr_scale(trainer, self._ladder.batch(*now), noise)
        choice = self._choose(values, done) if trainer.is_global_zero else None
        choice = trainer.strategy.broadcast(choice, src=0)
        if self._probing and choice is not None:  # the probe's interval is in
            self._probing = False
            self._window.restart()  # B_noise from here on
            if isinstance(choice, str):  # it stays at the probe's batch: that batch's rate
                self._set_lr_scale(trainer, self._ladder.batch(*now), noise)
            # else the user's rate until the change starts (later, with prefetching workers)
        if isinstance(choice, str):
            if self.batches.wait(choice):
                batch = batch_text(self._ladder.batch(*now))
                rank_zero_info(f"AdaptiveBatchSize: batch {batch}: {choice}")
        elif choice is not None:
            ready = _compat.batches_ready(trainer, self._ready)
            self.batches.schedule(trainer, choice[:2], choice[2], noise, self._sampler, ready)
        self._publish(trainer)

    def _choose(self, v: GNSValues, done: int) -> Decision:
        """Rank 0's decision (:mod:`lightning_gns.adaptive.ladder`); none while a change waits."""
        if self.batches.pending is not None:
            return None
        if self._probing:
            return self._rules.after_probe(self._ladder, v, self.batches.now)
        since = self.batches.steps_since_change(done)
        return self._rules.decide(self._ladder, v, self.batches.now, since, self._timer.timing)

    def _apply(self, trainer: pl.Trainer, p: Pending) -> None:
        """The pending change starts with this batch: accumulation, micro-batch, LR, Adam's
        second moment, a fresh window, and a line with the reason."""
        assert self._gns is not None
        old_batch = self._ladder.batch(*self.batches.now)
        batch = self._ladder.batch(p.accumulate, p.micro)
        trainer.accumulate_grad_batches = p.accumulate
        if p.micro != self.batches.micro and p.micro is not None:
            self._gns.micro_batch_resized(p.micro)
        self._timer.reset()
        adam = ""
        ratio = rules.second_moment_ratio(p.noise, old_batch, batch)
        if self.rescale_second_moment and ratio != 1.0:
            if rescale_second_moment(trainer.optimizers[0], ratio):
                adam = f", second moment × {ratio:.3g}"
        self._set_lr_scale(trainer, batch, p.noise)
        self._window.restart()  # B_noise at the new batch
        change = self.batches.take(p, trainer.global_step, batch, self.lr_scale)
        message = change_message(change, old_batch, self._scaling(trainer), adam)
        rank_zero_info(message)
        for logger in trainer.loggers:  # the reason, where a logger takes text
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text(keys.BATCH_SIZE_CHANGE, message, trainer.global_step)
        self._publish(trainer)

    def _start_probe(self, trainer: pl.Trainer, batch: Any) -> None:
        """The first steps accumulate at least ``probe`` examples (at the user's rate) until
        B_noise's interval is tight or 10 records are in: its lower bound picks the batch to
        go on with (:meth:`~lightning_gns.adaptive.ladder.Rules.after_probe`)."""
        assert self._gns is not None and self.batches.accumulate is not None
        fn = self._gns.batch_size_fn
        micro = int(fn(batch) if fn else extract_batch_size(batch)) * data_parallel(trainer)
        accumulate = self.batches.accumulate
        whole = self._ladder.epoch(self.batches.micro)[0]  # a step is at most an epoch
        while (
            micro * accumulate < self.probe
            and accumulate * self.factor <= self.max_accumulate
            and accumulate < whole
        ):
            accumulate *= self.factor
        self.batches.accumulate = trainer.accumulate_grad_batches = accumulate

    # -- learning rate, logging -----------------------------------------------------------
    def _set_lr_scale(self, trainer: pl.Trainer, batch: float, noise: float) -> None:
        base = self._ladder.base_batch(self.batches.micro)
        self.lr_scale = lr_scale(self._scaling(trainer), batch, base, noise)
        if self._lr is not None:
            self._lr.scale = self.lr_scale

    def _scaling(self, trainer: pl.Trainer) -> str:
        if self.lr_scaling != "auto":
            return self.lr_scaling
        return "sqrt" if keeps_second_moment(trainer.optimizers[0], GRADIENT_SCALES) else "linear"

    def _publish(self, trainer: pl.Trainer) -> None:
        accumulate, micro = self.batches.now
        metrics = {keys.ACCUMULATE: float(accumulate), keys.LR_SCALE: self.lr_scale}
        if micro is not None:
            metrics[keys.MICRO_BATCH] = float(micro)
        if self._lr is not None and math.isfinite(self._lr.applied):
            metrics[keys.LR] = self._lr.applied
        publish(trainer, None, metrics)


class Resumable:
    """AdaptiveBatchSize's state as plain numbers and tensors (mixed into it): the schedule,
    the ladder's base, the LR multiplier, the sqrt rule's reference, the probe, the window,
    the sampler's position."""

    batches: BatchSchedule
    min_accumulate: int | None
    lr_scale: float
    _based: bool
    _ladder: Ladder
    _rules: Rules
    _window: NoiseWindow
    _sampler: ResizableBatchSampler | None
    _trainer: pl.Trainer | None
    _probing: bool
    _ready: int

    def state_dict(self) -> dict[str, Any]:
        t, sampler = self._trainer, None
        if self._sampler is not None and t is not None:
            sampler = self._sampler.state_dict(_compat.batches_ready(t, self._ready))
        tracker = self._window.state_dict(t is not None and t.world_size > 1)
        return {
            **self.batches.state_dict(),
            "base": list(self._ladder.base) if self._based else None,
            "min_accumulate": self.min_accumulate,
            "lr_scale": self.lr_scale,
            "reference": self._rules.reference,
            "probing": self._probing,
            "tracker": tracker,
            "sampler": sampler,
        }

    _init_args: dict[str, Any]
    _run: tuple[int, int] | None = None  # (trainer, module) of the fit that ended last

    def _begin_run(self, run: tuple[int, int]) -> None:
        """Another fit than the last one starts afresh (as constructed); the same continues."""
        if self._run not in (None, run):
            self.__init__(**self._init_args)  # type: ignore[misc]
        self._run = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._run is not None:  # a checkpoint after an earlier fit: from it alone
            self._begin_run((0, 0))
        self.batches.load_state_dict(state_dict)
        if base := state_dict.get("base"):
            self._ladder.base, self._based = (int(base[0]), base[1]), True
        self.min_accumulate = self.min_accumulate or state_dict.get("min_accumulate")
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        ref = state_dict.get("reference")
        self._rules.reference = (float(ref[0]), float(ref[1])) if ref else None
        self._probing = bool(state_dict.get("probing", False))
        self._window.saved = state_dict.get("tracker")
        resume_next(state_dict.get("sampler"))


def data_parallel(trainer: pl.Trainer) -> int:
    """Processes that see different examples (tensor parallel: the world / TP)."""
    return data_parallel_size(trainer.strategy, trainer.world_size)
