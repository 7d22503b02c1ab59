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


def test_the_sweep_tries_rates_beyond_the_grid_while_the_best_is_at_its_end(monkeypatch) -> None:
    """A rate at an end of the grid is not tuned: the sweep goes on past it (a factor 2 at a
    time, ``extend`` more at most) and marks a batch whose best rate is still an end."""
    sys.path.insert(0, str(SCRIPT.parent))
    import critical_batch as cb

    task = cb.Task("t", None, None, 0.0, base_lr=1.0, max_steps=10_000)  # type: ignore[arg-type]
    tried: list[float] = []

    def fake_train(task, b, lr, seed=0, max_steps=None, **kw):  # noqa: ANN001, ANN202
        g = lr / (task.base_lr * math.sqrt(b / 32))
        tried.append(round(g, 6))
        steps = 100 * (1 + math.log(g / best_g) ** 2)  # fewest steps at best_g × the √ rate
        run = cb.Run(task.name, b, lr)
        if steps <= (max_steps or task.max_steps):
            run.steps, run.examples, run.seconds = steps, steps * b, 1.0
        return run

    monkeypatch.setattr(cb, "train", fake_train)
    best_g = 0.25  # one step past the grid's lower end: tuned, inside the rates tried
    best = cb.sweep(task, [32], [0.5, 2.0], lambda msg: None, extend=2)
    assert tried == [0.5, 2.0, 0.25, 0.125]
    assert best[32].lr == pytest.approx(0.25) and not best[32].edge
    tried.clear()
    best_g = 0.01  # beyond what two more rates reach: the best is still an end, and says so
    best = cb.sweep(task, [32], [0.5, 2.0], lambda msg: None, extend=2)
    assert tried == [0.5, 2.0, 0.25, 0.125]
    assert best[32].lr == pytest.approx(0.125) and best[32].edge
    tried.clear()
    best_g = 1.0  # inside the grid: nothing more is tried
    best = cb.sweep(task, [32], [0.5, 1.0, 2.0], lambda msg: None, extend=2)
    assert tried == [1.0, 0.5, 2.0] and not best[32].edge
    tried.clear()
    best = cb.sweep(task, [32], [0.5, 2.0], lambda msg: None, extend=0)  # the grid only
    assert tried == [0.5, 2.0] and best[32].edge
