"""AdaptiveBatchSize's decisions in real runs (issue 26, item 1): no change on a point estimate
the interval does not support, no wait without a reference, and what a step that proved too
large does (the rules as pure functions: tests/test_growth.py)."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
from adaptive_helpers import ScriptedNoise, Small
from helpers import trainer_kwargs
from torch.utils.data import DataLoader

from lightning_gns.adaptive import AdaptiveBatchSize


def fit(root, script, **kw) -> tuple[pl.Trainer, AdaptiveBatchSize]:
    """Batches of 8 from 256 examples (SGD), one epoch, a read every 2 steps, no micro-batch
    growth: the accumulation is the batch."""
    ada = AdaptiveBatchSize(**{"max_accumulate": 8, "check_every_n_steps": 2, **kw})
    trainer = pl.Trainer(
        **trainer_kwargs(root, max_epochs=1), callbacks=[ScriptedNoise(script), ada]
    )
    trainer.fit(Small(n=256, batch_size=8))
    return trainer, ada


@pytest.mark.parametrize("shrink", [True, False])
def test_a_step_that_proved_too_large_is_undone_only_with_shrink(tmp_path, shrink) -> None:
    """B_noise 10⁶ for 6 records: the noise rule grows to the largest batch (64, rate × 8);
    then B_noise is 1 (its upper bound far below 32): with ``shrink`` the batch comes back to
    the user's 8 and the rate with it; without, the rule keeps tracking at 64 and says why."""
    _, ada = fit(tmp_path, lambda k: 1e6 if k <= 6 else 1.0, rule="noise", probe=0,
                 shrink=shrink, lr_scaling="linear")  # fmt: skip
    assert (ada.changes[0].new, ada.changes[0].lr_scale) == (8, 8.0)
    if shrink:
        assert len(ada.changes) == 2 and "at most" in ada.changes[1].reason
        assert (ada.changes[1].new, ada.changes[1].lr_scale, ada.lr_scale) == (1, 1.0, 1.0)
    else:
        assert len(ada.changes) == 1 and ada.lr_scale == 8.0
        assert ada.waiting is not None and "below the next batch" in ada.waiting


def test_the_sqrt_rule_grows_without_ever_being_sure_of_b_noise(tmp_path) -> None:
    """The issue's stall: a B_noise the window never pins within 1.5× (records alternating
    10 and 10,000: a lower bound, no estimate) left the sqrt rule without a reference, waiting
    for good. Now it grows on the lower bound, and says so."""
    _, ada = fit(tmp_path, lambda k: 10.0 if k % 2 else 1e4, probe=0)
    assert ada.changes, ada.waiting
    assert all("no reference yet" in c.reason and "at least" in c.reason for c in ada.changes)


@pytest.mark.parametrize("ready_made", [False, True], ids=["batch_size", "batch_size=None"])
def test_an_epoch_shorter_than_the_probe_is_measured_and_scaled_as_it_is(
    tmp_path, caplog, ready_made
) -> None:
    """10 micro-batches of 8 an epoch: Lightning steps at its end, so accumulating 16 (the
    probe's 128 examples) or 64 makes steps of 80. Before, the probe said "steps of 128",
    went on "at 512" and multiplied the rate by 64 for steps that stayed at 80. Now the
    probe's steps are the whole epoch, said as they are (80), and the rate is scaled for
    them (80/8, SGD), with nothing to grow to; also from a data set of ready-made batches
    (``batch_size=None``: its items are batches, not examples)."""
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        trainer, ada = fit_small(tmp_path, n=80, ready_made=ready_made)
    assert ada.lr_scale == 10.0 and not ada.changes
    assert trainer.accumulate_grad_batches == 16
    said = [r.getMessage() for r in caplog.records if "probe steps" in r.getMessage()]
    assert said and all("of 80 examples" in w for w in said), said


class ReadyMade(Small):
    def train_dataloader(self) -> DataLoader:
        batches = list(super().train_dataloader())
        return DataLoader(batches, batch_size=None)


def fit_small(root, n: int, ready_made: bool = False) -> tuple[pl.Trainer, AdaptiveBatchSize]:
    ada = AdaptiveBatchSize(max_accumulate=64, probe=128)
    noise = ScriptedNoise(lambda k: 1e6)
    trainer = pl.Trainer(**trainer_kwargs(root, max_steps=12), callbacks=[noise, ada])
    trainer.fit((ReadyMade if ready_made else Small)(n=n, batch_size=8))
    return trainer, ada
