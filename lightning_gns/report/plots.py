"""Plots of logged noise scales: B_simple over training, efficiency and the Pareto frontier.

Sweeps stay readable: at most :data:`MAX_RUNS` runs are drawn (chosen across the range of
late B_simple; the summary table lists every run) and legends sit outside the axes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from lightning_gns import advice
from lightning_gns.report.summary import B_SIMPLE, check_frame, fmt_num, probe_points, series

MAX_RUNS = 8
LOWER = "gns/b_simple_lower"


def _level(summary: pd.DataFrame) -> np.ndarray:
    """Where each run sits on the B_simple axis: B_simple, or its lower bound when unknown."""
    b = summary["b_simple"].to_numpy(dtype=float)
    lower = summary["b_simple_lower"].to_numpy(dtype=float)
    return np.where(np.isfinite(b) & (b > 0), b, lower)


def pick_runs(summary: pd.DataFrame) -> list[str]:
    """Runs to draw: every run with B_simple or a lower bound when few; else MAX_RUNS spread
    over the range of B_simple (the lower bound for runs where it is not yet known)."""
    level = _level(summary)
    usable = summary.assign(_level=level)[np.isfinite(level) & (level > 0)]
    ordered = usable.sort_values("_level", kind="stable")["run"].astype(str).tolist()
    if len(ordered) <= MAX_RUNS:
        return ordered
    idx = np.unique(np.linspace(0, len(ordered) - 1, MAX_RUNS).round().astype(int))
    return [ordered[i] for i in idx]


def _shown_note(ax: Axes, shown: int, total: int) -> None:
    if shown < total:
        ax.set_title(ax.get_title() + f"\n({shown} of {total} runs, across the range of B_simple)")


@dataclass
class Curve:
    """One noise scale to draw theory curves for, with marked batch sizes."""

    label: str
    b_noise: float
    color: str
    current: list[float] = field(default_factory=list)
    recommended: list[float] = field(default_factory=list)
    supported: bool = True  # False: the last interval is too wide to act on (drawn dashed)


def _figure(width: float = 9.5, height: float = 4.8) -> Figure:
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


def _legend_outside(ax: Axes) -> None:
    """The legend to the right of the axes: it never covers curves, however many runs."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _empty_note(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, transform=ax.transAxes)


def _curves_from_summary(summary: pd.DataFrame) -> list[Curve]:
    """Runs with a positive B_simple at their last read-out (a lower bound alone draws no
    efficiency curve), coloured as in the B_simple plot."""
    curves = []
    rows = {str(r.run): r for r in summary.itertuples(index=False)}
    for i, run in enumerate(pick_runs(summary)):
        row = rows[run]
        if not (math.isfinite(row.b_simple) and row.b_simple > 0):
            continue
        curve = Curve(run, float(row.b_simple), f"C{i % 10}")
        if math.isfinite(row.batch_size):
            curve.current.append(float(row.batch_size))
        if math.isfinite(row.recommended_batch_size):
            curve.recommended.append(float(row.recommended_batch_size))
        else:
            curve.supported = False
            curve.label += " (interval too wide: indicative)"
        curves.append(curve)
    return curves


def plot_noise_scale(
    df: pd.DataFrame, path: str | os.PathLike[str], runs: Sequence[str] | None = None
) -> Path:
    """B_simple over steps per run with its logged 95% interval as a band (or ±2 s.e. for older
    logs), the lower bound where B_simple is not yet known (dotted) and the batch size in use
    (dashed); ``runs`` picks which (default: all, capped)."""
    return _save(noise_scale_figure(df, runs), path)


def noise_scale_figure(df: pd.DataFrame, runs: Sequence[str] | None = None) -> Figure:
    """The figure of :func:`plot_noise_scale`."""
    check_frame(df)
    fig = _figure(10.0, 5.0)
    every = [
        r
        for r in sorted(df["run"].astype(str).unique())
        if not (series(df, r, B_SIMPLE).empty and series(df, r, LOWER).empty)
    ]
    chosen = [r for r in (runs if runs is not None else every) if r in every][:MAX_RUNS]
    if not chosen:
        _empty_note(fig, f"no finite {B_SIMPLE} or lower bound logged")
        return fig
    ax = fig.add_subplot()
    lows: list[float] = []
    drawn: set[str] = set()  # what the legend explains: only what is on the axes
    for i, run in enumerate(chosen):
        color = f"C{i % 10}"
        noise = series(df, run, B_SIMPLE)
        steps, values = noise["step"].to_numpy(), noise["value"].to_numpy(dtype=float)
        ax.plot(steps, values, color=color, lw=1.6, label=run if len(values) else f"{run} (bound)")
        band = _band(df, run, noise)
        if not band.empty:
            ax.fill_between(band["step"], band["lo"], band["hi"], color=color, alpha=0.18, lw=0)
            lows.append(float(band["lo"].min()))
            drawn.add("band")
        bound = series(df, run, LOWER)
        only = bound["value"].where(~bound["step"].isin(noise["step"]) & (bound["value"] > 0))
        if only.notna().any():  # not yet known: the lower bound is what the data say
            ax.plot(bound["step"], only, color=color, ls=":", marker="^", ms=3, lw=1)
            lows.append(float(only.min()))
            drawn.add("bound")
        sizes = series(df, run, "gns/batch_size")
        if not sizes.empty:
            ax.step(sizes["step"], sizes["value"], where="post", color=color, ls="--", lw=1.2)
            lows.append(float(sizes["value"].min()))
            drawn.add("batch")
        if len(values):
            lows.append(float(values.min()))
        crit = probe_points(df, run)  # CriticalBatchProbe: B_crit (branched) with its interval
        if not crit.empty:
            v = crit["value"].to_numpy(dtype=float)
            yerr = [v - crit["lo"].to_numpy(dtype=float), crit["hi"].to_numpy(dtype=float) - v]
            ax.errorbar(crit["step"], v, yerr=yerr, fmt="D", color=color, ms=6, capsize=3)
            lows.append(float(crit["lo"].min()))
            drawn.add("crit")
    if lows and min(lows) > 0:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5 * min(lows))
        _plain_ticks(ax, "y")
    if "batch" in drawn:
        ax.plot([], [], color="0.3", ls="--", lw=1.2, label="batch size (dashed)")
    if "band" in drawn:
        ax.fill_between([], [], [], color="0.3", alpha=0.18, lw=0, label="95% interval")
    if "bound" in drawn:
        ax.plot(
            [], [], color="0.3", ls=":", marker="^", ms=3, lw=1, label="lower bound (not yet known)"
        )
    if "crit" in drawn:
        ax.errorbar([], [], yerr=[], fmt="D", color="0.3", ms=6, label="B_crit (branched probe)")
    ax.set_xlabel("step")
    ax.set_ylabel("examples (B_simple and batch size)")
    ax.set_title("Gradient noise scale B_simple = tr(Σ)/|G|² during training")
    _shown_note(ax, len(chosen), len(every))
    ax.grid(True, which="major", alpha=0.3)
    _legend_outside(ax)
    return fig


def _band(df: pd.DataFrame, run: str, noise: pd.DataFrame) -> pd.DataFrame:
    """The logged 95% interval per step (columns step, lo, hi), where both ends are finite
    and positive, whether B_simple is known there or not; ±1.96 s.e. for older logs."""
    lower, upper = series(df, run, LOWER), series(df, run, "gns/b_simple_upper")
    if not lower.empty:
        m = lower.rename(columns={"value": "lo"}).merge(
            upper.rename(columns={"value": "hi"}), on="step", how="inner"
        )
        return m[(m["lo"] > 0) & (m["hi"] > m["lo"])]
    se = series(df, run, "gns/b_simple_se")
    m = noise.merge(se.rename(columns={"value": "se"}), on="step", how="inner")
    lo = (m["value"] - 1.96 * m["se"].abs()).clip(lower=1e-12)
    return pd.DataFrame({"step": m["step"], "lo": lo, "hi": m["value"] + 1.96 * m["se"].abs()})


def _batch_range(curves: Sequence[Curve]) -> tuple[float, float]:
    lo = min(c.b_noise / 64 for c in curves)
    hi = max(c.b_noise * 64 for c in curves)
    for c in curves:
        for b in c.current + c.recommended:
            lo, hi = min(lo, b / 2), max(hi, b * 2)
    return lo, hi


def plot_efficiency_curves(
    curves: Sequence[Curve], path: str | os.PathLike[str], point_label: str = "batch size used"
) -> Path:
    """Write :func:`efficiency_figure` to ``path``."""
    return _save(efficiency_figure(curves, point_label), path)


def efficiency_figure(curves: Sequence[Curve], point_label: str = "batch size used") -> Figure:
    fig = _figure()
    if not curves:
        _empty_note(fig, "no positive noise-scale estimate to plot")
        return fig
    ax = fig.add_subplot()
    lo, hi = _batch_range(curves)
    grid = np.geomspace(lo, hi, 400)
    single = len(curves) == 1
    for c in curves:
        style = {"lw": 2} if c.supported else {"lw": 1.5, "ls": "--", "alpha": 0.7}
        label = c.label
        if not single and len(c.current) == 1:  # in the legend: labels on the axes collide
            b = c.current[0]
            label += f": B={fmt_num(b)}, {100 * advice.efficiency(b, c.b_noise):.0f}%"
        ax.plot(grid, 100 * advice.efficiency(grid, c.b_noise), color=c.color, label=label, **style)
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
            eff = 100 * float(advice.efficiency(b, c.b_noise))
            ax.plot([b], [eff], "o", color=c.color, ms=9, mec="black", zorder=5)
        for b in c.recommended:
            eff = 100 * float(advice.efficiency(b, c.b_noise))
            ax.plot([b], [eff], "*", color="white", mec=c.color, mew=1.5, ms=13, zorder=6)
    if any(c.current for c in curves):
        ax.plot([], [], "o", color="0.5", mec="black", label=point_label)
    _recommended_legend(ax, curves)
    ax.set_xscale("log", base=2)
    _plain_ticks(ax, "x")
    ax.set_ylim(0, 105)
    ax.set_xlabel("batch size B (log scale)")
    ax.set_ylabel("efficiency 4·B·B_noise/(B+B_noise)² [%]")
    ax.set_title("Efficiency versus batch size (peak at B = B_noise)")
    ax.grid(True, which="major", alpha=0.3)
    _legend_outside(ax)
    return fig


def _recommended_legend(ax: Axes, curves: Sequence[Curve]) -> None:
    """The legend's "recommended" star, only where one is drawn."""
    if any(c.recommended for c in curves):
        ax.plot([], [], "*", color="white", mec="0.3", ms=12, label="recommended")


def plot_pareto_curves(
    curves: Sequence[Curve], path: str | os.PathLike[str], point_label: str = "batch size used"
) -> Path:
    """Write :func:`pareto_figure` to ``path``."""
    return _save(pareto_figure(curves, point_label), path)


def pareto_figure(curves: Sequence[Curve], point_label: str = "batch size used") -> Figure:
    fig = _figure(8.4, 5.6)
    if not curves:
        _empty_note(fig, "no positive noise-scale estimate to plot")
        return fig
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
            label = f"{c.label}: {point_label}" if many else f"{c.label}: B={fmt_num(b)}"
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
                    fmt_num(b), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8
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
    _recommended_legend(ax, curves)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_ticks(ax, "xy")
    ax.set_xlabel("examples processed E/E_min (compute)")
    ax.set_ylabel("optimizer steps S/S_min (time)")
    ax.set_title("Steps versus examples: the Pareto frontier")
    ax.grid(True, which="both", alpha=0.25)
    _legend_outside(ax)
    return fig


def plot_efficiency(summary: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Efficiency vs batch size (log x) per run, with each run's operating point marked."""
    return plot_efficiency_curves(_curves_from_summary(summary), path)


def plot_pareto(summary: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """S/S_min vs E/E_min frontier with each run's operating point (and recommendation)."""
    return plot_pareto_curves(_curves_from_summary(summary), path)
