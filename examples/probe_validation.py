"""Does the built-in CriticalBatchProbe reproduce the offline branched measurement? (CPU)

For each task of ``examples/critical_batch.py`` (digits MLP, character model), the offline
measurement (``branched``: plain PyTorch, B = 32 trained to a loss, then branches at k·32 with
√k × the rate over 8,192 examples each, 1% tolerance) runs first, over three data orders, with
fresh examples per branch and, as the probe draws them, with one stream for every branch. Then
one Lightning run at B = 32 with the same Adam rate carries a ``GradientNoiseScale`` and a
``CriticalBatchProbe`` with the offline settings (factors 1–32, 8,192 examples, 1%, 4,096
held-back examples; 3 data orders, which the bootstrap resamples with the evaluation batches)
at the step the offline measurement branched from, and at 2× and 4× that step. A second run
with the probe's defaults gives its cost. Writes ``probe_validation.json`` and prints a
Markdown table.

    python examples/probe_validation.py            # both tasks, about 10 minutes on 2 cores
    python examples/probe_validation.py --quick    # digits only, fewer factors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))

from critical_batch import Net, Task, branched, charlm_task, digits_task  # noqa: E402

from lightning_gns import CriticalBatchProbe, GradientNoiseScale  # noqa: E402

B0 = 32
LR = 6e-3  # Adam at B = 32: the top of critical_batch.py's grid, where its best runs sat


def lightning_run(
    task: Task, steps: int, probe: CriticalBatchProbe, read_every: int = 10
) -> dict[str, Any]:
    """One run at B = 32 for ``steps`` steps with the probe and a GradientNoiseScale."""
    gns = GradientNoiseScale(log_every_n_steps=read_every, summary=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[gns, probe],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(Net(task, LR, B0, seed=0))
    return {
        "seconds": time.perf_counter() - start,
        "run_examples": probe.run_examples,
        "spent": probe.spent,
        "probes": [
            {
                "step": r.step,
                "b_crit": r.b_crit,
                "lower": r.lower,
                "upper": r.upper,
                "b_simple": r.b_simple,
                "losses": r.losses,
                "seconds": r.seconds,
                "spent": r.spent,
            }  # fmt: skip
            for r in probe.results
        ],
    }


def validate(name: str, quick: bool) -> dict[str, Any]:
    task = {"digits": digits_task, "charlm": charlm_task}[name](quick=False)
    ks = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32]
    budget = 8 * B0 * 32  # the offline setting: 8,192 examples per branch
    start = time.perf_counter()
    offline = branched(task, B0, LR, ks, budget=budget)
    offline["seconds"] = time.perf_counter() - start
    orders = [offline] + [branched(task, B0, LR, ks, budget=budget, seed=i) for i in (1, 2)]
    offline["orders"] = [o["b_crit"] for o in orders]  # the offline scatter over data orders
    offline["same_stream"] = [  # one stream of examples for every branch, as the probe draws
        branched(task, B0, LR, ks, budget=budget, seed=seed, one_stream=True)["b_crit"]
        for seed in range(3)
    ]
    s = int(offline["branch_step"])
    at = [s] if quick else [s, 2 * s, 4 * s]
    same = CriticalBatchProbe(at_steps=at, factors=ks, examples=budget, eval_batches=128, repeats=3)
    built_in = lightning_run(task, max(at), same)
    default = CriticalBatchProbe(at_steps=[s, 2 * s])
    steps = max(10 * s, 2_000)
    defaults = lightning_run(task, steps, default)
    return {"task": name, "lr": LR, "offline": offline, "built_in": built_in,
            "defaults": defaults, "default_steps": steps}  # fmt: skip


def number(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:,.0f}"


def offline_cell(off: dict[str, Any]) -> str:
    orders = ", ".join(number(b) for b in off["orders"])
    same = ", ".join(number(b) for b in off["same_stream"])
    return f"{orders}; one stream: {same}"


def table(results: list[dict[str, Any]]) -> str:
    fitted = {"digits": 704, "charlm": 1062}  # docs/critical-batch.md, the sweep's fit
    lines = [
        "| task | step | built-in probe (95%, 3 data orders) | offline branches (orders 0, 1, 2) "
        "| fitted B_crit "
        "| B_simple at the step | probe seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        off = r["offline"]
        for p in r["built_in"]["probes"]:
            same_step = p["step"] == off["branch_step"]
            lines.append(
                f"| {r['task']} | {p['step']:,} | {number(p['b_crit'])} "
                f"({number(p['lower'])}–{number(p['upper'])}) | "
                f"{offline_cell(off) if same_step else ''} | {fitted[r['task']]:,} | "
                f"{number(p['b_simple'])} | {p['seconds']:.1f} |"
            )
    lines += ["", "| task | probe defaults: probes | run steps | probe examples / run's |",
              "|---|---|---|---|"]  # fmt: skip
    for r in results:
        d = r["defaults"]
        got = ", ".join(f"{number(p['b_crit'])} ({number(p['lower'])}–{number(p['upper'])})"
                        for p in d["probes"])  # fmt: skip
        lines.append(f"| {r['task']} | {got} | {r['default_steps']:,} | "
                     f"{d['spent'] / d['run_examples']:.1%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", default="digits,charlm")
    parser.add_argument("--out", default="results/probe_validation")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = ["digits"] if args.quick else args.tasks.split(",")
    results = [validate(n, args.quick) for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_validation.json").write_text(json.dumps(results, indent=1, default=str))
    print(table(results))


if __name__ == "__main__":
    main()
