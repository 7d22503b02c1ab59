"""What AdaptiveBatchSize does around each optimizer step: the learning-rate multiplier, Adam's
second moment after a change of batch, and the time of a step (the goodput rule)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lightning_gns.estimator import GNSValues, new_state
from lightning_gns.records import MODEL, StepNorms
from lightning_gns.tracker import GNSTracker, read_together

WINDOWS = (0.9, 0.97, 0.99)  # EMA decays of AdaptiveBatchSize's own estimate

# Adam family, RMSprop, Adafactor (its factors: V = row·col/mean(row) scales as they do)
SECOND_MOMENT_KEYS = (
    "exp_avg_sq",
    "max_exp_avg_sq",
    "square_avg",
    "row_var",
    "col_var",
    "variance",
)
ROOT_KEYS = ("exp_inf",)  # Adamax: a running max of |g|, the root of a second moment


class LRScaler:
    """Multiplies every parameter group's rate by :attr:`scale` for the optimizer's update only.

    Lightning runs ``training_step``, backward and ``on_before_optimizer_step`` inside
    ``optimizer.step(closure)``, so the step's pre-hook wraps the closure: the rates are
    scaled after the closure (after every line of the user's code), just before the update,
    and put back to the user's values by the post-hook. Without a closure (AMP with a
    GradScaler runs it first) the pre-hook scales at once. ``after_step(rate)`` is called after
    every update with group 0's rate in it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, after_step: Callable[[float], None]):
        self.scale = 1.0
        self.applied = math.nan  # group 0's rate in the last update
        self._saved: list[Any] | None = None
        self._after_step = after_step
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        self._restore(optimizer)  # a step that raised left the scaled rates
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:
            self._apply(optimizer)
            return None

        def scaled_closure() -> Any:
            out = closure()
            self._apply(optimizer)
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": scaled_closure}
        return (scaled_closure, *args[1:]), kwargs

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        if self._saved is not None:  # a closure called twice (LBFGS): scale once
            return
        self._saved = [g["lr"] for g in optimizer.param_groups]
        if self.scale != 1.0:
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.scale
        self.applied = float(optimizer.param_groups[0]["lr"])

    def _post(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._restore(optimizer)
        self._after_step(self.applied)

    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        if self._saved is not None:
            for g, lr in zip(optimizer.param_groups, self._saved, strict=False):
                g["lr"] = lr
            self._saved = None


def rescale_second_moment(optimizer: torch.optim.Optimizer, ratio: float) -> bool:
    """Multiply the optimizer's running average of squared gradients by ``ratio`` (Adam's v,
    RMSprop's square average, Adafactor's factors; Adamax's max of |g| by √ratio): after a
    change of batch it would describe the old batch's noise for ~1/(1 − β₂) steps. Returns
    whether the optimizer keeps one."""
    found = False
    for state in optimizer.state.values():
        for keys, factor in ((SECOND_MOMENT_KEYS, ratio), (ROOT_KEYS, math.sqrt(ratio))):
            for key in keys:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    value.mul_(factor)
                    found = True
    return found


class StepTimer:
    """Host time per optimizer step: forward and backward (c) and the rest (a), smoothed."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.before_step: float | None = None
        self.a = self.c = math.nan
        self.n = 0

    def observe(self, now: float) -> None:
        if self.start is None or self.before_step is None:
            return
        a, c = now - self.before_step, self.before_step - self.start
        w = max(0.05, 1.0 / (self.n + 1))  # running mean, then an EMA of about 20 steps
        self.a = a if self.n == 0 else (1 - w) * self.a + w * a
        self.c = c if self.n == 0 else (1 - w) * self.c + w * c
        self.n += 1
        self.start = self.before_step = None

    def reset(self) -> None:
        """A new batch: the old timing does not describe it."""
        self.n = 0

    @property
    def timing(self) -> tuple[float, float] | None:
        return (self.a, self.c) if self.n >= 5 else None


class NoiseWindow:
    """B_noise since the last change of batch, from each step's record: short windows (about
    10, 30 and 100 steps; the shortest precise one is read), as the noise scale grows during
    training and a long window lags behind it. Restarted at each change (a new batch)."""

    def __init__(self) -> None:
        self.tracker: GNSTracker | None = None
        self.saved: dict[str, Any] | None = None  # from a checkpoint, until started

    def start(self, device: torch.device) -> None:
        self.restart(device)
        if self.saved and self.tracker is not None:
            self.tracker.load_state_dict(self.saved)

    def restart(self, device: torch.device | None = None) -> None:
        if device is None:
            device = self.tracker.device if self.tracker is not None else torch.device("cpu")
        tracker = GNSTracker(None, [MODEL])
        tracker.decays = WINDOWS
        tracker.moments = new_state(len(WINDOWS))
        self.tracker = tracker.to(device)

    def record(self, sample: StepNorms | None) -> None:
        """Each step's record (GradientNoiseScale's step listener; None: skipped)."""
        if self.tracker is not None:
            self.tracker.record(sample)

    def read(self, sync: bool) -> GNSValues:
        """The window's estimate (with ``sync``: one all-reduce pooling every rank's steps)."""
        assert self.tracker is not None
        return read_together([self.tracker], sync=sync)[0][MODEL]

    def state_dict(self, sync: bool) -> dict[str, Any] | None:
        return self.tracker.state_dict(sync) if self.tracker is not None else self.saved

    def stop(self, sync: bool) -> None:
        self.saved, self.tracker = self.state_dict(sync), None


def max_over_ranks(trainer: Any, value: int) -> int:
    """The largest ``value`` of all ranks (batches drawn ahead can differ by rank)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())
