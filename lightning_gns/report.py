"""Turn logged ``gns/*`` metrics into a summary table, plots and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from lightning_gns import advice
from lightning_gns.logs import COLUMNS, read_metrics

__all__ = [
    "SUMMARY_COLUMNS",
    "advise",
    "explore",
    "format_summary",
    "format_table",
    "plot_efficiency",
    "plot_noise_scale",
    "plot_pareto",
    "summarize",
    "write_explore",
    "write_report",
]

B_SIMPLE = "gns/b_simple"
B_SIMPLE_SE = "gns/b_simple_se"
BATCH_SIZE = "gns/batch_size"

SUMMARY_COLUMNS = [
    "run",
    "last_step",
    "batch_size",
    "b_simple_early",
    "b_simple_late",
    "b_simple_last",
    "recommended_batch_size",
    "efficiency",
    "extra_steps_pct",
    "extra_examples_pct",
]

Progress = Callable[[str], None]
PLOT_FILES = {"noise": "noise_scale.png", "efficiency": "efficiency.png", "pareto": "pareto.png"}


# --------------------------------------------------------------------------- summary table


def _series(df: pd.DataFrame, run: str, metric: str) -> pd.DataFrame:
    """Finite (step, value) points of one metric of one run, by step (last value per step)."""
    rows = df[(df["run"] == run) & (df["metric"] == metric)]
    rows = rows[np.isfinite(rows["value"].to_numpy(dtype=float))]
    rows = rows.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return rows[["step", "value"]].reset_index(drop=True)


def _check_frame(df: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"metrics table lacks columns {missing}; pass the output of "
            "lightning_gns.logs.read_metrics (columns run, step, metric, value)"
        )


def _positive_or_nan(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else math.nan


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run that logged ``gns/b_simple`` (columns: ``SUMMARY_COLUMNS``).

    Early/late B_simple are means of the first/last 10% of logged points (at least one);
    the recommendation, efficiency and extra time/compute use the late value as B_noise.
    Raises ``ValueError`` when no run logged ``gns/b_simple``.
    """
    _check_frame(df)
    rows = []
    for run in sorted(df["run"].astype(str).unique()):
        noise = _series(df, run, B_SIMPLE)
        if noise.empty:
            continue
        values = noise["value"].to_numpy(dtype=float)
        k = max(1, math.ceil(0.1 * len(values)))
        early, late, last = float(values[:k].mean()), float(values[-k:].mean()), float(values[-1])
        sizes = _series(df, run, BATCH_SIZE)
        batch = _positive_or_nan(float(sizes["value"].iloc[-1])) if not sizes.empty else math.nan
        row = {
            "run": run,
            "last_step": int(noise["step"].iloc[-1]),
            "batch_size": batch,
            "b_simple_early": early,
            "b_simple_late": late,
            "b_simple_last": last,
            "recommended_batch_size": math.nan,
            "efficiency": math.nan,
            "extra_steps_pct": math.nan,
            "extra_examples_pct": math.nan,
        }
        if math.isfinite(late) and late > 0:
            row["recommended_batch_size"] = advice.optimal_batch_size(late)
            if math.isfinite(batch):
                row["efficiency"] = advice.efficiency(batch, late)
                waste = advice.wasted(batch, late, row["recommended_batch_size"])
                row["extra_steps_pct"] = waste["extra_steps_pct"]
                row["extra_examples_pct"] = waste["extra_examples_pct"]
        rows.append(row)
    if not rows:
        found = sorted(df["metric"].astype(str).unique())
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
        raise ValueError(
            f"no {B_SIMPLE} metric in the logs (found: {shown or 'no metrics'}); "
            "train with the lightning_gns GradientNoiseScale callback to log gns/* metrics"
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _fmt_num(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if float(x).is_integer() and abs(x) < 1e7:
        return f"{int(x)}"
    return f"{x:.4g}"


def _fmt_pct(x: float, signed: bool = False) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.1f}%" if signed else f"{x:.1f}%"


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Human-readable copy of ``summarize``'s table (strings, friendly headers)."""
    return pd.DataFrame(
        {
            "run": summary["run"].astype(str),
            "step": [_fmt_num(v) for v in summary["last_step"]],
            "batch size": [_fmt_num(v) for v in summary["batch_size"]],
            "B_simple early": [_fmt_num(v) for v in summary["b_simple_early"]],
            "B_simple late": [_fmt_num(v) for v in summary["b_simple_late"]],
            "B_simple last": [_fmt_num(v) for v in summary["b_simple_last"]],
            "recommended": [_fmt_num(v) for v in summary["recommended_batch_size"]],
            "efficiency": [_fmt_pct(100 * v) for v in summary["efficiency"]],
            "extra time": [_fmt_pct(v, True) for v in summary["extra_steps_pct"]],
            "extra compute": [_fmt_pct(v, True) for v in summary["extra_examples_pct"]],
        }
    )


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Human-readable copy of an ``advice.efficiency_table`` / ``explore`` table."""
    return pd.DataFrame(
        {
            "batch size": [_fmt_num(v) for v in table["batch_size"]],
            "steps S/S_min": [f"{v:.3f}" for v in table["steps_ratio"]],
            "examples E/E_min": [f"{v:.3f}" for v in table["examples_ratio"]],
            "time eff.": [_fmt_pct(100 * v) for v in table["time_efficiency"]],
            "compute eff.": [_fmt_pct(100 * v) for v in table["compute_efficiency"]],
            "efficiency": [_fmt_pct(100 * v) for v in table["efficiency"]],
        }
    )


def advise(summary: pd.DataFrame) -> list[str]:
    """One plain-language recommendation per run of ``summarize``'s table."""
    lines = []
    for row in summary.itertuples(index=False):
        late, batch, rec = row.b_simple_late, row.batch_size, row.recommended_batch_size
        head = f"{row.run}: "
        if not math.isfinite(rec):
            lines.append(
                head + f"B_simple late in training is {_fmt_num(late)}, not a positive estimate; "
                "log more steps (or more samples per step) before choosing a batch size."
            )
            continue
        text = f"B_simple ≈ {_fmt_num(late)} late in training, recommended batch size {int(rec)}. "
        if not math.isfinite(batch):
            text += f"The batch size was not logged ({BATCH_SIZE})."
        elif batch < rec:
            steps = advice.steps_ratio(rec, late) / advice.steps_ratio(batch, late)
            examples = advice.examples_ratio(rec, late) / advice.examples_ratio(batch, late)
            fewer, more = 100 * (1 - steps), 100 * (examples - 1)
            text += (
                f"Batch size {_fmt_num(batch)} is below it: moving to {int(rec)} would need about "
                f"{fewer:.0f}% fewer optimizer steps for {more:.0f}% more examples."
            )
        elif batch > rec:
            steps = advice.steps_ratio(rec, late) / advice.steps_ratio(batch, late)
            examples = advice.examples_ratio(rec, late) / advice.examples_ratio(batch, late)
            saved, more = 100 * (1 - examples), 100 * (steps - 1)
            text += (
                f"Batch size {_fmt_num(batch)} is above it: moving to {int(rec)} would save about "
                f"{saved:.0f}% of the examples (compute) for {more:.0f}% more steps."
            )
        else:
            text += "The batch size already matches it."
        early = row.b_simple_early
        if math.isfinite(early) and early > 0 and late > 1.5 * early:
            text += (
                f" B_simple grew {late / early:.1f}x during training (from {_fmt_num(early)}):"
                " a batch size that grows with it keeps training efficient."
            )
        lines.append(head + text)
    return lines


# --------------------------------------------------------------------------- plots


@dataclass
class _Curve:
    """One noise scale to draw theory curves for, with marked batch sizes."""

    label: str
    b_noise: float
    color: str
    current: list[float] = field(default_factory=list)
    recommended: list[float] = field(default_factory=list)


def _figure(width: float = 8.0, height: float = 4.8) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _plain_ticks(ax: Axes, axes: str = "xy") -> None:
    """Tick log-scaled axes at powers of two, labelled with plain numbers (``32``)."""
    for name in axes:
        axis = ax.xaxis if name == "x" else ax.yaxis
        axis.set_major_locator(LogLocator(base=2))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _empty_note(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, transform=ax.transAxes)


def _curves_from_summary(summary: pd.DataFrame) -> list[_Curve]:
    curves = []
    for i, row in enumerate(summary.itertuples(index=False)):
        late = row.b_simple_late
        if not (math.isfinite(late) and late > 0):
            continue
        curve = _Curve(str(row.run), float(late), f"C{i % 10}")
        if math.isfinite(row.batch_size):
            curve.current.append(float(row.batch_size))
        if math.isfinite(row.recommended_batch_size):
            curve.recommended.append(float(row.recommended_batch_size))
        curves.append(curve)
    return curves


def plot_noise_scale(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """B_simple over steps per run (±2·se band when ``gns/b_simple_se`` is logged), with the
    batch size in use (``gns/batch_size``) on the same axes; saves a PNG and returns its path."""
    _check_frame(df)
    fig = _figure(9.0, 5.0)
    runs = [r for r in sorted(df["run"].astype(str).unique()) if not _series(df, r, B_SIMPLE).empty]
    if not runs:
        _empty_note(fig, f"no {B_SIMPLE} logged")
        return _save(fig, path)
    ax = fig.add_subplot()
    lines: list[np.ndarray] = []
    drawn = []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        noise = _series(df, run, B_SIMPLE)
        steps, values = noise["step"].to_numpy(), noise["value"].to_numpy(dtype=float)
        se = _series(df, run, B_SIMPLE_SE)
        sizes = _series(df, run, BATCH_SIZE)
        lines.append(values)
        if not sizes.empty:
            lines.append(sizes["value"].to_numpy(dtype=float))
        drawn.append((run, color, steps, values, se, sizes))
    positive = all(np.all(v > 0) for v in lines)
    low = min(float(np.min(v)) for v in lines)
    for run, color, steps, values, se, sizes in drawn:
        ax.plot(steps, values, color=color, lw=1.6, label=f"{run}: B_simple")
        if not se.empty:
            band = pd.merge(pd.DataFrame({"step": steps, "b": values}), se, on="step")
            lo = band["b"] - 2 * band["value"].abs()
            hi = band["b"] + 2 * band["value"].abs()
            if positive:
                lo = lo.clip(lower=0.5 * low)
            ax.fill_between(
                band["step"], lo, hi, color=color, alpha=0.2, lw=0, label=f"{run}: ±2 se"
            )
        if not sizes.empty:
            ax.step(
                sizes["step"],
                sizes["value"],
                where="post",
                color=color,
                ls="--",
                lw=1.4,
                label=f"{run}: batch size",
            )
    if positive:
        ax.set_yscale("log")
        _plain_ticks(ax, "y")
    ax.set_xlabel("step")
    ax.set_ylabel("examples (B_simple and batch size)")
    ax.set_title("Gradient noise scale B_simple = tr(Σ)/|G|² during training")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _batch_range(curves: Sequence[_Curve]) -> tuple[float, float]:
    lo = min(c.b_noise / 64 for c in curves)
    hi = max(c.b_noise * 64 for c in curves)
    for c in curves:
        for b in c.current + c.recommended:
            lo, hi = min(lo, b / 2), max(hi, b * 2)
    return lo, hi


def _plot_efficiency_curves(
    curves: Sequence[_Curve], path: str | os.PathLike[str], point_label: str = "batch size used"
) -> Path:
    fig = _figure()
    if not curves:
        _empty_note(fig, "no positive noise-scale estimate to plot")
        return _save(fig, path)
    ax = fig.add_subplot()
    lo, hi = _batch_range(curves)
    grid = np.geomspace(lo, hi, 400)
    single = len(curves) == 1
    for c in curves:
        ax.plot(grid, 100 * advice.efficiency(grid, c.b_noise), color=c.color, lw=2, label=c.label)
        if single:
            ax.plot(
                grid, 100 * advice.time_efficiency(grid, c.b_noise), color="0.35", ls="--", lw=1
            )
            ax.plot(
                grid, 100 * advice.compute_efficiency(grid, c.b_noise), color="0.35", ls=":", lw=1
            )
            ax.text(hi, 97, "time efficiency S_min/S ", ha="right", va="top", fontsize=8)
            ax.text(lo, 97, " compute efficiency E_min/E", ha="left", va="top", fontsize=8)
        ax.axvline(c.b_noise, color=c.color, lw=0.8, alpha=0.5)
        for b in c.current:
            eff = 100 * advice.efficiency(b, c.b_noise)
            ax.plot([b], [eff], "o", color=c.color, ms=9, mec="black", zorder=5)
            ax.annotate(
                f"B={_fmt_num(b)}: {eff:.0f}%",
                (b, eff),
                xytext=(6, -14),
                textcoords="offset points",
                fontsize=8,
            )
        for b in c.recommended:
            eff = 100 * advice.efficiency(b, c.b_noise)
            ax.plot([b], [eff], "*", color="white", mec=c.color, mew=1.5, ms=13, zorder=6)
    ax.plot([], [], "o", color="0.5", mec="black", label=point_label)
    ax.plot([], [], "*", color="white", mec="0.3", ms=12, label="recommended")
    ax.set_xscale("log", base=2)
    _plain_ticks(ax, "x")
    ax.set_ylim(0, 105)
    ax.set_xlabel("batch size B (log scale)")
    ax.set_ylabel("efficiency 4·B·B_noise/(B+B_noise)² [%]")
    ax.set_title("Efficiency versus batch size (peak at B = B_noise)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return _save(fig, path)


def _plot_pareto_curves(
    curves: Sequence[_Curve], path: str | os.PathLike[str], point_label: str = "batch size used"
) -> Path:
    fig = _figure(6.4, 5.6)
    if not curves:
        _empty_note(fig, "no positive noise-scale estimate to plot")
        return _save(fig, path)
    ax = fig.add_subplot()
    ratios = [b / c.b_noise for c in curves for b in c.current + c.recommended]
    r_lo = min([1 / 64, *[r / 2 for r in ratios]])
    r_hi = max([64.0, *[r * 2 for r in ratios]])
    r = np.geomspace(r_lo, r_hi, 400)
    ax.plot(1 + r, 1 + 1 / r, color="black", lw=2, label="(S/S_min − 1)(E/E_min − 1) = 1")
    ax.plot([2], [2], "s", color="0.4", ms=7, zorder=4, label="B = B_noise (2x steps, 2x examples)")
    for c in curves:
        many = len(c.current) > 1
        for i, b in enumerate(c.current):
            x, y = 1 + b / c.b_noise, 1 + c.b_noise / b
            label = f"{c.label}: {point_label}" if many else f"{c.label}: B={_fmt_num(b)}"
            ax.plot(
                [x],
                [y],
                "o",
                color=c.color,
                mec="black",
                ms=9,
                zorder=5,
                label=label if i == 0 else None,
            )
            if many:
                ax.annotate(
                    _fmt_num(b), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8
                )
        for b in c.recommended:
            ax.plot(
                [1 + b / c.b_noise],
                [1 + c.b_noise / b],
                "*",
                color="white",
                mec=c.color,
                mew=1.5,
                ms=13,
                zorder=6,
            )
    ax.plot([], [], "*", color="white", mec="0.3", ms=12, label="recommended")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_ticks(ax, "xy")
    ax.set_xlabel("examples processed E/E_min (compute)")
    ax.set_ylabel("optimizer steps S/S_min (time)")
    ax.set_title("Steps versus examples: the Pareto frontier")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_efficiency(summary: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Efficiency vs batch size (log x) per run, with each run's operating point marked."""
    return _plot_efficiency_curves(_curves_from_summary(summary), path)


def plot_pareto(summary: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """S/S_min vs E/E_min frontier with each run's operating point (and recommendation)."""
    return _plot_pareto_curves(_curves_from_summary(summary), path)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#1d2330;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #d8dce3;padding-bottom:.2rem}
.meta{color:#5b6472;font-size:.9rem}
table.data{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
table.data th,table.data td{border:1px solid #d8dce3;padding:.3rem .6rem;text-align:right}
table.data th{background:#f2f4f7}table.data td:first-child{text-align:left}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #e3e6eb}
figcaption{color:#5b6472;font-size:.85rem}
ul.advice li{margin:.3rem 0}code{background:#f2f4f7;padding:0 .2rem}
"""

_ONLOAD = (
    "window.addEventListener('load',function(){var n=0,im=document.images;"
    "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){n++;}}"
    "document.body.setAttribute('data-loaded',String(n));});"
)

_THEORY = """
<p>The simple gradient noise scale <code>B_simple = tr(Σ)/|G|²</code> compares the per-example
gradient variance with the squared true gradient (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", arXiv 1812.06162). It estimates the critical batch size
<code>B_crit ≈ B_noise</code>.</p>
<ul>
<li>Steps to a given loss: <code>S/S_min = 1 + B_noise/B</code>; examples:
<code>E/E_min = 1 + B/B_noise</code>; so <code>(S/S_min − 1)(E/E_min − 1) = 1</code>.</li>
<li>Time efficiency <code>S_min/S = B/(B + B_noise)</code>, compute efficiency
<code>E_min/E = B_noise/(B + B_noise)</code>; both are 50% at <code>B = B_noise</code>.</li>
<li>Efficiency (this report) <code>= 4·B·B_noise/(B + B_noise)²</code>: 100% at
<code>B = B_noise</code>.</li>
<li>Below B_noise, larger batches cut steps almost for free; above it, they mostly cost compute.
B_noise usually grows as the loss falls.</li>
<li>When changing the batch size of an SGD run, keep the temperature <code>η/B</code> fixed
(scale the learning rate with the batch size).</li>
</ul>
"""


def _img(path: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table_html(table: pd.DataFrame) -> str:
    return table.to_html(index=False, escape=True, classes="data", border=0)


def _page(title: str, body: str, n_images: int) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f'<body data-images="{n_images}" data-loaded="0">\n<h1>{html.escape(title)}</h1>\n'
        f"{body}\n<script>{_ONLOAD}</script>\n</body>\n</html>\n"
    )


def _options_table(b_noise: float, current: float) -> pd.DataFrame:
    """Batch sizes around the recommendation (powers of two) plus the one in use."""
    rec = advice.optimal_batch_size(b_noise)
    sizes = {rec * 2.0**k for k in range(-4, 5) if rec * 2.0**k >= 1}
    if math.isfinite(current):
        sizes.add(float(current))
    return format_table(advice.efficiency_table(b_noise, sorted(sizes)))


def write_report(
    path_or_df: str | os.PathLike[str] | pd.DataFrame,
    out_dir: str | os.PathLike[str],
    progress: Progress | None = None,
    source: str | None = None,
) -> Path:
    """Write the three PNG plots and one self-contained ``report.html``; return its path.

    ``path_or_df`` is a log path for ``read_metrics`` or a table it returned. ``progress``
    (optional) receives one short message per stage; ``source`` names the logs in the page.
    """
    say = progress or (lambda _msg: None)
    if isinstance(path_or_df, pd.DataFrame):
        df, source = path_or_df, source or "metrics table"
    else:
        say(f"reading logs under {path_or_df} ...")
        df, source = read_metrics(path_or_df), source or str(path_or_df)
    summary = summarize(df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"summarized {len(summary)} run(s)")
    say(f"plotting B_simple over training -> {out / PLOT_FILES['noise']}")
    noise_png = plot_noise_scale(df, out / PLOT_FILES["noise"])
    say(f"plotting efficiency vs batch size -> {out / PLOT_FILES['efficiency']}")
    eff_png = plot_efficiency(summary, out / PLOT_FILES["efficiency"])
    say(f"plotting steps/examples Pareto frontier -> {out / PLOT_FILES['pareto']}")
    pareto_png = plot_pareto(summary, out / PLOT_FILES["pareto"])

    parts = [
        f'<p class="meta">Source: {html.escape(source)} · {len(summary)} run(s) with '
        f"<code>{B_SIMPLE}</code>.</p>",
        "<h2>Summary</h2>",
        _table_html(format_summary(summary)),
        '<p class="meta">Early/late: mean of the first/last 10% of logged points. '
        "Recommended: late B_simple rounded to a power of two. Extra time/compute: "
        "steps/examples needed at the batch size used, relative to the recommended one "
        "(negative = saving).</p>",
        '<ul class="advice">' + "".join(f"<li>{html.escape(s)}</li>" for s in advise(summary)),
        "</ul>",
        "<h2>Noise scale during training</h2>",
        _img(
            noise_png,
            "B_simple over training steps",
            "B_simple per logged step (band: ±2 standard errors when logged) and the batch "
            "size used (dashed).",
        ),
        "<h2>Efficiency of batch sizes</h2>",
        _img(
            eff_png,
            "Efficiency versus batch size",
            "Predicted efficiency 4·B·B_noise/(B+B_noise)² using each run's late B_simple; "
            "circles: batch size used, stars: recommendation.",
        ),
        "<h2>Time versus compute</h2>",
        _img(
            pareto_png,
            "Steps versus examples Pareto frontier",
            "Every batch size lies on the same normalized frontier; where a run sits shows "
            "whether it spends extra time (up) or extra compute (right).",
        ),
        "<h2>Batch-size options</h2>",
    ]
    for row in summary.itertuples(index=False):
        if not math.isfinite(row.recommended_batch_size):
            continue
        parts.append(
            f"<h3>{html.escape(str(row.run))} (B_noise ≈ {_fmt_num(row.b_simple_late)})</h3>"
        )
        parts.append(_table_html(_options_table(row.b_simple_late, row.batch_size)))
    parts += ["<h2>How to read this</h2>", _THEORY]
    page = out / "report.html"
    page.write_text(_page("Gradient noise scale report", "\n".join(parts), 3), encoding="utf-8")
    say(f"wrote {page}")
    return page


# --------------------------------------------------------------------------- calculator


def _default_batch_sizes(b_noise: float) -> list[int]:
    lo = max(1.0, b_noise / 64)
    hi = max(1.0, b_noise * 64)
    first, last = math.ceil(math.log2(lo) - 1e-9), math.floor(math.log2(hi) + 1e-9)
    return [2**k for k in range(first, max(first, last) + 1)]


def explore(b_noise: float, batch_sizes: Sequence[float] | None = None) -> pd.DataFrame:
    """Efficiency table for a noise scale (``advice.efficiency_table``).

    Default batch sizes: powers of two from ``max(1, B_noise/64)`` to ``64·B_noise``.
    """
    try:
        value = float(b_noise)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"noise scale must be a positive finite number, got {b_noise!r}")
    sizes = _default_batch_sizes(value) if batch_sizes is None else list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes is empty; pass at least one positive batch size")
    return advice.efficiency_table(value, sizes)


def write_explore(
    b_noise: float,
    batch_sizes: Sequence[float] | None,
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write the efficiency and Pareto plots for ``b_noise`` and an ``explore.html``."""
    table = explore(b_noise, batch_sizes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = advice.optimal_batch_size(b_noise)
    curve = _Curve(f"B_noise = {_fmt_num(b_noise)}", float(b_noise), "C0")
    curve.current = [float(b) for b in table["batch_size"]]
    curve.recommended = [float(rec)]
    label = "batch sizes in the table"
    eff_png = _plot_efficiency_curves([curve], out / PLOT_FILES["efficiency"], label)
    pareto_png = _plot_pareto_curves([curve], out / PLOT_FILES["pareto"], label)
    body = "\n".join(
        [
            f'<p class="meta">Noise scale B_noise = {_fmt_num(b_noise)}; recommended batch '
            f"size {rec}.</p>",
            _table_html(format_table(table)),
            _img(eff_png, "Efficiency versus batch size", "Circles: the batch sizes above."),
            _img(pareto_png, "Steps versus examples", "Each batch size's place on the frontier."),
            "<h2>How to read this</h2>",
            _THEORY,
        ]
    )
    page = out / "explore.html"
    page.write_text(_page("Batch-size calculator", body, 2), encoding="utf-8")
    return page
