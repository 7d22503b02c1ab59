"""torch.compile: the same estimate as eager, in one graph (micro-batch and per-example norms)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, trained_mlp, trainer_kwargs
from torch import nn
from zoo import TinyGPT, ZooModule, text_data

from lightning_gns import GradientNoiseScale

pytestmark = pytest.mark.slow  # make test-fast leaves these out


def fit_gns(
    tmp_path, compiled: bool, accumulate: int, model_fn=trained_mlp, **gns_kwargs
) -> GradientNoiseScale:
    torch._dynamo.reset()  # no graph cached from an earlier model (dynamo does not guard hooks)
    torch.manual_seed(0)
    model = model_fn()
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
    eager = fit_gns(tmp_path, False, accumulate, source=source)
    compiled = fit_gns(tmp_path, True, accumulate, source=source)
    assert eager.values.steps == compiled.values.steps > 40
    assert compiled.values.b_simple == pytest.approx(eager.values.b_simple, rel=1e-4)
    assert compiled.values.grad_norm_sq == pytest.approx(eager.values.grad_norm_sq, rel=1e-4)


class Gain(nn.Module):
    """A layer without a per-example rule: covered by the torch.func fallback."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_auto_for_a_compiled_model(tmp_path) -> None:
    """Rules compile whole, so a compiled model is measured as an eager one; only the torch.func
    fallback splits the graph, so with it auto takes micro-batches, or warns."""
    assert fit_gns(tmp_path, False, 2).chosen_source == "per_example"  # rules cover the MLP
    assert fit_gns(tmp_path, True, 2).chosen_source == "per_example"  # compiled alike
    with_gain = lambda: nn.Sequential(trained_mlp(), Gain(10))  # noqa: E731
    assert fit_gns(tmp_path, True, 2, model_fn=with_gain).chosen_source == "micro_batch"
    with pytest.warns(UserWarning, match="the model is compiled, and these layers have no"):
        assert fit_gns(tmp_path, True, 1, model_fn=with_gain).chosen_source == "per_example"


@pytest.mark.parametrize("source", ["micro_batch", "per_example"])
def test_no_recompile_per_step(tmp_path, source) -> None:
    """The first step runs eagerly (the batch probe, the structural check), so their hooks
    leave no graph break behind, and no later step compiles again."""
    from torch._dynamo.utils import counters

    seen: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen.append(counters["stats"]["unique_graphs"])

    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(trained_mlp())
    gns = GradientNoiseScale(log_every_n_steps=5, source=source)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_steps=20, accumulate_grad_batches=2, callbacks=[gns, Count()]
        )
    )
    trainer.fit(Classifier(model, batch_size=32))
    assert gns.chosen_source == source and gns.values.steps > 10
    assert seen[-1] == seen[6] > 0  # graphs compiled in the first steps only
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.parametrize("tie_weights", [False, True])
def test_compiled_transformer_per_example_equals_eager_in_one_graph(tmp_path, tie_weights) -> None:
    """A GPT with positions on arange(T), LayerNorms, Linears on the simultaneous route and,
    tied or not, its embedding: per-example norms inside the compiled graph give the eager
    estimate; after the structural check no step compiles again or breaks the graph."""
    from torch._dynamo.utils import counters

    from lightning_gns.norms.simultaneous import RoutedForward

    data, vocab = text_data(64)

    class Count(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []
            self.routed = False

        def on_train_batch_end(self, trainer, module, *args) -> None:
            breaks = sum(counters["graph_break"].values())
            self.seen.append((counters["stats"]["unique_graphs"], breaks))
            forwards = [m.__dict__.get("forward") for m in module.modules()]
            self.routed |= any(isinstance(f, RoutedForward) for f in forwards)

    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = TinyGPT(vocab, seq_len=64, width=16, n_layers=2, n_heads=2, tie_weights=tie_weights)
        module = ZooModule(model, data, lambda m, x, y: lm_loss(m, x, y), batch=8)
        if compiled:
            module.model = torch.compile(model)
        gns, count = GradientNoiseScale(source="per_example", log_every_n_steps=10), Count()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=30, callbacks=[gns, count]))
        trainer.fit(module)
        assert gns.coverage == 1.0 and count.routed, (compiled, gns.left_out)
        results[compiled] = (gns.values, count.seen)
    eager, (compiled, seen) = results[False][0], results[True]
    assert eager.steps == compiled.steps == 29  # the first step is the structural check
    assert compiled.b_simple == pytest.approx(eager.b_simple, rel=1e-4)
    assert compiled.grad_norm_sq == pytest.approx(eager.grad_norm_sq, rel=1e-4)
    assert seen[-1] == seen[1], seen  # compiled once, after the (eager) check step
    assert seen[-1][1] == 0, seen  # and whole: no graph break


def lm_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def test_compiled_per_example_norms_of_a_wrong_batch_size_are_nan_not_wrong() -> None:
    """Compiled, the hooks cannot fail a micro-batch from Python: a batch other than the one
    announced makes its norms NaN (a skipped step), never plausible wrong numbers."""
    from lightning_gns.norms import PerExampleNorms

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    compiled = torch.compile(model)
    norms = PerExampleNorms(model)
    norms.attach()
    x = torch.randn(8, 16)
    for announced, check in ((8, True), (8, False), (4, False)):
        norms.start_micro_batch(announced)
        if check:
            norms.start_check()
        compiled(x).square().mean().backward()
        acc, _, bad = norms.close_micro_batch()
        if announced == 8 and not check:
            assert acc is not None and torch.isfinite(acc).all()
    norms.detach()
    assert bad is None and acc is not None and acc.shape == (4,) and torch.isnan(acc).all()


def test_compiled_with_activation_checkpointing_gives_the_eager_estimate(tmp_path) -> None:
    """Hugging Face GPT-2 (Gram-form Linears: the taps) with non-reentrant gradient
    checkpointing, compiled: the estimate of the eager model without checkpointing."""
    pytest.importorskip("transformers")
    from zoo import ZOO

    found = {}
    for mode in ("eager", "compiled+checkpointing"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, data, loss = ZOO["gpt2"]()
        if mode != "eager":
            kwargs = {"use_reentrant": False}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model = torch.compile(model)
        gns = GradientNoiseScale(source="per_example", log_every_n_steps=20)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=40), callbacks=[gns])
        trainer.fit(ZooModule(model, data, loss, 16))
        assert gns.coverage == 1.0 and gns.values.skipped == 0, mode
        found[mode] = (gns.grad_norm_sq, gns.values.grad_variance)
    assert found["compiled+checkpointing"] == pytest.approx(found["eager"], rel=1e-4)
