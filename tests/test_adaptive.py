"""AdaptiveBatchSize in real runs: the rate each step uses, resume, callback order, refusals,
what it says. The rules themselves: tests/test_growth.py."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from adaptive_helpers import LoudNoise, ScriptedNoise, Small, params
from helpers import Classifier, mlp, trainer_kwargs
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint

from lightning_gns import GradientNoiseScale
from lightning_gns.adaptive import AdaptiveBatchSize
from lightning_gns.adaptive.sampler import ResizableBatchSampler


class RateProbe(Small):
    """Sets its learning rate the way ``how`` says and records, per optimizer step, the rate
    its own code meant (``user``), the rate its code saw in the optimizer during the step
    (``seen``), the rate the update used (plain SGD: Δθ = −η·g, so η = −Δθ·g/|g|²), the
    accumulation, AdaptiveBatchSize's multiplier and ``gns/lr`` after the step."""

    def __init__(self, how: str, **small) -> None:
        super().__init__(n=256, batch_size=8, lr=0.1, **small)
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
    gns = LoudNoise()
    ada = AdaptiveBatchSize(
        max_accumulate=4, rule="lower_bound", min_steps_between=10, lr_scaling=scaling
    )
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


def test_the_steps_before_the_probes_change_starts_keep_the_users_rate(tmp_path) -> None:
    """The probe (16 micro-batches of 8, SGD) ends with a change to micro-batches of 32; with
    a worker prefetching, steps still at the probe's batch run before it starts: at the
    user's rate, not the probe batch's (16×, which was applied at once)."""
    module = RateProbe("set", workers=1, seed=0, sampler=ResizableBatchSampler)
    ada = AdaptiveBatchSize(max_accumulate=16, max_micro_batch=32, lr_scaling="linear", probe=128)
    noise = ScriptedNoise(lambda k: 64.0)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, callbacks=[noise, ada])).fit(module)
    (change,) = ada.changes
    assert (change.old_micro, change.new_micro, change.new) == (8, 32, 1), change
    late = [r for r in module.rows[2 : change.step]]  # after the 2 probe steps, before it
    assert late and all(r["acc"] == 16 for r in late)
    for row in module.rows[: change.step]:
        assert row["scale"] == 1.0 and row["used"] == pytest.approx(row["user"], rel=1e-3), row
    for row in module.rows[change.step :]:  # then 32 examples: 4× by the linear rule
        assert row["scale"] == 4.0 and row["used"] == pytest.approx(4 * row["user"], rel=1e-3)


def test_gns_lr_is_the_rate_of_the_last_step(tmp_path) -> None:
    """``gns/lr`` in callback_metrics is the rate the step just used, after every step (a
    OneCycleLR changes it every step, read-outs are every 5)."""
    rows = run_rates(tmp_path, "onecycle", "linear").rows
    for row in rows:
        assert row["logged"] == pytest.approx(row["used"], rel=1e-3), row
    assert len({round(r["used"], 6) for r in rows}) == len(rows)


def fit_small(root, epochs: int, callbacks, ckpt=None, **ada_kw):
    """The Small module (100 examples, batches of 8: 13 per epoch, the last of 4) with a
    LoudNoise monitor; a decision at the end of each epoch's 13 batches."""
    gns = LoudNoise()
    ada = AdaptiveBatchSize(max_accumulate=8, rule="lower_bound", check_every_n_steps=13, **ada_kw)
    module = Small(n=100, batch_size=8)
    kw = trainer_kwargs(root, max_epochs=epochs, enable_checkpointing=True)
    trainer = pl.Trainer(**kw, callbacks=[gns, ada, *callbacks])
    trainer.fit(module, ckpt_path=ckpt)
    return trainer, ada, module


def test_a_change_decided_before_a_checkpoint_is_applied_after_resume(tmp_path) -> None:
    """A read-out at the epoch's last batch decides 1 -> 2, to start with the next epoch (the
    next whole window); a checkpoint at the epoch's end holds it, and the resumed run applies
    it at the same step as the uninterrupted one: same changes, same parameters."""
    _, full, full_module = fit_small(tmp_path / "full", 3, [])
    assert (full.changes[0].step, full.changes[0].new) == (13, 2) and len(full.changes) > 1
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit_small(tmp_path / "a", 1, [saver])
    _, resumed, module = fit_small(tmp_path / "b", 3, [], ckpt=str(tmp_path / "ck" / "last.ckpt"))
    assert [(c.step, c.new) for c in resumed.changes] == [(c.step, c.new) for c in full.changes]
    torch.testing.assert_close(params(module), params(full_module), rtol=0, atol=1e-6)


def test_a_reused_schedule_starts_afresh_in_another_fit(tmp_path) -> None:
    """The same two callback objects in a second fit (a sweep: a new Trainer and module) run
    as fresh ones: the same changes, the same parameters; not the first fit's accumulation
    (which it took for a resumed run's). A checkpoint into them still resumes."""

    def run(root, gns, ada, ckpt=None, epochs: int = 3, n: int = 100):
        kw = trainer_kwargs(root, max_epochs=epochs, enable_checkpointing=True)
        module = Small(n=n, batch_size=8)
        pl.Trainer(**kw, callbacks=[gns, ada]).fit(module, ckpt_path=ckpt)
        return module

    def new() -> AdaptiveBatchSize:
        return AdaptiveBatchSize(max_accumulate=8, rule="lower_bound", check_every_n_steps=13)

    gns, ada = LoudNoise(), new()
    run(tmp_path / "first", gns, ada, epochs=6, n=64)
    assert ada.accumulate == 4
    again = run(tmp_path / "again", gns, ada)
    _, full, full_module = fit_small(tmp_path / "full", 3, [])
    assert [(c.step, c.new) for c in ada.changes] == [(c.step, c.new) for c in full.changes]
    torch.testing.assert_close(params(again), params(full_module), rtol=0, atol=0)

    fit_small(tmp_path / "a", 1, [ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    resumed = run(tmp_path / "b", gns, ada, ckpt=str(tmp_path / "ck" / "last.ckpt"))
    assert [(c.step, c.new) for c in ada.changes] == [(c.step, c.new) for c in full.changes]
    torch.testing.assert_close(params(resumed), params(full_module), rtol=0, atol=1e-6)


@pytest.mark.parametrize("order", ["monitor first", "adaptive first"])
def test_the_order_of_the_callbacks_does_not_matter(tmp_path, order) -> None:
    """AdaptiveBatchSize acts on every read-out at the step it is made, whichever callback
    comes first: the same changes at the same steps, the same parameters."""
    runs = []
    for first in (True, False):
        gns = LoudNoise()
        ada = AdaptiveBatchSize(max_accumulate=4, rule="lower_bound")
        callbacks = [gns, ada] if first == (order == "monitor first") else [ada, gns]
        module = Small(n=64, batch_size=8)
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=20, callbacks=callbacks)).fit(module)
        runs.append(([(c.step, c.new) for c in ada.changes], params(module)))
    assert runs[0][0] == runs[1][0] == [(6, 2), (11, 4)]  # decided at 5 and 10, then aligned
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("adaptive_first", [False, True])
def test_the_monitor_sees_the_accumulation_adaptive_starts_with(tmp_path, adaptive_first) -> None:
    """source='micro_batch' needs two micro-batches per step: min_accumulate=2 gives them, in
    either order of the callbacks."""
    gns = GradientNoiseScale(source="micro_batch", log_every_n_steps=5)
    ada = AdaptiveBatchSize(min_accumulate=2, max_accumulate=4, probe=0)
    callbacks = [ada, gns] if adaptive_first else [gns, ada]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=callbacks))
    trainer.fit(Small(n=64, batch_size=8))
    assert gns.chosen_source == "micro_batch" and trainer.accumulate_grad_batches == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_accumulate=0), "max_accumulate"),
        (dict(max_accumulate=2**40), "max_accumulate"),
        (dict(factor=1), "factor"),
        (dict(factor=10**6), "factor"),
        (dict(min_accumulate=9, max_accumulate=8), "min_accumulate"),
        (dict(min_accumulate=True), "min_accumulate"),
        (dict(rule="fast"), "rule"),
        (dict(lr_scaling="cubic"), "lr_scaling"),
        (dict(margin=0), "margin"),
        (dict(margin=math.inf), "margin"),
        (dict(margin="1"), "margin"),
        (dict(min_steps_between=-1), "min_steps_between"),
        (dict(shrink="no"), "shrink"),
        (dict(max_micro_batch=0), "max_micro_batch"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSize(**kwargs)


def test_refuses_what_it_cannot_drive(tmp_path) -> None:
    def fit(callbacks, module=None):
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=callbacks))
        trainer.fit(module or Classifier(mlp(), batch_size=32))

    with pytest.raises(RuntimeError, match="add GradientNoiseScale"):
        fit([AdaptiveBatchSize()])
    with pytest.raises(RuntimeError, match="GradientAccumulationScheduler"):
        fit([GradientNoiseScale(), AdaptiveBatchSize(), GradientAccumulationScheduler({0: 2})])

    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__(mlp(), batch_size=32)
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="manual optimization"):
        fit([GradientNoiseScale(), AdaptiveBatchSize()], Manual())


def test_says_once_in_plain_words_why_it_waits(tmp_path, caplog) -> None:
    """No growth for 30 steps: one message says why (B_noise's lower bound against the next
    batch, or no estimate yet), in words, not once per read-out."""
    gns = GradientNoiseScale()
    ada = AdaptiveBatchSize(max_accumulate=4, rule="lower_bound", margin=1e6, check_every_n_steps=2)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=30, callbacks=[gns, ada]))
        trainer.fit(Small(n=256, batch_size=16))
    said = [r.getMessage() for r in caplog.records if "AdaptiveBatchSize" in r.getMessage()]
    assert not ada.changes and ada.waiting is not None and ada.waiting.endswith("waiting")
    assert 1 <= len(said) <= 2, said  # no estimate yet; then the bound against the batch
    assert "B_noise is at least" in said[-1] and "1e+06 × the next batch 32" in said[-1], said
    assert "≥" not in said[-1] and "2B" not in said[-1]


def test_says_when_it_is_at_its_largest(tmp_path, caplog) -> None:
    gns = LoudNoise()
    ada = AdaptiveBatchSize(max_accumulate=2, rule="lower_bound", check_every_n_steps=2)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=12, callbacks=[gns, ada])).fit(Small())
    said = [r.getMessage() for r in caplog.records if "AdaptiveBatchSize" in r.getMessage()]
    assert len(said) == 3, said  # the first check had one step: no interval yet
    assert said[0].endswith("batch 8: no estimate of B_noise yet: waiting")
    assert "batch 8 -> 16" in said[1] and "because B_noise is at least 1,000,000" in said[1]
    assert said[2].endswith("but the batch is at its largest: staying")


def test_starts_within_its_bounds(tmp_path) -> None:
    gns = GradientNoiseScale(log_every_n_steps=50)
    ada = AdaptiveBatchSize(min_accumulate=2, max_accumulate=4, probe=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[gns, ada]))
    with pytest.warns(UserWarning, match=r"accumulate_grad_batches=1\) is outside"):
        trainer.fit(Classifier(mlp(), batch_size=32))
    assert trainer.accumulate_grad_batches == ada.accumulate == 2  # the trainer said 1 (warned)


@pytest.mark.parametrize(
    "make,root",
    [
        (lambda p: torch.optim.Adamax(p, lr=1e-3), True),
        (lambda p: torch.optim.Adafactor(p, lr=1e-3), True),
        (lambda p: torch.optim.Adam(p, lr=1e-3), True),
        (lambda p: torch.optim.SGD(p, lr=1e-2), False),
    ],
    ids=["adamax", "adafactor", "adam", "sgd"],
)
def test_auto_scaling_knows_every_optimizer_that_divides_by_a_gradient_scale(
    tmp_path, make, root
) -> None:
    """``lr_scaling="auto"``: √ for an optimizer whose step divides by a running scale of the
    gradient (Adamax's max of |g|, Adafactor's factored second moment, Adam's v), whose state
    is rescaled; linear for SGD."""
    from lightning_gns.adaptive.per_step import rescale_second_moment

    class Module(Small):
        def configure_optimizers(self):
            return make(self.parameters())

    ada = AdaptiveBatchSize(max_accumulate=2, rule="lower_bound", probe=0, check_every_n_steps=2)
    kw = trainer_kwargs(tmp_path, max_steps=6, callbacks=[LoudNoise(), ada])
    trainer = pl.Trainer(**kw)
    trainer.fit(Module(n=128, batch_size=8))
    assert [c.new for c in ada.changes] == [2]
    assert ada.changes[0].lr_scale == pytest.approx(math.sqrt(2) if root else 2)
    assert rescale_second_moment(trainer.optimizers[0], 1.0) is root
