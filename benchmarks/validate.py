"""Validation against exact references: B_simple from the callback vs the truth.

    python benchmarks/validate.py [--seeds 5] [--quick]

A small GPT-style transformer is trained briefly on character data from Python's own standard
library, then frozen (learning rate 0). The exact |G|² and tr(Σ) over the whole data set come
from per-example gradients (torch.func). Each source of the callback then runs for the same
number of optimizer steps under several data orders (seeds); the table shows the mean ratio
estimate/truth of the plain ratio of EMAs, of the delta-method debiased ratio, and how often
the truth lies within ±2 reported standard errors.

This measures the "ratio of smoothed estimates" bias named in ../shared/DESIGN.md: with a small
big batch the smoothed |G|² is noisy and E[S/G] > E[S]/E[G].
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tiny_gpt import GPTModule, char_dataset  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from lightning_gns import GradientNoiseScale  # noqa: E402


def exact_stats(model: nn.Module, data: Subset, chunk: int = 32) -> dict[str, tuple[float, float]]:
    """Per parameter: (|G_p|², E|g_p|²) over every sequence, from per-example gradients."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(logits.flatten(0, 1), y)

    per_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    sq = dict.fromkeys(params, 0.0)
    n = 0
    for xs, ys in DataLoader(data, batch_size=chunk):
        g = per_grad(params, xs, ys)
        for k in params:
            total[k] += g[k].double().sum(0)
            sq[k] += float(g[k].double().square().sum())
        n += xs.shape[0]
    return {k: (float((total[k] / n).square().sum()), sq[k] / n) for k in params}


def truth_over(stats: dict[str, tuple[float, float]], names: list[str]) -> dict[str, float]:
    """|G|², tr(Σ) = E|g|² − |G|² and B_simple over the named parameters."""
    g2 = sum(stats[k][0] for k in names)
    trace = sum(stats[k][1] for k in names) - g2
    return {"grad_norm_sq": g2, "trace_cov": trace, "b_simple": trace / g2}


class Frozen(GPTModule):
    def __init__(self, model: nn.Module, data: Subset, batch_size: int, seed: int) -> None:
        super().__init__(
            vocab_size=1, lr=0.0, optimizer="sgd", seq_len=1, width=4, n_layers=0, n_heads=1
        )
        self.model = model
        self.data = data
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.data, batch_size=self.batch_size, shuffle=True, generator=gen, drop_last=True
        )


def pretrain(
    seq_len: int, width: int, layers: int, n_seqs: int, steps: int
) -> tuple[nn.Module, Subset]:
    torch.manual_seed(0)
    full, vocab = char_dataset(seq_len)
    data = Subset(full, range(n_seqs))
    module = GPTModule(vocab, lr=3e-3, seq_len=seq_len, width=width, n_layers=layers, n_heads=4)
    loader = DataLoader(full, batch_size=32, shuffle=True)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module.model.requires_grad_(True), data


def run(model, data, source, layers, micro, accumulate, steps, decay, seed) -> GradientNoiseScale:
    cb = GradientNoiseScale(ema_decay=decay, source=source, layers=layers, log_every_n_steps=10**6)
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Frozen(model, data, micro, seed))
    return cb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.quick:
        seq_len, width, layers, n_seqs, pre, args.steps = 32, 32, 2, 512, 100, min(args.steps, 150)
    else:
        seq_len, width, layers, n_seqs, pre = 64, 64, 2, 1024, 200
    t0 = time.time()
    model, data = pretrain(seq_len, width, layers, n_seqs, pre)
    stats = exact_stats(model, data)
    names = {id(p): k for k, p in model.named_parameters()}
    truth = truth_over(stats, list(stats))
    print(f"model: width {width}, {layers} layers, seq {seq_len}; data: {n_seqs} sequences")
    print(
        f"exact: |G|² = {truth['grad_norm_sq']:.4g}, tr(Σ) = {truth['trace_cov']:.4g}, "
        f"B_simple = {truth['b_simple']:.2f}  ({time.time() - t0:.0f} s)\n"
    )
    settings = [
        ("micro_batch", "all", 4, 4, 0.99),
        ("micro_batch", "all", 4, 4, 0.998),
        ("per_example", "all", 4, 4, 0.99),
        ("per_example", "all", 16, 1, 0.99),
        ("per_example", "norm", 16, 1, 0.99),
    ]
    print(
        "| source | layers | micro-batch × accumulation | EMA decay | coverage "
        "| plain ratio / truth (all params) | plain / truth (covered) "
        "| truth (covered) in the 95% interval |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for source, layers, micro, acc, decay in settings:
        whole, plain, covered = [], [], 0
        for seed in range(args.seeds):
            cb = run(model, data, source, layers, micro, acc, args.steps, decay, seed)
            v = cb.values
            params = cb.covered_parameters
            sub = truth_over(stats, [names[id(p)] for p in params])["b_simple"]
            whole.append(v.b_simple / truth["b_simple"])
            plain.append(v.b_simple / sub)
            covered += v.b_simple_lower <= sub <= v.b_simple_upper
        sd = statistics.stdev(plain) if len(plain) > 1 else float("nan")
        print(
            f"| {source} | {layers} | {micro} × {acc} | {decay} | {cb.coverage:.1%} | "
            f"{statistics.mean(whole):.3f} | {statistics.mean(plain):.3f} ± {sd:.3f} | "
            f"{covered}/{args.seeds} |",
            flush=True,
        )
    print(
        f"\n{args.seeds} seeds × {args.steps} optimizer steps each; total {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
