"""AdaptiveBatchSize: the rules, the learning rate it applies, resume, refusals."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, mlp, trained_mlp, trainer_kwargs
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gns import GradientNoiseScale
from lightning_gns.adaptive import (
    AdaptiveBatchSize,
    goodput_rule,
    lower_bound_rule,
    lr_scale,
    sqrt_rule,
)
from lightning_gns.estimator import GNSValues


def values(b: float, lower: float, upper: float) -> GNSValues:
    return GNSValues(b, math.nan, lower, upper, 1.0, b, 100, 0, 0, 100.0)


def test_lower_bound_rule_grows_on_the_bound_and_has_a_dead_band() -> None:
    assert lower_bound_rule(values(900, 300, 2000), 128, 2, 1.0, shrink=True)[0] == 1
    assert lower_bound_rule(values(900, 200, 2000), 128, 2, 1.0, shrink=True) is None
    assert lower_bound_rule(values(900, 300, 2000), 128, 2, 2.0, shrink=True) is None  # margin
    assert lower_bound_rule(values(40, 30, 60), 128, 2, 1.0, shrink=True)[0] == -1
    assert lower_bound_rule(values(40, 30, 60), 128, 2, 1.0, shrink=False) is None
    # between B/2 and 2B: no change either way (no flapping)
    assert lower_bound_rule(values(128, 100, 200), 128, 2, 1.0, shrink=True) is None
    unknown = values(math.nan, math.nan, math.nan)
    assert lower_bound_rule(unknown, 128, 2, 1.0, shrink=True) is None


def test_sqrt_rule_follows_the_square_root_of_the_noise_scale() -> None:
    ref = (32.0, 100.0)
    assert sqrt_rule(values(400, 380, 420), 32, 2, ref)[0] == 1  # B* = 64
    assert sqrt_rule(values(150, 140, 160), 32, 2, ref) is None  # B* = 39: within the band
    assert sqrt_rule(values(20, 19, 21), 32, 2, ref)[0] == -1  # B* = 14
    assert sqrt_rule(values(400, 100, 1000), 32, 2, ref) is None  # not known: no move
    assert sqrt_rule(values(400, 380, 420), 32, 2, None) is None


def test_goodput_rule_weighs_statistical_efficiency_against_time() -> None:
    big_noise = values(10_000, 9_000, 11_000)
    # accumulation only repeats micro-batches: without a fixed cost per step it never pays
    assert goodput_rule(big_noise, 32, 1, 2, timing=(0.0, 1.0)) is None
    # a fixed cost per step (optimizer, communication) makes a larger batch worth it
    assert goodput_rule(big_noise, 32, 1, 2, timing=(5.0, 1.0))[0] == 1
    # ... unless the batch is already beyond the noise scale
    assert goodput_rule(values(16, 15, 17), 32, 1, 2, timing=(5.0, 1.0)) is None
    assert goodput_rule(big_noise, 32, 1, 2, timing=None) is None


def test_lr_scale_rules() -> None:
    assert lr_scale("linear", 256, 32) == 8
    assert lr_scale("sqrt", 128, 32) == 2
    assert lr_scale("none", 256, 32) == 1
    # AdaScale's gain: ≈ the batch ratio far below B_noise, ≈ 1 far above it
    assert lr_scale("adascale", 256, 32, b_noise=1e9) == pytest.approx(8, rel=1e-6)
    assert lr_scale("adascale", 256, 32, b_noise=1e-6) == pytest.approx(1, rel=1e-6)
    assert 1 < lr_scale("adascale", 256, 32, b_noise=100) < 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_accumulate=0), "max_accumulate"),
        (dict(factor=1), "factor"),
        (dict(min_accumulate=9, max_accumulate=8), "min_accumulate"),
        (dict(rule="fast"), "rule"),
        (dict(lr_scaling="cubic"), "lr_scaling"),
        (dict(margin=0), "margin"),
        (dict(min_steps_between=-1), "min_steps_between"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSize(**kwargs)


class Probe(Classifier):
    """Records, per optimizer step, the accumulation, micro-batches, the scheduler's LR and
    the LR the step actually applied (plain SGD: Δθ = −η·g)."""

    def __init__(self, **kw) -> None:
        super().__init__(trained_mlp(), **kw)
        self.rows: list[dict] = []
        self.micro = 0
        self._before: tuple[torch.Tensor, torch.Tensor, float, int] | None = None

    def training_step(self, batch, batch_idx):
        self.micro += 1
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        p = self.model[0].weight
        lr, acc = self.lr_schedulers().get_last_lr()[0], self.trainer.accumulate_grad_batches
        self._before = (p.detach().clone(), p.grad.detach().clone(), lr, acc)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._before is None:
            return
        old, grad, sched_lr, acc = self._before
        step = (old - self.model[0].weight.detach()) / grad
        applied = float(step[grad.abs() > 1e-6].median())
        end = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        self.rows.append(dict(micro=self.micro, acc=acc, sched=sched_lr, applied=applied, end=end))
        self._before, self.micro = None, 0


def test_batch_and_learning_rate_change_during_a_real_run(tmp_path) -> None:
    gns = GradientNoiseScale(log_every_n_steps=10)
    ada = AdaptiveBatchSize(max_accumulate=8, min_steps_between=20, lr_scaling="linear")
    module = Probe(lr=0.05, batch_size=8)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=150, callbacks=[gns, ada], logger=logger)
    )
    trainer.fit(module)
    assert [c.new for c in ada.changes] == [2, 4, 8]  # one factor at a time up to the maximum
    assert trainer.accumulate_grad_batches == 8
    assert all(c.lr_scale == c.new for c in ada.changes)  # linear: η ∝ B
    assert [r["acc"] for r in module.rows] == sorted(r["acc"] for r in module.rows)
    for row in module.rows:  # whole windows only (an epoch ends with a short one)
        assert row["micro"] == row["acc"] or (row["end"] and row["micro"] < row["acc"])
    for i, row in enumerate(module.rows):
        # the scheduler (LambdaLR, closed form) keeps its own rate; the step applies it × scale
        assert row["sched"] == pytest.approx(0.05 / (1 + 0.01 * i), rel=1e-6)
    scale = {c.new: c.lr_scale for c in ada.changes} | {1: 1.0}
    for row in module.rows:  # the step applied the scheduler's rate × the batch's scale
        assert row["applied"] == pytest.approx(row["sched"] * scale[row["acc"]], rel=1e-3)
    assert trainer.callback_metrics["gns/accumulate"] == 8
    assert float(trainer.callback_metrics["gns/lr_scale"]) == 8
    assert gns.batch_size == 64  # the monitor follows the change
    events = EventAccumulator(logger.log_dir).Reload()
    assert any(t.startswith("gns/batch_size_change") for t in events.Tags()["tensors"])
    assert [e.value for e in events.Scalars("gns/accumulate")][-1] == 8
    # one continuous estimate: every optimizer step counted, none reset by a change of batch
    # (the first step runs the per-example structural check and is not counted)
    assert gns.values.steps + gns.values.skipped == trainer.global_step - 1


def test_resume_continues_with_the_same_batch_rate_and_estimate(tmp_path) -> None:
    def run(epochs: int, root, ckpt=None, callbacks=()):
        gns = GradientNoiseScale(log_every_n_steps=10)
        ada = AdaptiveBatchSize(max_accumulate=16, min_steps_between=20)
        trainer = pl.Trainer(
            **trainer_kwargs(root, max_epochs=epochs, enable_checkpointing=True),
            callbacks=[gns, ada, *callbacks],
        )
        module = Classifier(trained_mlp(), lr=0.05, batch_size=16, shuffle=False)
        trainer.fit(module, ckpt_path=ckpt)
        return trainer, gns, ada

    _, full_gns, full = run(3, tmp_path / "full")
    run(2, tmp_path / "a", callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    trainer, gns, resumed = run(3, tmp_path / "b", ckpt=str(tmp_path / "ck" / "last.ckpt"))
    assert full.changes, "the batch never grew: nothing to resume"
    assert resumed.changes == full.changes
    assert resumed.accumulate == full.accumulate == trainer.accumulate_grad_batches
    assert resumed.lr_scale == full.lr_scale
    assert gns.values.steps == full_gns.values.steps
    assert gns.values.b_simple == pytest.approx(full_gns.values.b_simple, rel=1e-6)


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


def test_starts_within_its_bounds(tmp_path) -> None:
    gns = GradientNoiseScale(log_every_n_steps=50)
    ada = AdaptiveBatchSize(min_accumulate=2, max_accumulate=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[gns, ada]))
    trainer.fit(Classifier(mlp(), batch_size=32))
    assert trainer.accumulate_grad_batches == ada.accumulate == 2  # the trainer said 1
