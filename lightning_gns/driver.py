"""The per-step driver shared by the Lightning callback and the plain-PyTorch analyzer.

Per micro-batch: :meth:`StepDriver.start_micro_batch` (its number of examples, before the
forward) and :meth:`StepDriver.end_micro_batch` (after its backward); per optimizer step:
:meth:`StepDriver.end_step` (before the optimizer changes ``.grad``) records the source's
:class:`~lightning_gns.records.StepNorms` in the tracker. Device tensors only: no host read on
this path (:mod:`lightning_gns.host_sync` checks it), except on the first step (the batch probe and
the structural check).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn

from lightning_gns import host_sync
from lightning_gns.estimator import GNSValues
from lightning_gns.norms.probe import BatchDimProbe
from lightning_gns.records import Reduction, SkipStep, StepNorms, Units
from lightning_gns.sources import Source
from lightning_gns.tracker import GNSTracker

Warn = Callable[[str, str], None]  # (key, message): warned once per key


def infer_batch_size(batch: Any) -> int:
    """Lightning's inference (the first tensor's dim 0), with a fast path for the usual
    ``(x, y, ...)`` of tensors."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0].shape[0] if batch[0].dim() else 1
    return int(extract_batch_size(batch))


class StepDriver:
    """Feeds one source's records into one tracker.

    Args:
        source: where the norms come from (attached by the caller).
        tracker: where the records go.
        warn: ``warn(key, message)``, called at most once per key by the caller's policy.
        batch_size_fn: ``batch -> examples`` for batches Lightning cannot size.
        strict: raise on a step that cannot be used (the analyzer) instead of skipping it.
        name: the public class whose warnings these are (``GradientNoiseMeter`` in own loops).
    """

    def __init__(
        self,
        source: Source,
        tracker: GNSTracker,
        warn: Warn,
        batch_size_fn: Callable[[Any], int] | None = None,
        strict: bool = False,
        name: str = "GradientNoiseScale",
    ) -> None:
        self.source, self.tracker, self.warn, self.name = source, tracker, warn, name
        self.batch_size_fn, self.strict = batch_size_fn, strict
        self.recent: deque[int] = deque(maxlen=64)  # recent micro-batch sizes
        self.current = 0  # this micro-batch's size (0: unknown)
        self.host_skips = 0
        self.checked = 0  # steps that ran the per-example structural check (not measured)
        self.steps = 0  # optimizer steps recorded or skipped
        self.bad: str | None = None
        self.size_note: str | None = None  # the batch probe found the batch size wrong
        self.probe: BatchDimProbe | None = None
        self.probe_model: nn.Module | None = None  # probe this model's next forward
        self.allowance: host_sync.Allowance | None = None  # reads allowed (first step)
        self.followers: list[StepDriver] = []  # second measurements (preconditioned)
        self.listeners: list[Callable[[StepNorms | None], None]] = []  # each step's record

    @property
    def trackers(self) -> list[GNSTracker]:
        """This driver's tracker, then its followers' (read together)."""
        return [self.tracker, *(f.tracker for f in self.followers)]

    @property
    def usual(self) -> float:
        """The most common recent micro-batch size (NaN before the first)."""
        return float(max(set(self.recent), key=self.recent.count)) if self.recent else math.nan

    # -- per micro-batch ------------------------------------------------------------------
    def start_micro_batch(self, batch: Any) -> int:
        """Size the micro-batch and open it; returns its size (0: unknown)."""
        if self.steps == 0 and self.allowance is None:
            self.allowance = host_sync.Allowance()  # the probe and the structural check read
        if host_sync.CHECK.enabled:
            with host_sync.watched():
                current = self._size_of(batch)
        else:
            current = self._size_of(batch)
        self.current = current
        if current < 1:
            self.bad = "could not tell the batch size of a micro-batch; pass batch_size_fn"
            return 0
        if self.probe_model is not None:
            self.probe, self.probe_model = BatchDimProbe(self.probe_model), None
        self.recent.append(current)
        self.source.start_micro_batch(current, batch)
        for f in self.followers:
            f.source.start_micro_batch(current)
        return current

    def _size_of(self, batch: Any) -> int:
        try:
            fn = self.batch_size_fn
            return int(fn(batch) if fn is not None else infer_batch_size(batch))
        except Exception:  # noqa: BLE001 - an odd batch only costs this step
            return 0

    def end_micro_batch(self, reduction: Reduction) -> None:
        seen = self.close_probe() if self.probe is not None else None
        if seen is not None and seen != self.current:
            self.size_note = f"the batch size was taken as {self.current}, the layers see {seen}"
            self.warn(
                "batch size",
                f"{self.name}: the batch size was taken as {self.current}, but the "
                f"model's layers see {seen} examples per micro-batch; if {seen} is right, pass "
                f"{self.name}(batch_size_fn=lambda batch: ...) (the estimate depends on it)",
            )
        current = self.current
        if current > 0:
            if host_sync.CHECK.enabled:
                with host_sync.watched():
                    self._end_sources(current, reduction)
            else:
                self._end_sources(current, reduction)

    def _end_sources(self, current: int, reduction: Reduction) -> None:
        self.source.end_micro_batch(current, reduction)
        for f in self.followers:
            f.source.end_micro_batch(current, reduction)

    def close_probe(self) -> int | None:
        self.probe_model = None
        seen, self.probe = (self.probe.close() if self.probe else None), None
        return seen

    # -- per optimizer step ---------------------------------------------------------------
    def end_step(self, units: Units) -> StepNorms | None:
        """Record this step (skipped: warned once, counted); the record, or None."""
        bad, self.bad = self.bad, None
        if host_sync.CHECK.enabled:
            with host_sync.watched():
                step = self._step_all(units, bad)
        else:
            step = self._step_all(units, bad)
        self.steps += 1
        if self.allowance is not None and self.steps >= 1:
            self.allowance.close()
        return step

    def _step_all(self, units: Units, bad: str | None) -> StepNorms | None:
        step = self._step(units, bad)
        for f in self.followers:
            f.end_step(units)
        return step

    def _step(self, units: Units, bad: str | None) -> StepNorms | None:
        try:
            step = self.source.end_step(units)
            if bad is not None:
                raise SkipStep(bad)
        except SkipStep as skip:
            if self.strict and not skip.silent:
                raise
            if not skip.silent:
                self.skip(skip.reason)
                return None
            self.checked += 1
            if note := self.source.coverage_note(self.size_note):  # what the check left out
                self.warn("coverage", f"{self.name}: {note}")
            return None
        except Exception as err:  # noqa: BLE001 - statistics must never stop training
            if self.strict:
                raise
            self.skip(f"{type(err).__name__}: {err}")
            return None
        self.record(step)
        return step

    def record(self, step: StepNorms | None) -> None:
        """Into the tracker, then to every listener (None: a step skipped here)."""
        self.tracker.record(step)
        for listener in self.listeners:
            listener(step)

    def resized(self, size: int) -> None:
        """The micro-batch was resized on purpose: :attr:`usual` follows at once."""
        self.recent.clear()
        self.recent.append(size)

    def skip(self, reason: str) -> None:
        """Record this step as skipped, count it, warn once per kind of reason."""
        self.record(None)
        self.host_skips += 1
        self.warn(
            "skip:" + reason.split("'")[0],
            f"{self.name} skipped a step ({reason}); skipped steps are counted in "
            "gns/skipped_steps. Training is not affected.",
        )

    def check_nonfinite(self, values: GNSValues) -> None:
        """Warn once when steps were dropped for non-finite gradients (not host skips)."""
        if values.skipped > self.tracker.last_host_skipped:
            self.warn(
                "non-finite",
                f"{self.name}: steps with non-finite gradients (an AMP overflow, or NaN/inf "
                "in the model) were left out; gns/stale_steps counts the steps since the last "
                "usable one, and gns/b_simple is that old.",
            )

    def detach(self) -> None:
        """Remove every hook (source, followers, probe) and end an open allowance."""
        self.source.detach()
        for f in self.followers:
            f.source.detach()
        self.close_probe()
        if self.allowance is not None:
            self.allowance.close()

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self, sync_processes: bool = False) -> dict[str, Any]:
        trackers = {"tracker": self.tracker.state_dict(sync_processes)}
        for i, f in enumerate(self.followers):
            trackers[f"follower{i}"] = f.tracker.state_dict(sync_processes)
        return {**trackers, "host_skips": self.host_skips, "micro_sizes": list(self.recent)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        note = self.tracker.load_state_dict(sd.get("tracker", {}))
        for i, f in enumerate(self.followers):
            f.tracker.load_state_dict(sd.get(f"follower{i}") or sd.get("preconditioned") or {})
        if note:
            self.warn("decay", f"{self.name}: {note}")
        self.host_skips = int(sd.get("host_skips", 0))
        self.recent.clear()
        self.recent.extend(sd.get("micro_sizes", []))
        self.steps = max(self.steps, 1)  # resumed: not a first step
