"""Does the 95% interval of B_simple hold, easy regime and hard regime alike?

Frozen digits MLPs (at initialisation, partly trained, trained to a low loss) with the exact
truth tr(Σ)/|G|² over all 1797 examples (per-example gradients from ``torch.func``), and the
small nanoGPT-style transformer of ``tests/zoo.py`` over its 256 character sequences. Each run
draws batches with replacement, gives the per-example source's record per step (mean |g_j|²,
|G_B|²) to the real tracker (default adaptive window), and is read at several step counts.
Per case and read: how often the interval contains the truth (coverage), how often B_simple is
reported as known, how often a known value is within 25% of the truth, and, when not known,
the lower bound relative to the truth and to the batch size.

    python benchmarks/coverage.py               # 400 runs per case (about a minute)
    python benchmarks/coverage.py --runs 100
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import zoo  # noqa: E402
from helpers import digits, mlp, per_example_grads, simulate_per_example, trained_mlp  # noqa: E402

CASES = [  # (model, batch size)
    ("nanoGPT-style transformer", 2),
    ("MLP at initialisation", 32),
    ("MLP at initialisation", 8),
    ("MLP partly trained", 16),
    ("MLP trained to a low loss", 32),
    ("MLP trained to a low loss", 16),
]


def transformer_grads() -> torch.Tensor:
    """Per-example gradients of the zoo's small transformer over its 256 sequences."""
    torch.manual_seed(0)
    model, data, loss = zoo.nanogpt()
    return zoo.per_example_grads(model, data, loss)


def models() -> dict[str, torch.nn.Module]:
    return {
        "MLP at initialisation": mlp(),
        "MLP partly trained": trained_mlp(steps=10),
        "MLP trained to a low loss": trained_mlp(),
    }


def summarize(truth: float, values: dict, batch: int) -> dict[str, float]:
    vs = list(values.values())
    covered = [v.b_simple_lower <= truth <= v.b_simple_upper for v in vs]
    known = [v for v in vs if v.precise]
    close = [abs(v.b_simple / truth - 1) <= 0.25 for v in known]
    lower = [v.b_simple_lower for v in vs if not v.precise and v.b_simple_lower > 0]
    return {
        "coverage": sum(covered) / len(vs),
        "known": len(known) / len(vs),
        "close": sum(close) / len(known) if known else math.nan,
        "ok": (sum(close) + len(vs) - len(known)) / len(vs),
        "lower_vs_truth": statistics.median(lower) / truth if lower else math.nan,
        "lower_above_batch": sum(lo > batch for lo in lower) / len(lower) if lower else math.nan,
        "window": statistics.median(v.window for v in vs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--read-at", type=int, nargs="+", default=[250, 500, 1000, 2000])
    args = ap.parse_args()
    t0 = time.time()
    x, y = digits()
    grads = {name: per_example_grads(m, x, y) for name, m in models().items()}
    grads["nanoGPT-style transformer"] = transformer_grads()
    print(
        "| model | batch B | exact B_simple | B/B_simple | steps | coverage of the 95% interval "
        "| known | known within 25% | within 25% or not known | median lower bound / truth "
        "(not known) | lower bound > B (not known) | median window (steps) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, batch in CASES:
        truth, reads = simulate_per_example(grads[name], batch, args.read_at, args.runs)
        for steps, values in reads.items():
            r = summarize(truth, values, batch)
            print(
                f"| {name} | {batch} | {truth:.1f} | {batch / truth:.2f} | {steps} | "
                f"{r['coverage']:.1%} | {r['known']:.0%} | {r['close']:.0%} | {r['ok']:.0%} | "
                f"{r['lower_vs_truth']:.2f} | {r['lower_above_batch']:.0%} | {r['window']:.0f} |",
                flush=True,
            )
    print(f"\n{args.runs} runs per case, batches drawn with replacement; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
