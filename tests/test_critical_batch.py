"""The validation experiment of examples/critical_batch.py in its small setting."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # make test-fast leaves these out
SCRIPT = Path(__file__).parents[1] / "examples" / "critical_batch.py"


def test_quick_experiment_writes_its_table_and_plots(tmp_path) -> None:
    args = ["--quick", "--tasks", "digits", "--rules", "lower_bound,sqrt", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("table.md", "results.json", "pareto.png", "adaptive.png"):
        assert (tmp_path / name).stat().st_size > 0
    (r,) = json.loads((tmp_path / "results.json").read_text())
    assert math.isfinite(r["b_crit"]) and r["b_crit"] > 0
    for key in ("b_simple", "preconditioned", "norm"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    steps = [run["steps"] for run in r["runs"].values()]
    assert all(math.isfinite(s) for s in steps)  # every batch size reached the target
    assert steps == sorted(steps, reverse=True)  # larger batches: fewer steps
    a = r["adaptive"]["lower_bound"]
    grown = a["adaptive"]
    assert grown and grown[-1]["batch_size"] > a["batch"]  # the adaptive run grew its batch
    assert grown[-1]["new_micro"] > grown[0]["old_micro"]  # micro-batch first (resizable)
    default = r["adaptive"]["sqrt"]  # the default rule reached the target, having grown
    assert math.isfinite(default["steps"]) and default["adaptive"][-1]["batch_size"] > 8
    assert "Pareto front" in (tmp_path / "table.md").read_text()  # the verdict per rule
    assert "B_crit (fit)" in (tmp_path / "table.md").read_text()
    assert math.isfinite(r["b_noise_growth"]) and r["b_noise_growth"] > 0
    # the field's open-loop schedules are rows of the same table
    ramp, seesaw = r["adaptive"]["open loop: linear ramp"], r["adaptive"]["open loop: Seesaw"]
    assert math.isfinite(ramp["steps"]) and math.isfinite(seesaw["steps"])
    assert ramp["adaptive"][-1]["batch_size"] > ramp["batch"]  # the ramp grew the batch
    assert "(open loop: Seesaw)" in (tmp_path / "table.md").read_text()


def test_the_teacher_task_s_noise_scale_grows_tenfold() -> None:
    """The third task is there for a B_noise that grows: at B = 32, the callback's B_simple
    over its last read-outs is at least 10× that of its first (issue 26, item 3)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import critical_batch as cb

    torch.set_num_threads(1)
    task = cb.teacher_task(quick=True)
    run = cb.train(task, 32, 3e-3, max_steps=900)
    assert math.isfinite(run.steps)  # it reached the target near the noise floor
    assert cb.growth(run) >= 10
