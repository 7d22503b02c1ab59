"""The interval holds and the read-out is honest, from B/B_noise ≈ 1 down to ≈ 0.02.

Frozen digits MLPs with the exact truth over all examples; batches drawn with replacement; the
per-example source's records go through the real tracker (adaptive window), one column per
data order. The full table: ``python benchmarks/coverage.py``.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import zoo
from helpers import (
    Classifier,
    digits,
    exact_gns,
    mlp,
    per_example_grads,
    simulate_per_example,
    trained_mlp,
    trainer_kwargs,
)
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_gns import GradientNoiseScale

pytestmark = pytest.mark.slow  # make test-fast leaves these out

RUNS = 150


@pytest.fixture(scope="module")
def grads() -> dict[str, object]:
    x, y = digits()
    torch.manual_seed(0)
    model, data, loss = zoo.nanogpt()  # a small transformer on characters of the stdlib
    return {
        "init": per_example_grads(mlp(), x, y),
        "trained": per_example_grads(trained_mlp(), x, y),
        "transformer": zoo.per_example_grads(model, data, loss),
    }


@pytest.mark.parametrize(
    "model,batch,ratio_range",
    [
        ("init", 32, (0.5, 2.0)),
        ("init", 8, (0.1, 0.5)),
        ("trained", 16, (0.01, 0.05)),
        ("transformer", 2, (0.5, 1.0)),
    ],
)
def test_interval_coverage_and_honest_point_estimates(grads, model, batch, ratio_range) -> None:
    truth, reads = simulate_per_example(grads[model], batch, [300, 2000], RUNS, seed=batch)
    assert ratio_range[0] < batch / truth < ratio_range[1]  # the regime this case stands for
    for steps, values in reads.items():
        vs = list(values.values())
        coverage = sum(v.b_simple_lower <= truth <= v.b_simple_upper for v in vs) / len(vs)
        assert coverage >= 0.90, (steps, coverage)
        known = [v for v in vs if v.precise]
        close = sum(abs(v.b_simple / truth - 1) <= 0.25 for v in known)
        assert close + len(vs) - len(known) >= 0.95 * len(vs), (steps, close, len(known))


def test_hard_case_reports_a_lower_bound_between_the_batch_and_the_truth(grads) -> None:
    batch = 32
    truth, reads = simulate_per_example(grads["trained"], batch, [2000], RUNS, seed=7)
    assert batch / truth < 0.06  # B far below B_noise
    vs = list(reads[2000].values())
    for v in vs:
        if not v.precise:
            assert v.b_simple_lower > batch
    bounded = [v for v in vs if not v.precise]
    assert sum(v.b_simple_lower < truth for v in bounded) >= 0.95 * len(bounded)


class WithReplacement(Classifier):
    """Batches drawn with replacement, so the exact target is tr(Σ)/|G|² itself."""

    def train_dataloader(self) -> DataLoader:
        x, y = digits()
        gen = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(range(len(x)), replacement=True, num_samples=len(x), generator=gen)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, sampler=sampler)


def test_the_callback_in_the_hard_case_within_2000_steps(tmp_path) -> None:
    """B/B_noise ≈ 0.04, default settings: B_simple within 25%, or not yet known with a lower
    bound between the batch size and the truth."""
    x, y = digits()
    model = trained_mlp()
    truth = exact_gns(model, x, y)["b_simple"]
    batch = 32
    assert batch / truth < 0.05
    for seed in (0, 1):
        cb = GradientNoiseScale(log_every_n_steps=500)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2000), callbacks=[cb])
        trainer.fit(WithReplacement(model, batch_size=batch, seed=seed))
        metrics = trainer.callback_metrics
        b_simple, lower = float(metrics["gns/b_simple"]), float(metrics["gns/b_simple_lower"])
        if math.isfinite(b_simple):
            assert abs(b_simple / truth - 1) <= 0.25
        else:
            assert batch < lower < truth
            assert math.isnan(float(metrics["gns/optimal_batch_size"]))  # no advice
