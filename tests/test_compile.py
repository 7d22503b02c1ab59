"""torch.compile: the same estimate as eager; auto avoids the hooks that split the graph."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, trained_mlp, trainer_kwargs

from lightning_gns import GradientNoiseScale


def fit(tmp_path, compiled: bool, accumulate: int, **gns_kwargs) -> GradientNoiseScale:
    torch._dynamo.reset()  # no graph cached from an earlier model (dynamo does not guard hooks)
    torch.manual_seed(0)
    model = trained_mlp()
    if compiled:
        model = torch.compile(model)
    gns = GradientNoiseScale(log_every_n_steps=50, **gns_kwargs)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_steps=60, accumulate_grad_batches=accumulate, callbacks=[gns]
        )
    )
    trainer.fit(Classifier(model, batch_size=32, shuffle=False))
    return gns


@pytest.mark.parametrize("source,accumulate", [("micro_batch", 4), ("per_example", 1)])
def test_compiled_model_gives_the_eager_estimate(tmp_path, source, accumulate) -> None:
    eager = fit(tmp_path, False, accumulate, source=source)
    compiled = fit(tmp_path, True, accumulate, source=source)
    assert eager.values.steps == compiled.values.steps > 40
    assert compiled.values.b_simple == pytest.approx(eager.values.b_simple, rel=1e-4)
    assert compiled.values.grad_norm_sq == pytest.approx(eager.values.grad_norm_sq, rel=1e-4)


def test_auto_takes_micro_batches_for_a_compiled_model(tmp_path) -> None:
    assert fit(tmp_path, False, 2).active_source == "per_example"  # rules cover the MLP
    assert fit(tmp_path, True, 2).active_source == "micro_batch"  # hooks would split the graph
    with pytest.warns(UserWarning, match="the model is compiled"):
        assert fit(tmp_path, True, 1).active_source == "per_example"  # the only way


def test_no_recompile_per_step(tmp_path) -> None:
    """After the first steps (the batch probe leaves after one), no step compiles again."""
    from torch._dynamo.utils import counters

    seen: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen.append(counters["stats"]["unique_graphs"])

    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(trained_mlp())
    gns = GradientNoiseScale(log_every_n_steps=5)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_steps=20, accumulate_grad_batches=2, callbacks=[gns, Count()]
        )
    )
    trainer.fit(Classifier(model, batch_size=32))
    assert gns.active_source == "micro_batch" and gns.values.steps > 10
    assert seen[-1] == seen[6] > 0  # graphs compiled in the first steps only
