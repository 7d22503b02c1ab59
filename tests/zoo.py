"""Models people train, built from configurations with random weights (nothing downloaded), with
data that ships here: characters of Python's standard library and the bundled digits.

Each entry gives a model, a data set of ``N`` examples and a loss; :func:`exact` computes the
true |G|², tr(Σ) and B_simple over the whole data set from per-example gradients (one backward
per example, so any model works), and :class:`ZooModule` trains it with Lightning.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from helpers import digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from tiny_gpt import TinyGPT, char_dataset  # noqa: E402

N = 256  # examples in each data set (the exact reference needs one backward each)
SEQ = 16


def text_data(seq: int = SEQ) -> tuple[TensorDataset, int]:
    data, vocab = char_dataset(seq_len=seq, max_chars=(seq + 1) * N)
    return data, vocab


def image_data(size: int = 16) -> TensorDataset:
    x, y = digits()
    img = x[:N].view(-1, 1, 8, 8)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    return TensorDataset(img.repeat(1, 3, 1, 1), y[:N])


def lm_loss(logits_of: Callable[[nn.Module, Tensor], Tensor]):  # noqa: ANN201
    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = logits_of(model, x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return loss


def hf_logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x) if not x.is_floating_point() else model(pixel_values=x)
    return out.logits


def gpt2(seq: int = SEQ, width: int = 32) -> tuple[nn.Module, TensorDataset, Callable]:
    """GPT-2; with ``seq`` long against ``width`` every Linear/Conv1D has its per-example
    gradients materialised, and so takes the simultaneous route (norms/simultaneous.py)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    data, vocab = text_data(seq)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=2, n_head=2,
        attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg), data, lm_loss(hf_logits)


def llama() -> tuple[nn.Module, TensorDataset, Callable]:
    from transformers import LlamaConfig, LlamaForCausalLM

    data, vocab = text_data()
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
        attn_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(cfg), data, lm_loss(hf_logits)


def vit() -> tuple[nn.Module, TensorDataset, Callable]:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10, attn_implementation="eager",
        initializer_range=0.2,  # at 0.02 the gradient is all noise: B_simple ≈ 2700 on 256 images
    )  # fmt: skip
    model = ViTForImageClassification(cfg)
    return model, image_data(), lambda m, x, y: F.cross_entropy(hf_logits(m, x), y)


def resnet() -> tuple[nn.Module, TensorDataset, Callable]:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10
    )
    model = ResNetForImageClassification(cfg)
    return model, image_data(), lambda m, x, y: F.cross_entropy(hf_logits(m, x), y)


def nanogpt(seq: int = SEQ, width: int = 32) -> tuple[nn.Module, TensorDataset, Callable]:
    data, vocab = text_data(seq)
    model = TinyGPT(vocab, seq_len=seq, width=width, n_layers=2, n_heads=2)
    return model, data, lm_loss(lambda m, x: m(x))


def t5() -> tuple[nn.Module, TensorDataset, Callable]:
    """T5: its relative attention bias is an Embedding on a (T, T) bucket matrix with no batch
    dim; at T = 16 = the tests' batch, dim 0 has the batch's size by coincidence."""
    from transformers import T5Config, T5ForConditionalGeneration

    data, vocab = text_data()
    cfg = T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    logits = lambda m, x: m(input_ids=x, decoder_input_ids=x).logits  # noqa: E731
    return T5ForConditionalGeneration(cfg), data, lm_loss(logits)


class RecurrentClassifier(nn.Module):
    """Digits read row by row (8 steps of 8 pixels) by an LSTM, GRU or RNN, batch first or not."""

    def __init__(self, batch_first: bool = True, kind: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.lstm = kind(8, 32, batch_first=batch_first)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.view(x.shape[0], 8, 8)
        out, _ = self.lstm(seq if self.batch_first else seq.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


def lstm(
    batch_first: bool = True, kind: type[nn.RNNBase] = nn.LSTM
) -> tuple[nn.Module, TensorDataset, Callable]:
    x, y = digits()
    model = RecurrentClassifier(batch_first, kind)
    return model, TensorDataset(x[:N], y[:N]), lambda m, a, b: F.cross_entropy(m(a), b)


ZOO: dict[str, Callable[[], tuple[nn.Module, TensorDataset, Callable]]] = {
    "gpt2": gpt2,
    "gpt2_long_context": lambda: gpt2(seq=64, width=16),
    "llama": llama,
    "vit": vit,
    "nanogpt": nanogpt,
    "nanogpt_long_context": lambda: nanogpt(seq=64, width=16),
    "lstm": lstm,
    "lstm_seq_first": lambda: lstm(batch_first=False),
    "gru_seq_first": lambda: lstm(batch_first=False, kind=nn.GRU),  # torch.func, no hx given
}


def per_example_grads(model: nn.Module, data: TensorDataset, loss: Callable) -> Tensor:
    """Every example's gradient over all trainable parameters, (N, d) float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in zip(*data.tensors, strict=True):
        grads = torch.autograd.grad(loss(model, x.unsqueeze(0), y.unsqueeze(0)), params)
        rows.append(torch.cat([g.flatten().double() for g in grads]))
    return torch.stack(rows)


def exact(model: nn.Module, data: TensorDataset, loss: Callable) -> dict[str, float]:
    """True |G|², tr(Σ) and B_simple over all trainable parameters and the whole data set."""
    per = per_example_grads(model, data, loss)
    g = per.mean(0)
    trace = float((per - g).square().sum(1).mean())
    g2 = float(g.square().sum())
    return {"grad_norm_sq": g2, "trace_cov": trace, "b_simple": trace / g2}


def b_simple_on_batches(per: Tensor, batches: list[list[int]] | None, beta: float) -> float:
    """Exact B_simple over the data set (``batches`` None), or what the per-example estimator
    gives from exact per-example gradients ``per`` (N, d) on the given batches (indices, one
    list per step), weighted as an EMA of decay ``beta``. From the Gram matrix of the
    per-example gradients: |Σ_b g_j|² = Σ_{j,j'} g_j·g_j'."""
    g = per.mean(0)
    if batches is None:
        return float((per - g).square().sum(1).mean() / g.square().sum())
    gram = per @ per.T
    idx = torch.tensor(batches)  # (steps, B)
    b = idx.shape[1]
    small = gram.diagonal()[idx].mean(1)
    big = gram[idx[:, :, None], idx[:, None, :]].sum((1, 2)) / b**2
    w = beta ** torch.arange(len(batches) - 1, -1, -1, dtype=per.dtype)
    g2 = (w * (b * big - small) / (b - 1)).sum()
    tr = (w * (small - big) * b / (b - 1)).sum()
    return float(tr / g2)


class Batches(pl.Callback):
    """The examples of every training batch, as indices into the data set (the first index
    of an identical copy)."""

    def __init__(self, data: TensorDataset) -> None:
        self.index = {tuple(x.tolist()): i for i, x in reversed(list(enumerate(data.tensors[0])))}
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: object, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen.append([self.index[tuple(x.tolist())] for x in batch[0]])


class ZooModule(pl.LightningModule):
    """Frozen training (SGD, learning rate 0) with batches drawn with replacement."""

    def __init__(
        self, model: nn.Module, data: TensorDataset, loss: Callable, batch: int, epoch: int = 0
    ) -> None:
        """``epoch``: examples drawn per epoch (the data set's size if 0)."""
        super().__init__()
        self.model, self.data, self.loss, self.batch = model, data, loss, batch
        self.epoch = epoch or len(data)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss(self.model, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        sampler = RandomSampler(self.data, replacement=True, num_samples=self.epoch, generator=gen)
        return DataLoader(self.data, batch_size=self.batch, sampler=sampler)
