"""AdaptiveBatchSize in real runs: the rate each step uses, resume, callback order, refusals,
what it says. The rules themselves: tests/test_growth.py."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from adaptive_helpers import LoudNoise, Small, params
from helpers import Classifier, mlp, trainer_kwargs
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint

from lightning_gns import GradientNoiseScale
from lightning_gns.adaptive import AdaptiveBatchSize


class RateProbe(Small):
    """Sets its learning rate the way ``how`` says and records, per optimizer step, the rate
    its own code meant (``user``), the rate its code saw in the optimizer during the step
    (``seen``), the rate the update used (plain SGD: Δθ = −η·g, so η = −Δθ·g/|g|²), the
    accumulation, AdaptiveBatchSize's multiplier and ``gns/lr`` after the step."""

    def __init__(self, how: str) -> None:
        super().__init__(n=256, batch_size=8, lr=0.1)
        self.how = how
        self.rows: list[dict] = []
        self.micro_batches = 0
        self.meant = 0.1
        self.seen = math.nan
        self._before: dict | None = None

    def _groups(self) -> list[dict]:
        return self.trainer.optimizers[0].param_groups

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.how == "batch_start":
            self.meant = 0.05 * (1 + 0.01 * self.global_step)
            for g in self._groups():
                g["lr"] = self.meant

    def training_step(self, batch, batch_idx):
        self.micro_batches += 1
        self.seen = self._groups()[0]["lr"]
        if self.how == "set":  # nanoGPT style
            for g in self._groups():
                g["lr"] = self.meant = 0.1
        elif self.how == "decay":
            self.meant *= 0.97
            for g in self._groups():
                g["lr"] *= 0.97
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.how == "exponential":  # chainable: reads the group's rate
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.98)
        elif self.how == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=0.2, total_steps=200, cycle_momentum=False
            )
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        p = self.model[0].weight
        ada = next(c for c in self.trainer.callbacks if isinstance(c, AdaptiveBatchSize))
        scheds = self.lr_schedulers()
        self._before = dict(
            old=p.detach().clone(),
            grad=p.grad.detach().clone(),
            user=scheds.get_last_lr()[0] if scheds is not None else self.meant,
            seen=self.seen,
            scale=ada.lr_scale,
            acc=self.trainer.accumulate_grad_batches,
        )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._before is None:
            return
        row, self._before = self._before, None
        grad = row.pop("grad")
        step = self.model[0].weight.detach() - row.pop("old")
        row["used"] = float(-(step * grad).sum() / grad.square().sum())
        row["logged"] = float(self.trainer.callback_metrics.get("gns/lr", math.nan))
        self.rows.append(row)


def run_rates(tmp_path, how: str, scaling: str, precision: str = "32-true") -> RateProbe:
    module = RateProbe(how)
    gns = LoudNoise(log_every_n_steps=5)
    ada = AdaptiveBatchSize(max_accumulate=4, min_steps_between=10, lr_scaling=scaling)
    kw = trainer_kwargs(tmp_path, max_steps=40, callbacks=[gns, ada], precision=precision)
    pl.Trainer(**kw).fit(module)
    assert [c.new for c in ada.changes] == [2, 4], ada.changes
    return module


@pytest.mark.parametrize(
    "how,scaling,precision",
    [
        ("set", "linear", "32-true"),
        ("set", "linear", "bf16-mixed"),
        ("decay", "none", "32-true"),
        ("batch_start", "sqrt", "32-true"),
        ("exponential", "linear", "32-true"),
    ],
)
def test_the_rate_used_is_the_users_times_the_documented_multiplier(
    tmp_path, how, scaling, precision
) -> None:
    """Whatever the user's code set (in training_step, on_train_batch_start, a scheduler) is
    what the step uses, times the multiplier (linear: the batch ratio; sqrt: its root; none:
    1); the user's code only ever sees its own rate, so its own schedule advances as written.
    """
    rows = run_rates(tmp_path, how, scaling, precision).rows
    expected = {"linear": lambda k: k, "sqrt": math.sqrt, "none": lambda k: 1.0}[scaling]
    for row in rows:
        assert row["scale"] == pytest.approx(expected(row["acc"]))
        assert row["used"] == pytest.approx(row["user"] * row["scale"], rel=1e-3), row
        # inside the step (the last micro-batch's training_step) it reads its own rate
        assert row["seen"] == pytest.approx(row["user"] / (0.97 if how == "decay" else 1))
    if how == "exponential":  # the scheduler compounds its own, unscaled rate
        for i, row in enumerate(rows):
            assert row["user"] == pytest.approx(0.1 * 0.98**i, rel=1e-6)


def test_gns_lr_is_the_rate_of_the_last_step(tmp_path) -> None:
    """``gns/lr`` in callback_metrics is the rate the step just used, after every step (a
    OneCycleLR changes it every step, read-outs are every 5)."""
    rows = run_rates(tmp_path, "onecycle", "linear").rows
    for row in rows:
        assert row["logged"] == pytest.approx(row["used"], rel=1e-3), row
    assert len({round(r["used"], 6) for r in rows}) == len(rows)
