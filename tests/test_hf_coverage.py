"""BERT and T5 from configurations (random weights, tiny sizes): every trainable parameter is
measured per example, exactly.

The parameters that used to be left out each have a well-defined per-example gradient:
BERT's ``cls.predictions.bias`` is the decoder's bias (one parameter, tied), its
``token_type_embeddings`` are looked up on a buffer of zeros expanded to the batch, and T5's
``relative_attention_bias`` is broadcast over the batch (norms/relative_bias.py). T5's
``shared`` embedding is never called, its weight is measured through the encoder's and
decoder's ``embed_tokens`` (listed as such, as before). The hooks'
per-example squared norms are compared with ``torch.func`` per-example gradients of the whole
model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import fit
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseScale
from lightning_gns.norms import PerExampleNorms
from lightning_gns.norms.relative_bias import BiasCall

pytest.importorskip("transformers")

V, T, B = 40, 8, 4  # vocabulary, tokens, examples; T ≠ B and T = B both appear below


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )  # fmt: skip
    return BertForMaskedLM(cfg)


def t5(num_layers: int = 2) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_layers=num_layers, num_heads=2,
        relative_attention_num_buckets=4, dropout_rate=0.0, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, attn_implementation="eager",
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[Tensor], dict[str, Tensor]]]] = {
    "bert": (bert, lambda x: {"input_ids": x}),
    "t5": (t5, lambda x: {"input_ids": x, "decoder_input_ids": x}),
}


# modules listed as not hooked themselves, their weight measured through the modules tied to
# it (T5's ``shared`` is never called: the encoder's and decoder's embed_tokens are)
TIED_ONLY = {"bert": set(), "t5": {"shared"}}


def example_losses(model: nn.Module, inputs: dict[str, Tensor], y: Tensor) -> Tensor:
    """Each example's mean token loss (B,)."""
    logits = model(**inputs).logits
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return per_token.view(y.shape[0], -1).mean(1)


def hooked_norms(model: nn.Module, kw: Callable, x: Tensor, y: Tensor) -> PerExampleNorms:
    """The hooks after the structural check (first micro-batch) and one measured one."""
    norms = PerExampleNorms(model)
    norms.attach()
    for check in (True, False):
        norms.start_micro_batch(x.shape[0])
        if check:
            norms.start_check((x, y))
        example_losses(model, kw(x), y).sum().backward()  # sum: |g_j|² of each example's loss
        norms.acc, _, norms.bad = norms.close_micro_batch()  # type: ignore[attr-defined]
        model.zero_grad()
    norms.detach()  # the reference runs on the plain model
    return norms


def func_sq_norms(model: nn.Module, kw: Callable, x: Tensor, y: Tensor) -> Tensor:
    """|∇ℓ_j|² over every trainable parameter, from torch.func per-example gradients."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (), kw(xi.unsqueeze(0)))
        return F.cross_entropy(out.logits.flatten(0, 1), yi)

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.double().flatten(1).square().sum(1) for g in grads.values())  # type: ignore[return-value]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("t", [T, B])  # T = B: T5's bucket matrix has the batch's size too
def test_every_parameter_measured_per_example_exactly(name: str, t: int) -> None:
    make, kw = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y = torch.randint(2, V, (B, t)), torch.randint(2, V, (B, t))
    norms = hooked_norms(model, kw, x, y)
    assert norms.coverage() == 1.0 and set(norms.left_out) == TIED_ONLY[name], norms.left_out
    assert norms.bad is None  # type: ignore[attr-defined]
    covered = {id(p) for p in norms.params}
    assert all(id(p) in covered for p in model.parameters())
    truth = func_sq_norms(model, kw, x, y)
    torch.testing.assert_close(norms.acc.double(), truth, rtol=1e-5, atol=0)  # type: ignore[attr-defined]


def test_each_formerly_left_out_parameter_is_measured() -> None:
    """Per layer: the tied bias, the token-type embedding, the relative bias have a
    non-zero per-example norm of their own, equal to torch.func's for those parameters."""
    torch.manual_seed(0)
    model = t5()
    x, y = torch.randint(2, V, (B, T)), torch.randint(2, V, (B, T))
    norms = PerExampleNorms(model, per_layer=True)
    norms.attach()
    layers: dict[str, Tensor] = {}
    for check in (True, False):
        norms.start_micro_batch(B)
        if check:
            norms.start_check((x, y))
        example_losses(model, MODELS["t5"][1](x), y).sum().backward()
        _, layers, bad = norms.close_micro_batch()
        model.zero_grad()
    norms.detach()
    assert bad is None
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(w: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        p = {**params, f"{name}.weight": w}
        out = functional_call(model, (p, buffers), (), MODELS["t5"][1](xi.unsqueeze(0)))
        return F.cross_entropy(out.logits.flatten(0, 1), yi)

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params[f"{name}.weight"], x, y)
    truth = g.double().flatten(1).square().sum(1)
    assert bool((truth > 0).all())
    torch.testing.assert_close(layers[name].double(), truth, rtol=1e-5, atol=0)


def test_copies_and_detach_leave_t5_as_it_was() -> None:
    """A deep copy of the hooked model computes the plain bias; detach restores the class's."""
    torch.manual_seed(0)
    model = t5()
    x = torch.randint(2, V, (B, T))
    plain = model(input_ids=x, decoder_input_ids=x).logits
    norms = PerExampleNorms(model)
    norms.attach()
    owners = [m for m in model.modules() if isinstance(m.__dict__.get("compute_bias"), BiasCall)]
    assert len(owners) == 2  # the encoder's and the decoder's first self-attention
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(input_ids=x, decoder_input_ids=x).logits, plain)
    norms.detach()
    assert not [m for m in model.modules() if "compute_bias" in m.__dict__]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_callback_covers_bert_and_t5_whole(name: str, tmp_path) -> None:
    import lightning.pytorch as pl

    make, kw = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y = torch.randint(2, V, (64, T)), torch.randint(2, V, (64, T))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return example_losses(self.model, kw(batch[0]), batch[1]).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(x, y), batch_size=B)

    cb = GradientNoiseScale(log_every_n_steps=5)
    fit(cb, tmp_path, Module(), max_steps=12)
    assert cb.chosen_source == "per_example"
    assert cb.coverage == 1.0 and cb.left_out.keys() == {f"model.{m}" for m in TIED_ONLY[name]}
    assert cb.values.skipped == 0 and cb.values.steps == 11  # the first step is the check's
