"""Read logged scalars (TensorBoard event files, Lightning ``metrics.csv``) into one table.

A run logged to TensorBoard and to CSV at once (two folders, e.g. ``version_0`` and
``version_1``) is read as one run: :func:`read_logs` merges folders whose ``gns/*`` values
agree point for point.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lightning_gns.publish import ERROR_TAG

__all__ = ["COLUMNS", "ERROR_TAG", "Logs", "find_runs", "read_logs", "read_metrics"]

COLUMNS = ["run", "step", "metric", "value"]
CSV_NAME = "metrics.csv"
_NAN_TEXT = {"nan", "-nan", "+nan"}


@dataclass
class Logs:
    """What :func:`read_logs` found under a path.

    Attributes:
        frame: every logged scalar, columns ``run, step, metric, value`` (NaN where a logger
            logged NaN, e.g. ``gns/b_simple`` while not yet known).
        runs: every run found, in order, including runs that logged no scalar at all.
        folders: per run, the folders (or files) it was read from; two for a run logged to
            TensorBoard and CSV at once.
        errors: per run, the error it stopped with, where one was recorded.
    """

    frame: pd.DataFrame
    runs: list[str] = field(default_factory=list)
    folders: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def merged(self) -> dict[str, list[str]]:
        """Runs read from more than one folder (TensorBoard and CSV twins)."""
        return {run: where for run, where in self.folders.items() if len(where) > 1}


def _is_event_file(path: Path) -> bool:
    return "tfevents" in path.name and path.is_file()


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run": pd.Series([], dtype=object),
            "step": pd.Series([], dtype="int64"),
            "metric": pd.Series([], dtype=object),
            "value": pd.Series([], dtype="float64"),
        }
    )


def _run_name(folder: Path, root: Path) -> str:
    """Name a run by its folder relative to ``root`` (or the folder's own name at the root)."""
    try:
        rel = folder.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(folder.name)
    return rel.as_posix() if rel.parts else (folder.resolve().name or str(folder))


def find_runs(path: str | os.PathLike[str]) -> dict[str, dict[str, list[Path]]]:
    """Map run name -> {"events": [folder], "csv": [metrics.csv files]} found under ``path``."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {root}")
    runs: dict[str, dict[str, list[Path]]] = {}
    base = root.parent if root.is_file() else root

    def add(folder: Path, kind: str, item: Path) -> None:
        entry = runs.setdefault(_run_name(folder, base), {"events": [], "csv": []})
        if item not in entry[kind]:
            entry[kind].append(item)

    if root.is_file():
        if _is_event_file(root):
            add(root.parent, "events", root)
        elif root.suffix.lower() == ".csv":
            add(root.parent, "csv", root)
        else:
            raise ValueError(
                f"{root} is neither a TensorBoard event file (events.out.tfevents.*) nor a "
                "metrics.csv; pass a log file or the folder that contains the logs"
            )
        return runs

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        if any("tfevents" in f for f in filenames):
            add(folder, "events", folder)
        if CSV_NAME in filenames:
            add(folder, "csv", folder / CSV_NAME)
    if not runs:
        raise ValueError(f"no TensorBoard event files or {CSV_NAME} under {root}")
    return runs


def _read_events(source: Path) -> tuple[pd.DataFrame, str, list[float]]:
    """Scalars of one event file, or of every event file directly inside a folder, the
    last recorded error text (``gns/error``), if any, and the scalars' wall times."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(source), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    frames, times = [], []
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        times += [e.wall_time for e in events]
        frames.append(
            pd.DataFrame(
                {
                    "step": np.array([e.step for e in events], dtype="int64"),
                    "metric": tag,
                    "value": np.array([e.value for e in events], dtype="float64"),
                }
            )
        )
    error = ""
    for tag in acc.Tags().get("tensors", []):
        if tag.split("/text_summary")[0] == ERROR_TAG:
            texts = acc.Tensors(tag)[-1].tensor_proto.string_val
            error = b" ".join(texts).decode("utf-8", "replace") if texts else ""
    rows = pd.concat(frames, ignore_index=True) if frames else _empty().drop(columns="run")
    return rows, error, times


def _read_csv(path: Path) -> pd.DataFrame:
    """Long-format rows of a Lightning CSVLogger ``metrics.csv`` (one column per metric).

    An empty cell is a metric not logged at that step and is dropped; a logged ``nan`` is
    kept as NaN (``gns/b_simple`` while not yet known)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return _empty().drop(columns="run")
    if "step" not in table.columns:
        raise ValueError(f"{path} has no 'step' column; expected a Lightning CSVLogger metrics.csv")
    table["step"] = pd.to_numeric(table["step"], errors="coerce")
    table = table.dropna(subset=["step"])
    long = table.melt(id_vars=["step"], var_name="metric", value_name="text")
    text = long["text"].astype(str).str.strip()
    value = pd.to_numeric(text, errors="coerce")
    keep = value.notna() | text.str.lower().isin(_NAN_TEXT)
    long, value = long[keep], value[keep]
    return pd.DataFrame(
        {
            "step": long["step"].astype("int64").to_numpy(),
            "metric": long["metric"].astype(str).to_numpy(dtype=object),
            "value": value.astype("float64").to_numpy(),
        }
    )


def _merge_sources(event_rows: pd.DataFrame, csv_rows: pd.DataFrame) -> pd.DataFrame:
    """Combine one run's sources; where both logged (step, metric), keep the CSV value."""
    if csv_rows.empty:
        return event_rows
    if event_rows.empty:
        return csv_rows
    seen = pd.MultiIndex.from_frame(csv_rows[["step", "metric"]])
    keys = pd.MultiIndex.from_frame(event_rows[["step", "metric"]])
    return pd.concat([event_rows[~keys.isin(seen)], csv_rows], ignore_index=True)


def _concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _gns_points(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return rows
    gns = rows[rows["metric"].astype(str).str.startswith("gns/")]
    gns = gns.drop_duplicates(["metric", "step"], keep="last")
    return gns.sort_values(["metric", "step"], kind="stable").reset_index(drop=True)


def same_run(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two runs' rows are one run logged twice: the same ``gns/*`` points, values
    equal to float32 precision (TensorBoard stores float32; NaN matches NaN)."""
    pa, pb = _gns_points(a), _gns_points(b)
    if pa.empty or len(pa) != len(pb):
        return False
    if not (pa["metric"].equals(pb["metric"]) and pa["step"].equals(pb["step"])):
        return False
    va, vb = pa["value"].to_numpy(dtype=float), pb["value"].to_numpy(dtype=float)
    return bool(np.allclose(va, vb, rtol=1e-6, atol=0.0, equal_nan=True))


_VERSION = re.compile(r"version_\d+")


def _twin_name(events: str, csv: str, names: list[str]) -> str:
    """A readable name for a TensorBoard and CSV twin: the parent both loggers wrote under
    (``gpt2_b8`` for ``gpt2_b8/version_0`` and ``gpt2_b8/version_1``, Lightning's default)
    when only their version folders differ and no other run lives there; else the
    TensorBoard run's own name, as TensorBoard shows it."""
    head_e, _, tail_e = events.rpartition("/")
    head_c, _, tail_c = csv.rpartition("/")
    if head_e and head_e == head_c and _VERSION.fullmatch(tail_e) and _VERSION.fullmatch(tail_c):
        others = [n for n in names if n not in (events, csv)]
        if not any(n == head_e or n.startswith(head_e + "/") for n in others):
            return head_e
    return events


@dataclass
class _Run:
    name: str
    rows: pd.DataFrame
    kind: str  # "events", "csv" or "both"
    folders: list[str]
    error: str = ""
    written: tuple[float, float] = (math.nan, math.nan)  # first and last write (Unix time)


# A CSV finalized this long after the last TensorBoard scalar was still written by that run.
_TWIN_SLACK_S = 10.0


def _together(events: _Run, csv: _Run) -> bool:
    """Whether a TensorBoard and a CSV folder can be one run's two loggers: in one parent
    folder (Lightning's ``version_0`` and ``version_1``), or else with the CSV written while
    the TensorBoard run logged (two runs of one seed, one after the other, are two runs)."""
    if events.name.rpartition("/")[0] == csv.name.rpartition("/")[0]:
        return True
    first, last = events.written
    return first <= csv.written[1] <= last + _TWIN_SLACK_S


def _merge_twins(runs: list[_Run]) -> list[_Run]:
    """Merge each events-only run with the csv-only run that logged the same gns/* points."""
    out: list[_Run] = []
    used: set[int] = set()
    for i, run in enumerate(runs):
        if i in used:
            continue
        for j in range(i + 1, len(runs)):
            other = runs[j]
            if j in used or {run.kind, other.kind} != {"events", "csv"}:
                continue
            events, csv = (run, other) if run.kind == "events" else (other, run)
            if same_run(events.rows, csv.rows) and _together(events, csv):
                used.add(j)
                run = _Run(
                    _twin_name(events.name, csv.name, [r.name for r in runs]),
                    _merge_sources(events.rows, csv.rows),
                    "both",
                    run.folders + other.folders,
                    run.error or other.error,
                )
                break
        out.append(run)
    return out


def read_logs(path: str | os.PathLike[str]) -> Logs:
    """Read every run under ``path``: scalars, the folders each came from, recorded errors.

    Like :func:`read_metrics`, and besides: runs that logged no scalar (a run that stopped at
    fit start) are kept in ``runs``, a run logged to TensorBoard and CSV in two folders is one
    run (named by the parent of Lightning's two version folders, ``gpt2_b8``, or else by its
    TensorBoard folder; ``Logs.folders`` lists both), and the error a run stopped with is read
    from the TensorBoard text ``gns/error``.
    """
    found = find_runs(path)
    runs: list[_Run] = []
    for name, sources in found.items():
        events = [_read_events(s) for s in sources["events"]]
        event_rows = _concat(rows for rows, _, _ in events)
        csv_rows = _concat(_read_csv(c) for c in sources["csv"])
        times = [t for _, _, ts in events for t in ts] or [
            os.path.getmtime(c) for c in sources["csv"]
        ]
        kinds = [k for k in ("events", "csv") if sources[k]]
        kind = kinds[0] if len(kinds) == 1 else "both"
        error = next((e for _, e, _ in reversed(events) if e), "")
        rows = _merge_sources(event_rows, csv_rows)
        written = (min(times), max(times)) if times else (math.nan, math.nan)
        runs.append(_Run(name, rows, kind, [name], error, written))
    runs = _merge_twins(runs)
    frames = []
    for run in runs:
        if not run.rows.empty:
            rows = run.rows.copy()
            rows.insert(0, "run", run.name)
            frames.append(rows)
    if frames:
        df = pd.concat(frames, ignore_index=True)[COLUMNS]
        df["run"] = df["run"].astype(object)
        df["metric"] = df["metric"].astype(object)
        df["step"] = df["step"].astype("int64")
        df["value"] = df["value"].astype("float64")
        df = df.sort_values(["run", "step", "metric"], kind="stable").reset_index(drop=True)
    else:
        df = _empty()
    return Logs(
        frame=df,
        runs=[r.name for r in runs],
        folders={r.name: r.folders for r in runs},
        errors={r.name: r.error for r in runs if r.error},
    )


def read_metrics(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read every logged scalar under ``path`` into columns run, step, metric, value.

    ``path`` may be a TensorBoard event file, a Lightning ``metrics.csv``, or a folder tree
    holding either (or both). Each folder that directly holds event files or a metrics.csv is
    one run, named by its path relative to ``path`` (the folder's own name when ``path`` is the
    run); a run logged to TensorBoard and CSV at once is one run (see :func:`read_logs`).
    Values a logger logged as NaN stay NaN. Rows are sorted by run, step and metric.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no logs under ``path``, or a CSV without a ``step`` column.

    Examples:
        >>> import pathlib, tempfile
        >>> from lightning_gns import read_metrics
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = log.write_text("step,epoch,gns/b_simple,train/loss\\n9,0,,0.7\\n"
        ...                    "10,0,nan,\\n20,1,41.5,\\n")
        >>> read_metrics(log)[["step", "metric", "value"]]
           step        metric  value
        0     9         epoch    0.0
        1     9    train/loss    0.7
        2    10         epoch    0.0
        3    10  gns/b_simple    NaN
        4    20         epoch    1.0
        5    20  gns/b_simple   41.5
    """
    return read_logs(path).frame
