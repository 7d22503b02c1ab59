"""What the per-example weight-gradient product costs beside autograd's own (CPU or CUDA).

For a Linear layer on (B, T, d_in) inputs, autograd computes the weight gradient with one GEMM
over all B·T rows. The per-example source (materialised form) computes every example's
gradient G_n = g_nᵀ a_n with a batched product to take its norm: the same FLOPs again. The
"simultaneous" method (nanoGNS) would compute G_n once and take the weight gradient as Σ_n G_n,
replacing autograd's GEMM. This prints, per layer shape, the time of autograd's GEMM, of the
per-example norms as done today, and of weight gradient + norms from one batched product.

    python benchmarks/simultaneous.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from common import markdown_table, set_threads, sync


def bench(f: Callable[[], object], device: str, n: int = 50) -> float:
    """Mean time of ``n`` calls after one warm-up, in milliseconds."""
    f()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        f()
    sync(device)
    return (time.perf_counter() - t) / n * 1e3


def autograd_gemm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The weight gradient as autograd computes it: one GEMM over all B·T rows."""
    return g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])


def norms_today(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The per-example source's materialised form: |g_nᵀ a_n| per example."""
    return torch.linalg.vector_norm(torch.bmm(g.mT, a), dim=(1, 2))


def simultaneous(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight gradient and per-example norms from one batched product."""
    per = torch.bmm(g.mT, a)
    return per.sum(0), torch.linalg.vector_norm(per, dim=(1, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads or None, args.device)
    rows = []
    for b, t, d_in, d_out in [(16, 128, 128, 128), (16, 128, 128, 512), (16, 128, 512, 128)]:
        a = torch.randn(b, t, d_in, device=args.device)
        g = torch.randn(b, t, d_out, device=args.device)

        gemm = bench(partial(autograd_gemm, a, g), args.device)
        today = bench(partial(norms_today, a, g), args.device)
        both = bench(partial(simultaneous, a, g), args.device)
        rows.append(
            [
                f"B={b} T={t} {d_in}→{d_out}",
                f"{gemm:.2f}",
                f"{today:.2f}",
                f"{gemm + today:.2f}",
                f"{both:.2f}",
            ]
        )
    headers = [
        "layer",
        "autograd weight grad (ms)",
        "per-example norms today (ms)",
        "both today (ms)",
        "simultaneous: grad + norms (ms)",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
