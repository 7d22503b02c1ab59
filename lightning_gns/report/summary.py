"""One row per run from logged ``gns/*`` metrics, formatted tables and plain-language advice."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lightning_gns import advice
from lightning_gns.report.logs import COLUMNS, Logs

B_SIMPLE = "gns/b_simple"
LOWER, UPPER, SE = "gns/b_simple_lower", "gns/b_simple_upper", "gns/b_simple_se"
MULTIPLE = "gns/batch_size_multiple"
SUMMARY_COLUMNS = [
    "run",
    "last_step",
    "source",
    "coverage",
    "batch_size",
    "b_simple_early",
    "b_simple",
    "b_simple_lower",
    "b_simple_upper",
    "logged_points",
    "known_points",
    "recommended_batch_size",
    "grow_to_batch_size",
    "batch_size_multiple",
    "efficiency",
    "steps_change_pct",
    "examples_change_pct",
    "note",
]


def series(df: pd.DataFrame, run: str, metric: str) -> pd.DataFrame:
    """Finite (step, value) points of one metric of one run, by step (last value per step)."""
    rows = df[(df["run"] == run) & (df["metric"] == metric)]
    return _finite(rows)


def _finite(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows[np.isfinite(rows["value"].to_numpy(dtype=float))]
    rows = rows.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return rows[["step", "value"]].reset_index(drop=True)


def probe_points(df: pd.DataFrame, run: str) -> pd.DataFrame:
    """CriticalBatchProbe's logged B_crit (branched) of one run: columns step, value, lo, hi."""
    point = series(df, run, "gns/b_crit_branched")
    for name, end in (("lo", "lower"), ("hi", "upper")):
        bound = series(df, run, f"gns/b_crit_branched_{end}").rename(columns={"value": name})
        point = point.merge(bound, on="step", how="left")
        point[name] = point[name].fillna(point["value"])
    return point


def probe_lines(df: pd.DataFrame) -> list[str]:
    """One line per logged B_crit (branched), per run, with the B_simple read at or before it.

    Examples:
        >>> rows = [("a", 10, "gns/b_simple", 90.0), ("a", 20, "gns/b_crit_branched", 128.0),
        ...         ("a", 20, "gns/b_crit_branched_lower", 64.0),
        ...         ("a", 20, "gns/b_crit_branched_upper", 256.0)]
        >>> probe_lines(pd.DataFrame(rows, columns=["run", "step", "metric", "value"]))
        ['a: B_crit (branched, step 20) 128 (64–256), B_simple 90']
    """
    lines = []
    for run in sorted(df.loc[df["metric"] == "gns/b_crit_branched", "run"].astype(str).unique()):
        simple = series(df, run, B_SIMPLE)
        for p in probe_points(df, run).itertuples():
            before = simple[simple["step"] <= p.step]
            said = f", B_simple {fmt_num(before['value'].iloc[-1])}" if len(before) else ""
            lines.append(f"{run}: B_crit (branched, step {int(p.step):,}) {fmt_num(p.value)} "
                         f"({fmt_num(p.lo)}–{fmt_num(p.hi)}){said}")  # fmt: skip
    return lines


def check_frame(df: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"metrics table lacks columns {missing}; pass the output of "
            "lightning_gns.report.logs.read_metrics (columns run, step, metric, value)"
        )


def _last_finite(rows: pd.DataFrame, metric: str) -> float:
    s = _finite(rows[rows["metric"] == metric])
    return float(s["value"].iloc[-1]) if not s.empty else math.nan


def _readout(gns: pd.DataFrame) -> tuple[int, dict[str, float]]:
    """The run's last read-out: its step and every ``gns/*`` value logged there (NaN kept)."""
    step = int(gns["step"].max())
    at = gns[gns["step"] == step].drop_duplicates("metric", keep="last")
    return step, dict(zip(at["metric"].astype(str), at["value"].astype(float), strict=True))


def _source(small: float) -> str:
    if not math.isfinite(small):
        return "n/a"
    return "per-example" if small == 1 else f"micro-batch ({small:g})"


def _interval(at: dict[str, float], b: float) -> tuple[float, float]:
    """The 95% interval logged at the read-out (an unbounded upper end is ``inf``); from
    ±1.96 s.e. for logs that predate the bounds."""
    if LOWER in at:
        lower, upper = at[LOWER], at.get(UPPER, math.nan)
        if not math.isfinite(lower):
            return math.nan, math.nan
        return lower, upper if math.isfinite(upper) else math.inf
    se = at.get(SE, math.nan)
    if math.isfinite(se) and math.isfinite(b):
        return max(b - 1.96 * se, 0.0), b + 1.96 * se
    return math.nan, math.nan


def _multiple(at: dict[str, float]) -> int | None:
    """The callback's ``batch_size_multiple`` at the read-out (logged only when set)."""
    m = at.get(MULTIPLE, math.nan)
    return int(m) if math.isfinite(m) and m >= 1 and float(m).is_integer() else None


def summarize(data: pd.DataFrame | Logs) -> pd.DataFrame:
    """One row per run (columns: ``SUMMARY_COLUMNS``); runs without an estimate are included,
    with the reason in ``note``.

    Every value of a row describes the run's last read-out (``last_step``): B_simple (NaN
    while its interval has no upper end), the 95% interval, the batch size and the advice.
    The advice is what the callback gives for the same values, from the same function
    (:func:`lightning_gns.advice.decide`, with the logged ``gns/batch_size_multiple``): a
    recommended batch size only where the interval is precise; with only a lower bound far
    enough above the batch used, the batch to grow to (``grow_to_batch_size``); nothing
    otherwise, with the reason in ``note``. Efficiency and the change in steps and examples on
    moving to the recommendation follow from B_simple. ``b_simple_early`` is the mean of the
    first 10% of known points.

    ``data`` is ``read_metrics``' table or ``read_logs``' result (which also lists runs that
    logged nothing, with the error they stopped with).

    Raises:
        ValueError: no run logged ``gns/*`` metrics (or recorded an error), or ``data`` lacks
            the columns run, step, metric, value.
    """
    if isinstance(data, Logs):
        df, runs, errors = data.frame, data.runs, data.errors
    else:
        df, runs, errors = data, [], {}
    check_frame(df)
    has_gns = df["metric"].astype(str).str.startswith("gns/")
    if not has_gns.any() and not errors:
        found = sorted(df["metric"].astype(str).unique())
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
        raise ValueError(
            f"no {B_SIMPLE} metric in the logs (found: {shown or 'no metrics'}); "
            "train with the lightning_gns GradientNoiseScale callback to log gns/* metrics"
        )
    groups = {str(k): v for k, v in df.groupby("run", sort=False)}
    names = sorted(set(groups) | set(runs) | set(errors))
    rows = [_row(name, groups.get(name, df.iloc[:0]), errors.get(name, "")) for name in names]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _row(run: str, rows: pd.DataFrame, error: str) -> dict:
    row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS, math.nan)
    row.update(run=run, source="n/a", note="", logged_points=0, known_points=0)
    gns = rows[rows["metric"].astype(str).str.startswith("gns/")]
    if gns.empty:
        if not rows.empty:
            row["last_step"] = int(rows["step"].max())
        what = (
            "it logged no scalar"
            if rows.empty
            else f"no gns/* metric among its {rows['metric'].nunique()} logged metrics"
        )
        stop = f"it stopped with {error}" if error else "it stopped before its first read-out"
        row["note"] = f"{what}; {stop}"
        return row
    step, at = _readout(gns)
    batch = at.get("gns/batch_size", math.nan)
    batch = batch if math.isfinite(batch) else _last_finite(gns, "gns/batch_size")
    known = _finite(gns[gns["metric"] == B_SIMPLE])["value"].to_numpy(dtype=float)
    k = max(1, math.ceil(0.1 * len(known)))
    b = at.get(B_SIMPLE, math.nan)
    lower, upper = _interval(at, b)
    row.update(
        last_step=step,
        source=_source(_last_finite(gns, "gns/small_batch_size")),
        coverage=_last_finite(gns, "gns/coverage"),
        batch_size=batch if batch > 0 else math.nan,
        b_simple_early=float(known[:k].mean()) if len(known) else math.nan,
        b_simple=b,
        b_simple_lower=lower,
        b_simple_upper=upper,
        logged_points=int((gns["metric"] == B_SIMPLE).sum()),
        known_points=len(known),
    )
    row["batch_size_multiple"] = float(_multiple(at) or math.nan)
    a = _decide(row)
    row["recommended_batch_size"] = a.recommended if a.recommended is not None else math.nan
    row["grow_to_batch_size"] = a.grow_to if a.grow_to is not None else math.nan
    if a.kind != "recommend":
        row["note"] = _note(step, a.reason, row["logged_points"], len(known))
        return row
    rec, batch = float(a.size), row["batch_size"]
    row["efficiency"] = a.efficiency
    if math.isfinite(batch):
        row["steps_change_pct"] = 100 * (
            advice.steps_ratio(rec, b) / advice.steps_ratio(batch, b) - 1
        )
        row["examples_change_pct"] = 100 * (
            advice.examples_ratio(rec, b) / advice.examples_ratio(batch, b) - 1
        )
    return row


def _note(step: int, reason: str, logged: int, known: int) -> str:
    """Why the run's last read-out gives no recommendation."""
    if logged == 0:
        return f"no {B_SIMPLE} logged"
    return f"{_unknown(logged, known)}at step {step}, {reason}"


def _unknown(logged: int, known: int) -> str:
    return "" if known else f"B_simple not yet known at any of its {logged} logged points; "


def _decide(row: Any) -> advice.Advice:
    """:func:`lightning_gns.advice.decide` on a row's values (a dict or a table row): what the
    callback decided."""

    def get(key: str) -> float:
        return float(row[key] if isinstance(row, dict) else getattr(row, key))

    multiple = get("batch_size_multiple")
    return advice.decide(
        get("b_simple"),
        get("b_simple_lower"),
        get("b_simple_upper"),
        get("batch_size"),
        int(multiple) if math.isfinite(multiple) else None,
    )


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


def fmt_interval(lower: float, upper: float) -> str:
    """``10.99–22.83``; ``≥ 10.99`` without an upper end; ``n/a`` without an interval."""
    if not math.isfinite(lower):
        return "n/a"
    return f"≥ {fmt_num(lower)}" if math.isinf(upper) else f"{fmt_num(lower)}–{fmt_num(upper)}"


def fmt_change(steps_pct: float, examples_pct: float) -> str:
    """The move to the recommended batch: ``steps -62%, examples +52%``."""
    if not (math.isfinite(steps_pct) and math.isfinite(examples_pct)):
        return "n/a"
    if round(steps_pct) == 0 and round(examples_pct) == 0:
        return "already there"
    return f"steps {steps_pct:+.0f}%, examples {examples_pct:+.0f}%"


def _recommended_cell(rec: float, grow: float) -> str:
    if math.isfinite(rec):
        return fmt_num(rec)
    return f"≥ {fmt_num(grow)}" if math.isfinite(grow) else "n/a"


def _b_simple_cell(b: float, logged: int) -> str:
    if math.isfinite(b):
        return fmt_num(b)
    return "not yet known" if logged else "n/a"


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Human-readable copy of ``summarize``'s table (strings, friendly headers)."""
    return pd.DataFrame(
        {
            "run": summary["run"].astype(str),
            "step": [fmt_num(v) for v in summary["last_step"]],
            "source": summary["source"].astype(str),
            "coverage": [fmt_pct(100 * v) for v in summary["coverage"]],
            "batch size": [fmt_num(v) for v in summary["batch_size"]],
            "B_simple early": [fmt_num(v) for v in summary["b_simple_early"]],
            "B_simple": [
                _b_simple_cell(b, n)
                for b, n in zip(summary["b_simple"], summary["logged_points"], strict=True)
            ],
            "95% interval": [
                fmt_interval(lo, hi)
                for lo, hi in zip(summary["b_simple_lower"], summary["b_simple_upper"], strict=True)
            ],
            "recommended": [
                _recommended_cell(r, g)
                for r, g in zip(
                    summary["recommended_batch_size"], summary["grow_to_batch_size"], strict=True
                )
            ],
            "efficiency": [fmt_pct(100 * v) for v in summary["efficiency"]],
            "at recommended": [
                fmt_change(s, e)
                for s, e in zip(
                    summary["steps_change_pct"], summary["examples_change_pct"], strict=True
                )
            ],
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


_NUMERIC = re.compile(r"[-+≥∞]?\s?[\d.,]*\d[\d.,]*(%|x)?|∞|n/a")


def text_table(table: pd.DataFrame) -> str:
    """A plain-text table whose columns line up: each header over a rule of dashes as wide as
    its column, two spaces between columns, numbers right-aligned and text left-aligned."""
    cols = [str(c) for c in table.columns]
    cells = [[str(v) for v in table[c]] for c in table.columns]
    widths = [max([len(h), *map(len, col)]) for h, col in zip(cols, cells, strict=True)]
    right = [all(_NUMERIC.fullmatch(v) for v in col) and col for col in cells]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rows = [line(cols), line(["-" * w for w in widths])]
    rows += [line([col[i] for col in cells]) for i in range(len(table))]
    return "\n".join(rows)


def advise(summary: pd.DataFrame) -> list[str]:
    """One plain-language line per run of ``summarize``'s table: the sentence of
    :func:`lightning_gns.advice.decide` (what the callback prints for the same values), with
    the change in steps and examples where there is a recommendation."""
    lines = []
    for row in summary.itertuples(index=False):
        head = f"{row.run}: "
        if row.coverage < 0.9:
            head += f"(covers {row.coverage:.0%} of the parameters) "
        note = row.note if isinstance(row.note, str) else ""  # an empty note reads back NaN
        if row.logged_points == 0:
            lines.append(f"{head}no advice: {note or 'no usable estimate'}.")
            continue
        a = _decide(row)
        if a.kind == "recommend":
            lines.append(head + _advice_text(row, a))
        elif a.kind == "grow":
            lines.append(f"{head}{a.sentence()}; no recommendation yet: {note}.")
        else:
            unknown = _unknown(row.logged_points, row.known_points)
            lines.append(f"{head}{unknown}{a.sentence(int(row.last_step))}.")
    return lines


def _advice_text(row: Any, a: advice.Advice) -> str:
    b, batch, rec = a.b_simple, row.batch_size, int(a.size)
    interval = fmt_interval(row.b_simple_lower, row.b_simple_upper)
    text = f"B_simple ≈ {fmt_num(b)} at step {fmt_num(row.last_step)} (95% interval {interval}), "
    text += f"{a.sentence()}."
    steps, examples = row.steps_change_pct, row.examples_change_pct
    if not (math.isfinite(batch) and math.isfinite(steps)) or batch == rec:
        pass  # the sentence said it: the batch used is unknown, or it is the recommendation
    elif batch < rec:
        text += (
            f" Moving from {fmt_num(batch)} to {rec} would need about "
            f"{-steps:.0f}% fewer optimizer steps for {examples:.0f}% more examples."
        )
    else:
        text += (
            f" Moving from {fmt_num(batch)} to {rec} would need about "
            f"{-examples:.0f}% fewer examples (compute) for {steps:.0f}% more optimizer steps."
        )
    early = row.b_simple_early
    if math.isfinite(early) and early > 0 and math.isfinite(b) and b > 1.5 * early:
        text += (
            f" B_simple grew {b / early:.1f}x during training (from {fmt_num(early)}):"
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
