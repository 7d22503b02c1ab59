"""One row per run from logged ``gns/*`` metrics, formatted tables and plain-language advice."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lightning_gns import advice
from lightning_gns.logs import COLUMNS

B_SIMPLE = "gns/b_simple"
SUMMARY_COLUMNS = [
    "run",
    "last_step",
    "source",
    "coverage",
    "batch_size",
    "b_simple_early",
    "b_simple_late",
    "b_simple_last",
    "b_simple_lower",
    "b_simple_upper",
    "recommended_batch_size",
    "efficiency",
    "extra_steps_pct",
    "extra_examples_pct",
    "note",
]


def series(df: pd.DataFrame, run: str, metric: str) -> pd.DataFrame:
    """Finite (step, value) points of one metric of one run, by step (last value per step)."""
    rows = df[(df["run"] == run) & (df["metric"] == metric)]
    rows = rows[np.isfinite(rows["value"].to_numpy(dtype=float))]
    rows = rows.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return rows[["step", "value"]].reset_index(drop=True)


def check_frame(df: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"metrics table lacks columns {missing}; pass the output of "
            "lightning_gns.logs.read_metrics (columns run, step, metric, value)"
        )


def _last(df: pd.DataFrame, run: str, metric: str) -> float:
    s = series(df, run, metric)
    return float(s["value"].iloc[-1]) if not s.empty else math.nan


def _source(df: pd.DataFrame, run: str) -> str:
    small = _last(df, run, "gns/small_batch_size")
    if not math.isfinite(small):
        return "n/a"
    return "per-example" if small == 1 else f"micro-batch ({small:g})"


def _interval(df: pd.DataFrame, run: str, late: float) -> tuple[float, float]:
    """The last logged 95% interval; from ±1.96 s.e. for logs that predate the bounds."""
    lower, upper = _last(df, run, "gns/b_simple_lower"), _last(df, run, "gns/b_simple_upper")
    if math.isfinite(lower):
        return lower, upper if math.isfinite(upper) else math.inf
    se = _last(df, run, "gns/b_simple_se")
    if math.isfinite(se) and math.isfinite(late):
        return max(late - 1.96 * se, 0.0), late + 1.96 * se
    return math.nan, math.nan


def _no_estimate_note(df: pd.DataFrame, run: str) -> str:
    logged = df[(df["run"] == run) & (df["metric"] == B_SIMPLE)]
    if logged.empty:
        return f"no {B_SIMPLE} logged"
    lower = _last(df, run, "gns/b_simple_lower")
    bound = f"; B_noise is at least {lower:.4g}" if math.isfinite(lower) and lower > 0 else ""
    return (
        f"no estimate in {len(logged)} logged points: |G|² never significantly above zero "
        f"(the gradient is mostly noise at this batch size){bound}"
    )


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (columns: ``SUMMARY_COLUMNS``), runs without an estimate included with
    the reason in ``note``.

    Early/late B_simple are means of the first/last 10% of logged points (at least one). The
    recommendation, efficiency and extra time/compute use the late value, and only where the
    last interval supports advice (:func:`lightning_gns.advice.supported`).
    Raises ``ValueError`` when no run logged ``gns/*`` metrics.
    """
    check_frame(df)
    runs = sorted(
        df.loc[df["metric"].astype(str).str.startswith("gns/"), "run"].astype(str).unique()
    )
    if not runs:
        found = sorted(df["metric"].astype(str).unique())
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
        raise ValueError(
            f"no {B_SIMPLE} metric in the logs (found: {shown or 'no metrics'}); "
            "train with the lightning_gns GradientNoiseScale callback to log gns/* metrics"
        )
    return pd.DataFrame([_row(df, run) for run in runs], columns=SUMMARY_COLUMNS)


def _row(df: pd.DataFrame, run: str) -> dict:
    noise = series(df, run, B_SIMPLE)
    batch = _last(df, run, "gns/batch_size")
    row = dict.fromkeys(SUMMARY_COLUMNS, math.nan)
    row.update(run=run, source=_source(df, run), coverage=_last(df, run, "gns/coverage"))
    row.update(batch_size=batch if batch > 0 else math.nan, note="")
    if noise.empty:
        row["last_step"] = int(df.loc[df["run"] == run, "step"].max())
        row["note"] = _no_estimate_note(df, run)
        lower = _last(df, run, "gns/b_simple_lower")
        row["b_simple_lower"] = lower if lower > 0 else math.nan
        return row
    values = noise["value"].to_numpy(dtype=float)
    k = max(1, math.ceil(0.1 * len(values)))
    late = float(values[-k:].mean())
    row.update(last_step=int(noise["step"].iloc[-1]), b_simple_last=float(values[-1]))
    row.update(b_simple_early=float(values[:k].mean()), b_simple_late=late)
    lower, upper = _interval(df, run, late)
    row.update(b_simple_lower=lower, b_simple_upper=upper)
    verdict = advice.supported(late, lower, upper)
    if verdict.kind != "estimate":
        row["note"] = (
            f"interval {fmt_num(lower)} to {fmt_num(upper)} too wide to advise "
            f"(more than {advice.MAX_SPREAD:g}x)"
        )
        return row
    row["recommended_batch_size"] = verdict.recommended
    if math.isfinite(row["batch_size"]):
        row["efficiency"] = advice.efficiency(batch, late)
        waste = advice.wasted(batch, late, verdict.recommended)
        row["extra_steps_pct"] = waste["extra_steps_pct"]
        row["extra_examples_pct"] = waste["extra_examples_pct"]
    return row


def fmt_num(x: float) -> str:
    if not isinstance(x, (int, float)) or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞"
    if float(x).is_integer() and abs(x) < 1e7:
        return f"{int(x)}"
    return f"{x:.4g}"


def fmt_pct(x: float, signed: bool = False) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.1f}%" if signed else f"{x:.1f}%"


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Human-readable copy of ``summarize``'s table (strings, friendly headers)."""
    interval = [
        "n/a" if math.isnan(lo) else f"{fmt_num(lo)}–{fmt_num(hi)}"
        for lo, hi in zip(summary["b_simple_lower"], summary["b_simple_upper"], strict=True)
    ]
    return pd.DataFrame(
        {
            "run": summary["run"].astype(str),
            "step": [fmt_num(v) for v in summary["last_step"]],
            "source": summary["source"].astype(str),
            "coverage": [fmt_pct(100 * v) for v in summary["coverage"]],
            "batch size": [fmt_num(v) for v in summary["batch_size"]],
            "B_simple early": [fmt_num(v) for v in summary["b_simple_early"]],
            "B_simple late": [fmt_num(v) for v in summary["b_simple_late"]],
            "95% interval": interval,
            "recommended": [fmt_num(v) for v in summary["recommended_batch_size"]],
            "efficiency": [fmt_pct(100 * v) for v in summary["efficiency"]],
            "extra time": [fmt_pct(v, True) for v in summary["extra_steps_pct"]],
            "extra compute": [fmt_pct(v, True) for v in summary["extra_examples_pct"]],
        }
    )


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Human-readable copy of an ``advice.efficiency_table`` / ``explore`` table."""
    return pd.DataFrame(
        {
            "batch size": [fmt_num(v) for v in table["batch_size"]],
            "steps S/S_min": [f"{v:.3f}" for v in table["steps_ratio"]],
            "examples E/E_min": [f"{v:.3f}" for v in table["examples_ratio"]],
            "time eff.": [fmt_pct(100 * v) for v in table["time_efficiency"]],
            "compute eff.": [fmt_pct(100 * v) for v in table["compute_efficiency"]],
            "efficiency": [fmt_pct(100 * v) for v in table["efficiency"]],
        }
    )


def advise(summary: pd.DataFrame) -> list[str]:
    """One plain-language line per run of ``summarize``'s table: advice where the data support
    it, a lower bound or the reason otherwise."""
    lines = []
    for row in summary.itertuples(index=False):
        head = f"{row.run}: "
        if row.coverage < 0.9:
            head += f"(covers {row.coverage:.0%} of the parameters) "
        late, batch, rec = row.b_simple_late, row.batch_size, row.recommended_batch_size
        if not math.isfinite(rec):
            text = f"no advice: {row.note or 'no usable estimate'}."
            lower = row.b_simple_lower
            if math.isfinite(lower) and lower > 0:
                text += f" B_noise is at least {fmt_num(lower)} (95%)"
                below = math.isfinite(batch) and batch < lower
                text += (
                    f"; batch size {fmt_num(batch)} is below it: a larger batch helps."
                    if below
                    else "."
                )
            lines.append(head + text)
            continue
        lines.append(head + _advice_text(late, batch, int(rec), row.b_simple_early))
    return lines


def _advice_text(late: float, batch: float, rec: int, early: float) -> str:
    text = f"B_simple ≈ {fmt_num(late)} late in training, recommended batch size {rec}. "
    if not math.isfinite(batch):
        text += "The batch size was not logged (gns/batch_size)."
    elif batch != rec:
        steps = advice.steps_ratio(rec, late) / advice.steps_ratio(batch, late)
        examples = advice.examples_ratio(rec, late) / advice.examples_ratio(batch, late)
        if batch < rec:
            text += (
                f"Batch size {fmt_num(batch)} is below it: moving to {rec} would need about "
                f"{100 * (1 - steps):.0f}% fewer optimizer steps for "
                f"{100 * (examples - 1):.0f}% more examples."
            )
        else:
            text += (
                f"Batch size {fmt_num(batch)} is above it: moving to {rec} would save about "
                f"{100 * (1 - examples):.0f}% of the examples (compute) for "
                f"{100 * (steps - 1):.0f}% more steps."
            )
    else:
        text += "The batch size already matches it."
    if math.isfinite(early) and early > 0 and late > 1.5 * early:
        text += (
            f" B_simple grew {late / early:.1f}x during training (from {fmt_num(early)}):"
            " a batch size that grows with it keeps training efficient."
        )
    return text


def _default_batch_sizes(b_noise: float) -> list[int]:
    lo, hi = max(1.0, b_noise / 64), max(1.0, b_noise * 64)
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
