"""A tiny GPT-style character-level language model, built only from standard layers.

``TinyGPT`` is a plain ``nn.Module`` (token + learned positional embedding, pre-LN blocks with
causal self-attention through ``F.scaled_dot_product_attention``, GELU MLPs, a final LayerNorm
and a linear head); ``char_dataset`` builds a character-level data set from Python source files
that ship with the interpreter (no download); ``GPTModule`` wraps the model for Lightning.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

# Stdlib files the character data set is read from (all pure-Python, present in CPython).
STDLIB_FILES = (
    "argparse.py",
    "difflib.py",
    "textwrap.py",
    "inspect.py",
    "dataclasses.py",
    "functools.py",
    "pathlib.py",
    "typing.py",
)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/out projections."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        h = self.n_heads

        def heads(z: Tensor) -> Tensor:
            return z.view(b, t, h, c // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, n_heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(self.act(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A small decoder-only transformer LM: ``forward(ids (B, T)) -> logits (B, T, vocab)``.

    Args:
        vocab_size: number of token ids.
        seq_len: maximum sequence length (size of the positional embedding table).
        width: model width.
        n_layers: number of blocks.
        n_heads: attention heads per block.
        tie_weights: share the output head's weight with the token embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 128,
        width: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(_init_weights)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's {self.seq_len}")
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(t, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def stdlib_text(files: tuple[str, ...] = STDLIB_FILES) -> str:
    """The concatenated source of the given files from this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / f).read_text(encoding="utf-8") for f in files if (root / f).exists())


def char_dataset(seq_len: int = 128, max_chars: int | None = None) -> tuple[TensorDataset, int]:
    """Character-level LM data from stdlib source: ``(TensorDataset(inputs, targets), vocab)``.

    The text is cut into non-overlapping windows of ``seq_len + 1`` characters; inputs and
    targets are (N, seq_len) int64 ids, targets shifted by one. Ids index the sorted set of
    characters in the text.
    """
    text = stdlib_text()
    if max_chars is not None:
        text = text[:max_chars]
    chars = sorted(set(text))
    lookup = torch.full((max(map(ord, chars)) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor([ord(c) for c in chars])] = torch.arange(len(chars))
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
    ids = lookup[codes.long()]
    n = ids.numel() // (seq_len + 1)
    if n == 0:
        raise ValueError(f"not enough text for one sequence of length {seq_len}")
    windows = ids[: n * (seq_len + 1)].view(n, seq_len + 1)
    return TensorDataset(windows[:, :-1].clone(), windows[:, 1:].clone()), len(chars)


class GPTModule(pl.LightningModule):
    """Lightning wrapper: mean token cross-entropy, AdamW (or SGD) with a fixed learning rate."""

    def __init__(
        self,
        vocab_size: int,
        lr: float = 3e-4,
        optimizer: str = "adamw",
        log_loss: bool = False,
        **gpt_kwargs: int | bool,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        self.model = TinyGPT(vocab_size, **gpt_kwargs)  # type: ignore[arg-type]
        self.lr = lr
        self.optimizer = optimizer
        self.log_loss = log_loss

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if self.log_loss:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
