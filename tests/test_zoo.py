"""Models nobody here wrote, with no edits: coverage and B_simple against the exact value.

Hugging Face GPT-2 (Conv1D layers, positions of shape (1, T)), Llama (its own RMSNorm), ViT
(bare cls_token and position embeddings), a nanoGPT-style model (wpe(arange(T))) and LSTM
classifiers, each frozen, with the exact B_simple over all trainable parameters and the whole
data set; the callback runs with default settings. ResNet (BatchNorm) gets the hardening
issue's behaviour. Skipped where transformers is not installed (it is a dev dependency).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit
from zoo import ZOO, ZooModule, exact, resnet

from lightning_gns import GradientNoiseScale
from lightning_gns.norms.simultaneous import RoutedForward

pytestmark = pytest.mark.slow  # make test-fast leaves these out

pytest.importorskip("transformers")
STEPS = 1000
RUN = {"max_steps": STEPS, "log_every_n_steps": 100}


class RoutedLayers(pl.Callback):
    """Class names of the layers whose forward the per-example source routed, seen mid-fit."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *_) -> None:
        for m in module.modules():
            if isinstance(m.__dict__.get("forward"), RoutedForward):
                self.names.add(type(m).__name__)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_whole_model_coverage_and_b_simple_within_10_percent(name, tmp_path) -> None:
    torch.manual_seed(0)
    model, data, loss = ZOO[name]()
    truth = exact(model, data, loss)["b_simple"]
    batch = 16
    assert batch / truth > 0.2  # not far below B_noise: a point estimate is expected
    cb = GradientNoiseScale()  # default settings
    routed = RoutedLayers()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer = fit(
            cb, tmp_path, ZooModule(model, data, loss, batch), callbacks=[cb, routed], **RUN
        )
    # the batch probe reads dim 1 of batch_first=False layers: no false "taken as" warning
    assert not [w for w in said if "the batch size was taken as" in str(w.message)]
    assert cb.chosen_source == "per_example"
    if name.endswith("long_context"):  # the simultaneous route is what is tested here
        assert routed.names & {"Conv1D", "Linear"}, routed.names
    assert cb.coverage >= 0.999 and cb.left_out == {}, cb.left_out
    assert float(trainer.callback_metrics["gns/coverage"]) >= 0.999
    assert cb.b_simple == pytest.approx(truth, rel=0.10)


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
def test_norm_layer_mode_finds_the_normalization_layers(name, tmp_path) -> None:
    torch.manual_seed(0)
    model, data, loss = ZOO[name]()
    cb = GradientNoiseScale(layers="norm")
    fit(cb, tmp_path, ZooModule(model, data, loss, 16), **{**RUN, "max_steps": 20})
    norms = {id(m.weight) for m in model.modules() if type(m).__name__.endswith("Norm")}
    assert norms and norms <= {id(p) for p in cb.covered_parameters}
    assert 0 < cb.coverage < 0.05 and cb.left_out == {}


def test_resnet_batchnorm_is_refused_per_example_and_measured_between_micro_batches(
    tmp_path,
) -> None:
    torch.manual_seed(0)
    model, data, loss = resnet()
    with pytest.raises(RuntimeError, match="BatchNorm"):
        fit(
            GradientNoiseScale(),
            tmp_path,
            ZooModule(model, data, loss, 16),
            **{**RUN, "max_steps": 2},
        )
    cb = GradientNoiseScale()
    fit(
        cb,
        tmp_path,
        ZooModule(model, data, loss, 16),
        **{**RUN, "max_steps": 40},
        accumulate_grad_batches=2,
    )
    assert cb.chosen_source == "micro_batch" and cb.coverage == 1.0
    assert cb.values.steps == 40


@pytest.mark.parametrize("name", ["gpt2_long_context", "llama"])
def test_activation_checkpointing_gives_the_same_estimate(name, tmp_path) -> None:
    """Hugging Face gradient checkpointing, reentrant or not, recomputes each block's forward
    inside backward: the layers are not "called twice" (they were left out: 39% coverage for
    GPT-2), and the estimate equals the one without checkpointing on the same batches. Inside
    the checkpointed blocks no rule-covered layer's input is held by the hooks (they save it
    through autograd, so checkpointing frees it)."""

    class Held(pl.Callback):
        """Rule-covered sites inside a block whose input the hooks hold before backward."""

        def __init__(self, cb: GradientNoiseScale) -> None:
            self.cb, self.names = cb, set()  # (reentrant: the first forward runs without grad)

        def on_before_backward(self, trainer, module, loss) -> None:
            if trainer.global_step >= 1:  # (the structural check's step runs eagerly)
                sites = self.cb.sites
                inside = [s for n, s in sites.items() if ".h." in n or ".layers." in n]
                self.names |= {s.name for s in inside if s.seen.activation is not None}

    results = {}
    for mode in ("off", "non-reentrant", "reentrant"):
        torch.manual_seed(0)
        model, data, loss = ZOO[name]()
        if mode != "off":
            kwargs = {"use_reentrant": mode == "reentrant"}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        cb = GradientNoiseScale()
        held = Held(cb)
        fit(
            cb,
            tmp_path,
            ZooModule(model, data, loss, 16),
            callbacks=[cb, held],
            **{**RUN, "max_steps": 200},
        )
        assert cb.coverage == 1.0 and cb.left_out == {}, (mode, cb.left_out)
        assert (held.names == set()) == (mode != "off"), (mode, held.names)  # off: all held
        assert cb.values.skipped == 0, mode
        results[mode] = (cb.grad_norm_sq, cb.values.grad_variance)
    for mode in ("non-reentrant", "reentrant"):
        assert results[mode] == pytest.approx(results["off"], rel=1e-4), mode


def test_t5_relative_bias_at_a_length_equal_to_the_batch_is_measured_per_example(
    tmp_path,
) -> None:
    """T = 16 = B: the bucket matrix is not computed from the batch, so it is not taken as
    examples; the bias broadcast over the batch is measured per example (its owner's
    compute_bias, norms/relative_bias.py), with a per-layer value of its own."""
    from zoo import t5

    torch.manual_seed(0)
    model, data, loss = t5()
    cb = GradientNoiseScale(per_layer=True, log_every_n_steps=10)
    fit(cb, tmp_path, ZooModule(model, data, loss, 16), max_steps=30)
    assert cb.coverage == 1.0 and set(cb.left_out) == {"model.shared"}, cb.left_out  # tied
    bias = [k for k in cb.layer_values if "relative_attention_bias" in k]
    assert len(bias) == 2
    assert cb.values.skipped == 0 and cb.values.steps == 29
