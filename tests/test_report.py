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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from torch.utils.tensorboard import SummaryWriter

from lightning_gns import advice
from lightning_gns.report import (
    SUMMARY_COLUMNS,
    advise,
    explore,
    format_summary,
    plot_efficiency,
    plot_noise_scale,
    plot_pareto,
    summarize,
    write_explore,
    write_report,
)
from lightning_gns.report.logs import Logs, read_logs, read_metrics
from lightning_gns.report.plots import (
    Curve,
    _curves_from_summary,
    efficiency_figure,
    noise_scale_figure,
    pareto_figure,
    pick_runs,
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
    values = growing(20)  # 10..29; early = mean of the first 10% (2 points)
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
        }
    )
    summary = summarize(df)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["run"].tolist() == ["a"]
    row = summary.iloc[0]
    assert row["last_step"] == 190
    assert row["batch_size"] == 16
    assert row["b_simple_early"] == pytest.approx(10.5)
    assert row["b_simple"] == 29.0  # the last read-out, not a mean of several
    assert row["source"] == "per-example" and row["coverage"] == 0.5
    assert (row["b_simple_lower"], row["b_simple_upper"]) == (29.0 * 0.9, 29.0 * 1.2)
    assert (row["logged_points"], row["known_points"]) == (20, 20)
    assert row["recommended_batch_size"] == 32  # log2(29) = 4.86 -> 2^5
    assert row["efficiency"] == pytest.approx(1856 / 2025)  # 4·16·29/45²
    # at 32 instead of 16: S ∝ 1 + 29/B, E ∝ 1 + B/29
    assert row["steps_change_pct"] == pytest.approx(100 * (976 / 1440 - 1))  # -32.2%
    assert row["examples_change_pct"] == pytest.approx(100 * 16 / 45)  # +35.6%
    table = format_summary(summary).iloc[0]
    assert table["B_simple"] == "29" and table["95% interval"] == "26.1–34.8"
    assert table["at recommended"] == "steps -32%, examples +36%"
    (line,) = advise(summary)
    assert "B_simple ≈ 29 at step 190 (95% interval 26.1–34.8), recommended batch size 32" in line
    assert "about 32% fewer optimizer steps for 36% more examples" in line  # as in the table
    assert "covers 50%" in line


def test_every_value_of_a_row_is_from_the_last_read_out() -> None:
    """B_simple known until step 140, then not (the interval widened) until the run ends at
    250: the row shows step 250, its interval and no B_simple, never a value from 140."""
    known = [50.0 + i for i in range(15)]  # steps 0..140
    df = frame(
        {
            "r": {
                "gns/b_simple": known + [math.nan] * 11,  # steps 150..250: not yet known
                "gns/b_simple_lower": [0.9 * v for v in known] + [180.2] * 11,
                "gns/b_simple_upper": [1.1 * v for v in known] + [749.7] * 11,
                "gns/batch_size": [32.0] * 26,
            }
        }
    )
    row = summarize(df).iloc[0]
    assert row["last_step"] == 250 and math.isnan(row["b_simple"])
    assert (row["b_simple_lower"], row["b_simple_upper"]) == (180.2, 749.7)
    assert math.isnan(row["recommended_batch_size"])
    table = format_summary(summarize(df)).iloc[0]
    assert (table["step"], table["B_simple"], table["95% interval"]) == (
        "250",
        "not yet known",
        "180.2–749.7",
    )
    (line,) = advise(summarize(df))
    assert "spans 4.16x" in line and "at step 250" in line  # 749.7 / 180.2
    assert "at least 180.2 (95%), above batch size 32: grow it to at least 128" in line


def test_the_report_recommends_what_the_callback_logged_near_two_to_the_six_and_a_half() -> None:
    """2^6.5 = 90.5: the callback rounded its last value 91 up to 128; a mean of the last 10%
    of points (89) rounds down to 64, which is what the report used to say."""
    values = [80.0] * 18 + [87.0, 91.0]  # the last 10%: mean 89
    metrics = {
        "gns/b_simple": values,
        "gns/b_simple_lower": [v / 1.1 for v in values],
        "gns/b_simple_upper": [v * 1.1 for v in values],
        "gns/batch_size": [32.0] * 20,
    }
    logged = {**metrics, "gns/optimal_batch_size": [64.0] * 19 + [128.0]}
    multiple = {**metrics, "gns/batch_size_multiple": [48.0] * 20}  # logged when set
    summary = summarize(frame({"logged": logged, "old_logs": metrics, "multiple": multiple}))
    rec = dict(zip(summary["run"], summary["recommended_batch_size"], strict=True))
    assert rec == {"logged": 128, "old_logs": 128, "multiple": 96}
    assert advice.decide(91.0, 91.0 / 1.1, 91.0 * 1.1, 32).recommended == 128  # same function


def test_without_a_precise_interval_the_report_advises_what_the_callback_does() -> None:
    """The callback logs gns/optimal_batch_size at every read-out: the recommendation where the
    interval is precise, the batch to grow to where only a lower bound above the batch is
    known, the batch used otherwise (no change). The report says the same."""
    wide = {  # bounded but 2.08x wide, batch above the lower bound: nothing to change
        "gns/b_simple": [15.8] * 3,
        "gns/b_simple_lower": [10.99] * 3,
        "gns/b_simple_upper": [22.83] * 3,
        "gns/batch_size": [16.0] * 3,
        "gns/optimal_batch_size": [16.0] * 3,
    }
    open_ = {  # no upper end; the lower bound 43.76 is above the batch 4: grow to 2^5
        "gns/b_simple": [math.nan] * 3,
        "gns/b_simple_lower": [43.76] * 3,
        "gns/b_simple_upper": [math.nan] * 3,
        "gns/batch_size": [4.0] * 3,
        "gns/optimal_batch_size": [32.0] * 3,
    }
    old_logs = {k: v for k, v in open_.items() if k != "gns/optimal_batch_size"}
    multiple = {**open_, "gns/batch_size_multiple": [20.0] * 3}  # 43.76 rounds down to 40
    summary = summarize(frame({"wide": wide, "open": open_, "old": old_logs, "mult": multiple}))
    summary = summary.set_index("run")
    assert summary["recommended_batch_size"].isna().all()
    grow = summary["grow_to_batch_size"]
    assert math.isnan(grow["wide"]) and (grow["open"], grow["old"], grow["mult"]) == (32, 32, 40)
    table = format_summary(summary.reset_index()).set_index("run")
    assert table.loc["wide", "B_simple"] == "15.8" and table.loc["wide", "recommended"] == "n/a"
    assert table.loc["open", "recommended"] == "≥ 32" and table.loc["mult", "recommended"] == "≥ 40"
    lines = dict(zip(summary.index, advise(summary.reset_index()), strict=True))
    assert lines["wide"].startswith("wide: no advice at step 20: the 95% interval spans 2.08x")
    assert "at least 43.76 (95%), above batch size 4: grow it to at least 32;" in lines["open"]
    assert "at least 43.76 (95%), above batch size 4: grow it to at least 40;" in lines["mult"]


def test_reasons_are_true_and_said_once() -> None:
    df = frame(
        {  # the GPT run: upper bound finite at every point, interval 2.08x wide
            "wide": {
                "gns/b_simple": [math.nan] * 30,
                "gns/b_simple_lower": [10.99] * 30,
                "gns/b_simple_upper": [22.83] * 30,
                "gns/batch_size": [16.0] * 30,
            },
            "open": {  # |G|² not significantly above zero: no upper end
                "gns/b_simple": [math.nan] * 5,
                "gns/b_simple_lower": [400.0] * 5,
                "gns/b_simple_upper": [math.nan] * 5,
                "gns/batch_size": [32.0] * 5,
            },
            "no_b": {"gns/grad_norm_sq": [1.0, 2.0], "gns/batch_size": [8.0, 8.0]},
            "early": {"gns/b_simple": [math.nan], "gns/b_simple_lower": [math.nan]},
        }
    )
    summary = summarize(df).set_index("run")
    table = format_summary(summary.reset_index()).set_index("run")
    assert table.loc["wide", "95% interval"] == "10.99–22.83"
    assert table.loc["open", "95% interval"] == "≥ 400"
    assert table.loc["no_b", "B_simple"] == "n/a"
    lines = dict(zip(summary.index, advise(summary.reset_index()), strict=True))
    assert "significantly" not in lines["wide"]
    assert "not yet known at any of its 30 logged points" in lines["wide"]
    assert "spans 2.08x, more than the 1.5x" in lines["wide"]
    assert "at step 40, |G|² is not significantly above zero" in lines["open"]
    assert "at least 400 (95%), above batch size 32: grow it to at least 256" in lines["open"]
    assert "no gns/b_simple logged" in lines["no_b"]
    assert "no advice at step 0: no 95% interval yet" in lines["early"]
    for line in lines.values():
        sentences = [x.strip() for x in re.split(r"[.;:] ", line) if x.strip()]
        assert len(sentences) == len(set(sentences)), line
        assert line.count("B_noise is at least") <= 1, line


def test_runs_without_scalars_or_gns_metrics_are_listed_with_their_reason() -> None:
    df = frame({"ok": {"gns/b_simple": [5.0], "gns/b_simple_lower": [4.5]}, "plain": {"loss": [1]}})
    logs = Logs(df, ["crashed", "ok", "plain", "silent"], errors={"crashed": "RuntimeError: no"})
    summary = summarize(logs).set_index("run")
    assert summary.index.tolist() == ["crashed", "ok", "plain", "silent"]
    assert summary.loc["crashed", "note"] == "it logged no scalar; it stopped with RuntimeError: no"
    assert summary.loc["silent", "note"].endswith("it stopped before its first read-out")
    assert summary.loc["plain", "note"].startswith("no gns/* metric among its 1 logged metrics")
    with pytest.raises(ValueError, match="no gns/b_simple metric"):
        summarize(Logs(frame({"plain": {"loss": [1]}}), ["plain", "silent"]))
    assert len(summarize(Logs(_empty_frame(), ["crashed"], errors={"crashed": "E: x"}))) == 1


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({"run": [], "step": [], "metric": [], "value": []})


def test_summarize_handles_missing_pieces() -> None:
    df = frame(
        {
            "se_only": {  # older logs: ±1.96 s.e. at the last read-out
                "gns/b_simple": [math.nan, 4.0, 4.0, 4.0],
                "gns/b_simple_se": [math.nan, 0.2, 0.2, 0.2],
            },
            "negative": {"gns/b_simple": [-5.0, -3.0], "gns/batch_size": [32, 32]},
        }
    )
    summary = summarize(df).set_index("run")
    assert summary.loc["se_only", "b_simple_early"] == 4.0
    lo, hi = summary.loc["se_only", ["b_simple_lower", "b_simple_upper"]]
    assert (lo, hi) == (pytest.approx(4 - 0.392), pytest.approx(4 + 0.392))
    assert summary.loc["se_only", "recommended_batch_size"] == 4
    assert math.isnan(summary.loc["se_only", "batch_size"])  # not logged
    assert math.isnan(summary.loc["se_only", "efficiency"])
    assert math.isnan(summary.loc["negative", "recommended_batch_size"])
    lines = advise(summary.reset_index())
    assert len(lines) == 2 and "no advice" in lines[0]
    assert "the batch size used is unknown" in lines[1]


def test_summarize_without_gns_metrics_raises() -> None:
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
    assert "from 8 to 128" in lines["small"] and "fewer optimizer steps" in lines["small"]
    assert "from 1024 to 128" in lines["big"] and "fewer examples (compute)" in lines["big"]
    assert "recommended batch size 128: the batch size used" in lines["ok"]
    assert "Moving" not in lines["ok"]


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
    assert "not yet known at any of its 5" in summary.loc["all_nan", "note"]
    assert summary.loc["run05", "source"] == "micro-batch (8)"
    assert math.isnan(summary.loc["short", "recommended_batch_size"])
    lines = dict(zip(summary.index, advise(summary.reset_index()), strict=True))
    assert "at least 400" in lines["all_nan"]
    assert "no advice" in lines["short"] and "spans 300x" in lines["short"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "constrained layout not applied"
        page = write_report(df, tmp_path / "out")
    text = page.read_text()
    assert "all_nan" in text and "micro-batch (8)" in text
    chosen = pick_runs(summary.reset_index())  # the bound-only run is drawn (its bound: 400)
    assert len(chosen) == 8 and chosen[0] == "short" and chosen[-1] == "all_nan"
    fig = noise_scale_figure(df, chosen)
    assert "(8 of 30 runs" in fig.axes[0].get_title()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "all_nan (bound)" in labels


def _overlaps(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts of a figure whose drawn boxes intersect."""
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [
        (a, b)
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if box_a.overlaps(box_b)
    ]


def test_labels_of_two_runs_at_one_batch_size_never_overlap() -> None:
    df = frame(
        {
            name: {
                "gns/b_simple": [b] * 5,
                "gns/b_simple_lower": [0.9 * b] * 5,
                "gns/b_simple_upper": [1.1 * b] * 5,
                "gns/batch_size": [16.0] * 5,
            }
            for name, b in (("first", 50.0), ("second", 52.0))
        }
    )
    curves = _curves_from_summary(summarize(df))
    eff = efficiency_figure(curves)
    assert _overlaps(eff) == []
    labels = [t.get_text() for t in eff.axes[0].get_legend().get_texts()]
    # 4·16·50/66² = 3200/4356 = 73.5%, 4·16·52/68² = 3328/4624 = 72.0%
    assert "first: B=16, 73%" in labels and "second: B=16, 72%" in labels
    assert _overlaps(pareto_figure(curves)) == []
    single = Curve("B_noise = 300", 300.0, "C0", current=[2.0**k for k in range(3, 15)])
    assert _overlaps(efficiency_figure([single], "batch sizes in the table")) == []
    assert _overlaps(pareto_figure([single], "batch sizes in the table")) == []


@pytest.mark.slow
def test_the_report_of_a_real_sweep_agrees_with_its_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Short real fits, each logged to TensorBoard and CSV at once, a run with only a lower
    bound and a run refused at fit start: one row per run, each row as the run's CSV says at
    its last read-out, the crash listed with its error, no sentence said twice."""
    from examples.sweep import make_sweep
    from lightning_gns.report.cli import main

    sweep = tmp_path / "sweep"
    make_sweep(sweep, steps=40)
    assert main(["report", str(sweep), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "reading 9 log folder(s)" in err  # 4 twins and the crashed run's TensorBoard folder
    assert "found 5 run(s), 4 of them logged to TensorBoard and CSV at once" in err
    assert "summarized 5 run(s)" in err

    logs = read_logs(sweep)
    assert not logs.frame.duplicated(["run", "step", "metric"]).any()  # no doubled rows
    summary = summarize(logs).set_index("run")
    assert len(summary) == 5
    for run, folders in logs.merged.items():
        csv = pd.read_csv(sweep / folders[1] / "metrics.csv")  # Lightning's own file, by pandas
        last = csv.dropna(subset=["gns/batch_size"]).iloc[-1]
        row = summary.loc[run]
        assert row["last_step"] == last["step"] and row["batch_size"] == last["gns/batch_size"]
        for col, key in [("b_simple", "gns/b_simple"), ("b_simple_lower", "gns/b_simple_lower")]:
            assert row[col] == pytest.approx(last[key], nan_ok=True), (run, col)
        # the callback logs the size the data support: the recommendation, the batch to grow
        # to with only a lower bound, or the batch used; the report advises the same
        rec, grow = row["recommended_batch_size"], row["grow_to_batch_size"]
        said = rec if math.isfinite(rec) else grow if math.isfinite(grow) else row["batch_size"]
        assert said == last["gns/optimal_batch_size"], run
        upper = last["gns/b_simple_upper"]
        assert row["b_simple_upper"] == (upper if math.isfinite(upper) else math.inf)
        assert sum(line.startswith(f"{run}:") for line in out.splitlines()) == 1
        assert f"{run} from {folders[0]} and {folders[1]}" in out
    frozen = summary.loc["frozen_b4"]
    assert frozen["known_points"] == 0 and math.isinf(frozen["b_simple_upper"])
    assert "frozen_b4" in pick_runs(summary.reset_index())  # drawn
    crashed = summary.loc["batchnorm/version_0"]
    assert crashed["note"].startswith("it logged no scalar; it stopped with RuntimeError: ")
    assert "BatchNorm" in crashed["note"]
    for line in out.splitlines():
        sentences = [x.strip() for x in re.split(r"[.;] ", line) if x.strip()]
        assert len(sentences) == len(set(sentences)), line


def _legend(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_legends_list_only_what_is_drawn() -> None:
    """No "recommended" star without a recommendation, no "lower bound" or "95% interval" or
    "batch size" entry without its curve."""
    known = {
        "gns/b_simple": [100.0] * 5,
        "gns/b_simple_lower": [85.0] * 5,
        "gns/b_simple_upper": [120.0] * 5,
        "gns/batch_size": [32.0] * 5,
    }
    wide = {**known, "gns/b_simple_upper": [400.0] * 5}  # no recommendation
    bare = frame({"bare": {"gns/b_simple": [100.0] * 5}})  # no interval, bound or batch size
    assert _legend(noise_scale_figure(bare)) == ["bare"]
    labels = _legend(noise_scale_figure(frame({"known": known})))
    assert "95% interval" in labels and "batch size (dashed)" in labels
    assert not any("lower bound" in label for label in labels)  # known at every point
    bound = {**known, "gns/b_simple": [math.nan] * 5, "gns/b_simple_upper": [math.nan] * 5}
    assert "lower bound (not yet known)" in _legend(noise_scale_figure(frame({"b": bound})))
    for runs, starred in (({"wide": wide}, False), ({"known": known}, True)):
        curves = _curves_from_summary(summarize(frame(runs)))
        for fig in (efficiency_figure(curves), pareto_figure(curves)):
            assert ("recommended" in _legend(fig)) == starred, runs.keys()
    plain = [Curve("B_noise = 300", 300.0, "C0")]  # no batch size marked
    assert "batch size used" not in _legend(efficiency_figure(plain))


def test_advice_survives_a_summary_read_back_from_csv(tmp_path) -> None:
    values = growing(20)
    df = frame(
        {
            "a": {
                "gns/b_simple": values,
                "gns/b_simple_lower": [v * 0.9 for v in values],
                "gns/b_simple_upper": [v * 1.2 for v in values],
                "gns/batch_size": [16] * 20,
            },
        }
    )
    summary = summarize(df)
    assert summary["note"].tolist() == [""]  # a recommendation: no note
    path = tmp_path / "summary.csv"
    summary.to_csv(path, index=False)
    back = pd.read_csv(path)
    assert advise(back) == advise(summary)
    assert not any("nan" in line for line in advise(back))
