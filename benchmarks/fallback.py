"""Cost of per-example norms per layer type: a dedicated rule versus the torch.func fallback.

Each layer alone, forward and backward of a batch (B=32, T=64, width 128), timed with and
without ``PerExampleNorms``, interleaved, median of repeats; the table gives the ratio to the
plain forward and backward of the same layer. "fallback" rows are layers without a rule
(nn.MultiheadAttention, nn.LSTM, a user's RMSNorm) or a Linear/LayerNorm re-implemented in a
module of the user's own, which is what a user's custom layer costs.

    python benchmarks/fallback.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import markdown_table, median, set_threads
from torch import Tensor, nn

from lightning_gns.norms import PerExampleNorms

B, T, D = 32, 64, 128


class OwnLinear(nn.Module):
    """nn.Linear's math in a module of the user's own: no rule, so the fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.bias = nn.Parameter(torch.zeros(D))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class OwnLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (D,), self.weight, self.bias)


class OwnRMSNorm(nn.Module):
    """As Llama's: x / rms(x) · weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 4, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(D, D, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.lstm(x)[0]


LAYERS: list[tuple[str, str, Callable[[], nn.Module]]] = [
    ("Linear", "rule", lambda: nn.Linear(D, D)),
    ("Linear (own module)", "fallback", OwnLinear),
    ("LayerNorm", "rule", lambda: nn.LayerNorm(D)),
    ("LayerNorm (own module)", "fallback", OwnLayerNorm),
    ("RMSNorm (Llama-style, own)", "fallback", OwnRMSNorm),
    ("MultiheadAttention", "fallback", Attention),
    ("LSTM", "fallback", Recurrent),
]


def step(model: nn.Module, x: Tensor, norms: PerExampleNorms | None) -> float:
    t = time.perf_counter()
    if norms is not None:
        norms.start_micro_batch(B)
    model(x).square().mean().backward()
    if norms is not None:
        acc, _, bad = norms.close_micro_batch()
        assert bad is None and acc is not None, bad
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def measure(make: Callable[[], nn.Module], repeats: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model, x = make(), torch.randn(B, T, D)
    norms = PerExampleNorms(model)
    norms.attach()
    norms.start_micro_batch(B)
    norms.start_check()
    model(x).square().mean().backward()
    norms.close_micro_batch()
    assert not norms.left_out, norms.left_out
    plain, with_norms = [], []
    for i in range(repeats + 3):
        a = step(model, x, norms)
        norms.detach()
        b = step(model, x, None)
        norms.attach()
        if i >= 3:  # warm-up
            with_norms.append(a)
            plain.append(b)
    norms.detach()
    return median(plain) * 1e3, median(with_norms) * 1e3, median(with_norms) / median(plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads, "cpu")
    rows = []
    for name, kind, make in LAYERS:
        plain, with_norms, ratio = measure(make, args.repeats)
        rows.append([name, kind, f"{plain:.2f}", f"{with_norms:.2f}", f"{ratio:.2f}"])
    header = ["layer", "per-example norms by", "plain (ms)", "with norms (ms)", "ratio"]
    print(markdown_table(header, rows))
    print(f"\nB={B}, T={T}, width {D}; median of {args.repeats} interleaved repeats")


if __name__ == "__main__":
    main()
