"""Pooling the ranks' per-step records vs averaging their smoothed moments (issue 17).

Per-example source on W simulated ranks (frozen digits MLPs, the exact truth over all 1797
examples from per-example gradients): every step each rank draws ``batch`` examples with
replacement; the big batch is all W·batch of them. Two ways to combine the ranks, each fed to
the real tracker (default adaptive window):

* rank-local (today): each rank estimates |G|² and tr(Σ) from its own mean |g_j|² and the
  common |G_big|², keeps its own EMAs, and a read averages the ranks' moments;
* pooled (what the callback does now): each rank's per-step record (sums: Σ|g_j|², its count
  and Σ1/b, its share |G_big|²/W of the big batch) is summed over ranks, as the logging step's
  one all-reduce does, and fed to the tracker (``GNSTracker.feed``): each step's small norm is
  the mean over all W·batch examples; one set of EMAs, the same on every rank.

Reported per case and read: coverage of the 95% interval, median interval width
(upper/lower), the median lower bound over the truth, and how often B_simple is known.

    python benchmarks/pooled_interval.py             # 200 runs per case
    python benchmarks/pooled_interval.py --runs 50 --world 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import digits, mlp, per_example_grads, trained_mlp  # noqa: E402

from lightning_gns.estimator import grad_norm_sq, trace_cov  # noqa: E402
from lightning_gns.tracker import GNSTracker  # noqa: E402


def simulate(
    grads: torch.Tensor, batch: int, world: int, read_at: list[int], runs: int, seed: int = 0
) -> tuple[float, dict[int, dict[str, list]]]:
    """Truth tr(Σ)/|G|², and per read {scheme: [GNSValues per run]}."""
    n = grads.shape[0]
    mean = grads.mean(0)
    truth = float((grads - mean).square().sum(1).mean() / mean.square().sum())
    gram = (grads @ grads.T).float()
    sq = gram.diagonal()
    gen = torch.Generator().manual_seed(seed)
    cols = [str(r) for r in range(runs)]
    local = [GNSTracker(None, cols) for _ in range(world)]
    pooled = GNSTracker(None, cols)
    b_big = float(world * batch)
    reads, done = {}, 0
    for stop in sorted(read_at):
        while done < stop:
            k = min(5, stop - done)
            idx = torch.randint(0, n, (k, runs, world, batch), generator=gen)
            small = sq[idx].mean(-1).double()  # (k, runs, world): each rank's mean |g_j|²
            every = idx.reshape(k, runs, world * batch)
            big = gram[every.unsqueeze(-1), every.unsqueeze(-2)].mean((-1, -2)).double()
            for r in range(world):
                s = small[..., r]
                local[r].update(grad_norm_sq(s, big, 1.0, b_big), trace_cov(s, big, 1.0, b_big))
            # each rank's record, summed over ranks (the all-reduce), through the tracker's feed
            small_sum = (small * batch).sum(-1)  # Σ over every rank's examples of |g_j|²
            count = torch.full((k, 1), float(world * batch), dtype=torch.float64)
            big_count = torch.full((k, 1), float(world), dtype=torch.float64)  # micro-batches
            big_inv = big_count / batch
            rows = torch.cat([small_sum, big, count, count, big_count, big_inv, 0 * count], 1)
            pooled.feed(rows)
            done += k
        averaged = torch.stack([t.moments for t in local]).mean(0)  # today's read_together
        reads[stop] = {
            "rank-local": list(local[0].values(averaged.tolist()).values()),
            "pooled": list(pooled.read().values()),
        }
    return truth, reads


def summary(truth: float, values: list) -> str:
    covered = sum(v.b_simple_lower <= truth <= v.b_simple_upper for v in values) / len(values)
    widths = [v.b_simple_upper / v.b_simple_lower for v in values if v.b_simple_lower > 0]
    width = statistics.median(widths) if widths else float("nan")
    known = sum(v.precise for v in values) / len(values)
    lower = statistics.median(max(v.b_simple_lower, 0.0) / truth for v in values)
    return (
        f"coverage {covered:6.1%}  width ×{width:6.2f}  lower/truth {lower:5.2f}  "
        f"known {known:6.1%}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="per rank")
    ap.add_argument("--read-at", type=int, nargs="+", default=[250, 1000])
    args = ap.parse_args()
    t0 = time.time()
    x, y = digits()
    cases = {"MLP at initialisation": mlp(), "MLP trained to a low loss": trained_mlp()}
    for name, model in cases.items():
        grads = per_example_grads(model, x, y)
        for batch in args.batch:
            truth, reads = simulate(grads, batch, args.world, args.read_at, args.runs)
            print(f"{name}, {args.world} ranks × batch {batch}: B_simple = {truth:.1f}")
            for steps, schemes in reads.items():
                for scheme, values in schemes.items():
                    print(f"  {steps:5d} steps  {scheme:10s}  {summary(truth, values)}")
    print(f"({args.runs} runs per case, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
