"""Summary table, plots and HTML report from metric tables and real TensorBoard logs."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_gns import advice
from lightning_gns.logs import read_metrics
from lightning_gns.report import (
    SUMMARY_COLUMNS,
    advise,
    explore,
    plot_efficiency,
    plot_noise_scale,
    plot_pareto,
    summarize,
    write_explore,
    write_report,
)


def frame(runs: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """Long table from {run: {metric: values at steps 0, 10, 20, ...}}."""
    rows = [
        (run, 10 * i, metric, float(v))
        for run, metrics in runs.items()
        for metric, values in metrics.items()
        for i, v in enumerate(values)
    ]
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value"])


def growing(n: int = 20, start: float = 10.0) -> list[float]:
    return [start + i for i in range(n)]


def check_png(path: Path) -> None:
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.var(img[..., :3])) > 0


def test_summarize_hand_values() -> None:
    values = growing(20)  # 10..29; 10% of 20 points = 2 points
    df = frame(
        {
            "a": {
                "gns/b_simple": values,
                "gns/b_simple_lower": [v * 0.9 for v in values],
                "gns/b_simple_upper": [v * 1.2 for v in values],
                "gns/batch_size": [8] * 19 + [16],
                "gns/small_batch_size": [1] * 20,
                "gns/coverage": [0.5] * 20,
                "loss": [1] * 20,
            },
            "no_gns": {"loss": [1.0, 0.5]},
        }
    )
    summary = summarize(df)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["run"].tolist() == ["a"]
    row = summary.iloc[0]
    assert row["last_step"] == 190
    assert row["batch_size"] == 16
    assert row["b_simple_early"] == pytest.approx(10.5)
    assert row["b_simple_late"] == pytest.approx(28.5)
    assert row["b_simple_last"] == pytest.approx(29.0)
    assert row["source"] == "per-example" and row["coverage"] == 0.5
    assert (row["b_simple_lower"], row["b_simple_upper"]) == (29.0 * 0.9, 29.0 * 1.2)
    assert row["recommended_batch_size"] == 32  # 28.5 -> 2^round(4.83)
    assert row["efficiency"] == pytest.approx(4 * 16 * 28.5 / (16 + 28.5) ** 2)
    waste = advice.wasted(16, 28.5, 32)
    assert row["extra_steps_pct"] == pytest.approx(waste["extra_steps_pct"])
    assert row["extra_examples_pct"] == pytest.approx(waste["extra_examples_pct"])
    assert row["extra_steps_pct"] > 0 > row["extra_examples_pct"]  # too small: wastes time


def test_summarize_ignores_nan_points_and_handles_missing_pieces() -> None:
    df = frame(
        {
            "nan_first": {
                "gns/b_simple": [math.nan, 4.0, 4.0, math.nan],
                "gns/b_simple_se": [math.nan, 0.2, 0.2, math.nan],
            },
            "negative": {"gns/b_simple": [-5.0, -3.0], "gns/batch_size": [32, 32]},
        }
    )
    summary = summarize(df).set_index("run")
    assert summary.loc["nan_first", "b_simple_early"] == 4.0
    assert summary.loc["nan_first", "recommended_batch_size"] == 4
    assert math.isnan(summary.loc["nan_first", "batch_size"])  # not logged
    assert math.isnan(summary.loc["nan_first", "efficiency"])
    assert math.isnan(summary.loc["negative", "recommended_batch_size"])
    lines = advise(summary.reset_index())
    assert len(lines) == 2 and "no advice" in lines[1]
    assert "not logged" in lines[0]


def test_summarize_without_b_simple_raises() -> None:
    with pytest.raises(ValueError, match="no gns/b_simple metric"):
        summarize(frame({"a": {"loss": [1.0, 0.5]}}))
    with pytest.raises(ValueError, match="columns"):
        summarize(pd.DataFrame({"x": [1]}))


def test_advise_directions() -> None:
    df = frame(
        {
            name: {
                "gns/b_simple": [100.0] * 10,
                "gns/b_simple_lower": [85.0] * 10,
                "gns/b_simple_upper": [120.0] * 10,
                "gns/batch_size": [batch] * 10,
            }
            for name, batch in (("small", 8), ("big", 1024), ("ok", 128))
        }
    )
    lines = dict(zip(["big", "ok", "small"], advise(summarize(df)), strict=True))
    assert "below it" in lines["small"] and "fewer optimizer steps" in lines["small"]
    assert "above it" in lines["big"] and "save about" in lines["big"]
    assert "already matches" in lines["ok"]


def test_plots_several_runs(tmp_path: Path) -> None:
    df = frame(
        {
            "a": {
                "gns/b_simple": growing(),
                "gns/b_simple_se": [1.0] * 20,
                "gns/batch_size": [16] * 20,
            },
            "b": {"gns/b_simple": growing(start=50), "gns/batch_size": [256] * 20},
            "c": {"gns/b_simple": [-1.0, 3.0, 5.0]},  # non-positive: linear axis, no curve
        }
    )
    summary = summarize(df)
    for func, arg, name in [
        (plot_noise_scale, df, "noise.png"),
        (plot_efficiency, summary, "eff.png"),
        (plot_pareto, summary, "pareto.png"),
    ]:
        out = func(arg, tmp_path / "sub" / name)
        assert out == tmp_path / "sub" / name
        check_png(out)


def test_plots_without_usable_estimates_still_write_a_png(tmp_path: Path) -> None:
    summary = summarize(frame({"a": {"gns/b_simple": [-1.0, -2.0]}}))
    check_png(plot_efficiency(summary, tmp_path / "e.png"))
    check_png(plot_pareto(summary, tmp_path / "p.png"))


def test_write_report_from_tensorboard_logs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, batch in [("run<1>", 32), ("run2", 512)]:
        writer = SummaryWriter(str(tmp_path / "logs" / name))
        for step in range(0, 100, 5):
            b = 20 * math.exp(step / 50) * (1 + 0.1 * rng.standard_normal())
            writer.add_scalar("gns/b_simple", b, step)
            writer.add_scalar("gns/b_simple_se", 0.1 * b, step)
            writer.add_scalar("gns/batch_size", batch, step)
        writer.close()
    messages: list[str] = []
    page = write_report(tmp_path / "logs", tmp_path / "out", progress=messages.append)
    assert page == tmp_path / "out" / "report.html"
    for name in ("noise_scale.png", "efficiency.png", "pareto.png"):
        check_png(tmp_path / "out" / name)
    text = page.read_text(encoding="utf-8")
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', text)) == 3
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', text)  # nothing external
    assert "http://" not in text and "https://" not in text
    assert "run&lt;1&gt;" in text and "run<1>" not in text  # names are escaped
    assert "<table" in text and "<style>" in text and text.count("<img ") == 3
    assert "<script" not in text  # no JavaScript in the page
    assert any("plotting" in m for m in messages) and any("reading" in m for m in messages)

    df_page = write_report(read_metrics(tmp_path / "logs"), tmp_path / "out2", source="mine")
    df_text = df_page.read_text(encoding="utf-8")
    assert df_text.count("<img ") == 3 and "Source: mine" in df_text


def test_explore_default_batch_sizes() -> None:
    assert explore(16)["batch_size"].tolist() == [2.0**k for k in range(11)]
    assert explore(1000)["batch_size"].tolist() == [2.0**k for k in range(4, 16)]
    assert explore(0.01)["batch_size"].tolist() == [1.0]
    table = explore(16.07, [8, 16, 32])
    assert table["efficiency"].iloc[1] == pytest.approx(1.0, abs=1e-4)
    for bad in (0, -1, math.nan, math.inf, "x"):
        with pytest.raises(ValueError):
            explore(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        explore(16, [])


def test_write_explore(tmp_path: Path) -> None:
    page = write_explore(16.07, [8, 16, 64], tmp_path)
    assert page.name == "explore.html"
    check_png(tmp_path / "efficiency.png")
    check_png(tmp_path / "pareto.png")
    text = page.read_text(encoding="utf-8")
    assert (
        text.count('<img src="data:image/png;base64,') == 2 and "recommended batch size 16" in text
    )


def test_a_sweep_of_many_runs_stays_readable_and_advises_only_what_is_supported(
    tmp_path: Path,
) -> None:
    runs = {
        f"run{i:02d}": {
            "gns/b_simple": [20.0 * 1.1**i] * 10,
            "gns/b_simple_lower": [17.0 * 1.1**i] * 10,
            "gns/b_simple_upper": [24.0 * 1.1**i] * 10,
            "gns/batch_size": [32] * 10,
            "gns/small_batch_size": [8] * 10,
            "gns/coverage": [1.0] * 10,
        }
        for i in range(28)
    }
    runs["all_nan"] = {"gns/b_simple": [math.nan] * 5, "gns/b_simple_lower": [400.0] * 5}
    runs["short"] = {  # 75 steps: a point estimate with an interval far too wide to act on
        "gns/b_simple": [2.0] * 8,
        "gns/b_simple_lower": [0.3] * 8,
        "gns/b_simple_upper": [90.0] * 8,
        "gns/batch_size": [64] * 8,
    }
    df = frame(runs)
    summary = summarize(df).set_index("run")
    assert len(summary) == 30  # every run, including the one without an estimate
    assert "no estimate" in summary.loc["all_nan", "note"]
    assert summary.loc["run05", "source"] == "micro-batch (8)"
    assert math.isnan(summary.loc["short", "recommended_batch_size"])
    lines = dict(zip(summary.index, advise(summary.reset_index()), strict=True))
    assert "at least 400" in lines["all_nan"]
    assert "no advice" in lines["short"] and "too wide" in lines["short"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "constrained layout not applied"
        page = write_report(df, tmp_path / "out")
    text = page.read_text()
    assert "all_nan" in text and "micro-batch (8)" in text
    assert "(8 of 29 runs" in " ".join(_plot_titles(df, summary.reset_index()))


def _plot_titles(df: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    from lightning_gns.report.plots import pick_runs

    chosen = pick_runs(summary)
    assert len(chosen) == 8 and chosen[0] == "short" and chosen[-1] == "run27"
    return [f"({len(chosen)} of {len(summary) - 1} runs"]
