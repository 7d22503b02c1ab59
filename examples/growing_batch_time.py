"""Wall time to a target loss on one CPU: a batch that grows by micro-batch or by accumulation,
against fixed micro-batches (the tasks of examples/critical_batch.py).

On one device accumulation cannot cut wall time: a step of k micro-batches of 8 costs k
forward and backward passes of 8. A micro-batch that grows (a ``ResizableBatchSampler`` in
the DataLoader, ``AdaptiveBatchSize(max_micro_batch=...)``) runs the same schedule as fewer,
larger passes. Every run here draws the same stream of examples (a seeded sampler with
replacement), Adam with the learning rate lr₀·√(B/8) at batch B.

    python examples/growing_batch_time.py                 # every task, 3 data orders
    python examples/growing_batch_time.py --quick --seeds 1 --tasks teacher  # a smoke test
    python examples/growing_batch_time.py --tasks digits --seeds 1

Writes ``time.md`` and ``time.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import critical_batch as cb  # noqa: E402

from lightning_gns.adaptive import AdaptiveBatchSize  # noqa: E402

# Adam at B = 8 (teacher: the quick sweep's best at B = 32, 6e-3, √-scaled)
LR0 = {"digits": 3e-3, "charlm": 1.5e-3, "teacher": 3e-3, "held-out": 3e-3}  # held-out: untuned
FIXED = (8, 32, 128, 512)


def one(task: cb.Task, how: str, seed: int, largest: int) -> dict[str, Any]:
    """``grow micro-batch``, ``grow accumulation`` (from micro-batches of 8) or ``fixed B``."""
    lr0 = LR0[task.name]
    start = time.perf_counter()
    if how.startswith("fixed"):
        b = int(how.split()[-1])
        run = cb.train(task, b, lr0 * math.sqrt(b / 8), seed, adaptive=None, micro_only=True)
    else:
        micro = how == "grow micro-batch"
        ada = AdaptiveBatchSize(
            max_accumulate=largest // 8, max_micro_batch=largest if micro else None
        )
        run = cb.train(task, 8, lr0, seed, adaptive=ada, resizable=micro)
    return {
        "how": how,
        "seed": seed,
        "steps": run.steps,
        "examples": run.examples,
        "seconds": run.seconds,
        "total_seconds": time.perf_counter() - start,
        "batches": [int(c["batch_size"]) for c in run.adaptive],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | schedule | steps | examples | seconds to target | × the fastest fixed |",
        "|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        hows = list(dict.fromkeys(r["how"] for r in mine))

        def med(how: str, key: str, mine: list = mine) -> float:
            return statistics.median(r[key] for r in mine if r["how"] == how)

        best = min(med(h, "seconds") for h in hows if h.startswith("fixed"))
        for how in hows:
            lines.append(
                f"| {task} | {how} | {med(how, 'steps'):.0f} | {med(how, 'examples'):,.0f} | "
                f"{med(how, 'seconds'):.1f} | {med(how, 'seconds') / best:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="digits,charlm,teacher")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small tasks, B ≤ 128 (a smoke test)")
    parser.add_argument("--out", default="results/growing_batch_time")
    args = parser.parse_args()
    if unknown := [n for n in args.tasks.split(",") if n not in LR0]:
        parser.error(f"--tasks: no tuned rate for {', '.join(unknown)}; choose of {','.join(LR0)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixed = FIXED[:3] if args.quick else FIXED
    hows = ["grow micro-batch", "grow accumulation", *(f"fixed B = {b}" for b in fixed)]
    rows = []
    for name in args.tasks.split(","):
        task = cb.TASKS[name](quick=args.quick)
        for seed in range(args.seeds):  # seed-major: a busy spell hits every schedule alike
            for how in hows:
                row = {"task": name, **one(task, how, seed, largest=128 if args.quick else 1024)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    (out / "time.json").write_text(json.dumps(rows, indent=1))
    (out / "time.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
