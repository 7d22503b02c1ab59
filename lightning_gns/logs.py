"""Read logged scalars (TensorBoard event files, Lightning ``metrics.csv``) into one table."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["COLUMNS", "find_runs", "read_metrics"]

COLUMNS = ["run", "step", "metric", "value"]
CSV_NAME = "metrics.csv"


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


def _read_events(source: Path) -> pd.DataFrame:
    """Scalars of one event file, or of every event file directly inside a folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(source), size_guidance={"scalars": 0})
    acc.Reload()
    frames = []
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        frames.append(
            pd.DataFrame(
                {
                    "step": np.array([e.step for e in events], dtype="int64"),
                    "metric": tag,
                    "value": np.array([e.value for e in events], dtype="float64"),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else _empty().drop(columns="run")


def _read_csv(path: Path) -> pd.DataFrame:
    """Long-format rows of a Lightning CSVLogger ``metrics.csv`` (one column per metric)."""
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return _empty().drop(columns="run")
    if "step" not in table.columns:
        raise ValueError(f"{path} has no 'step' column; expected a Lightning CSVLogger metrics.csv")
    table = table.dropna(subset=["step"])
    long = table.melt(id_vars=["step"], var_name="metric", value_name="value")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    long = long.dropna(subset=["value"])
    return pd.DataFrame(
        {
            "step": pd.to_numeric(long["step"]).astype("int64").to_numpy(),
            "metric": long["metric"].astype(str).to_numpy(dtype=object),
            "value": long["value"].astype("float64").to_numpy(),
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


def read_metrics(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read every logged scalar under ``path`` into columns run, step, metric, value.

    ``path`` may be a TensorBoard event file, a Lightning ``metrics.csv``, or a folder tree
    holding either (or both). Each folder that directly holds event files or a metrics.csv is
    one run, named by its path relative to ``path`` (the folder's own name when ``path`` is the
    run). Rows are sorted by run, step and metric. Raises ``FileNotFoundError`` for a missing
    path and ``ValueError`` when no logs are found.
    """
    runs = find_runs(path)
    frames = []
    for name, sources in runs.items():
        event_rows = _concat(_read_events(s) for s in sources["events"])
        csv_rows = _concat(_read_csv(c) for c in sources["csv"])
        rows = _merge_sources(event_rows, csv_rows)
        if not rows.empty:
            rows.insert(0, "run", name)
            frames.append(rows)
    if not frames:
        return _empty()
    df = pd.concat(frames, ignore_index=True)[COLUMNS]
    df["run"] = df["run"].astype(object)
    df["metric"] = df["metric"].astype(object)
    df["step"] = df["step"].astype("int64")
    df["value"] = df["value"].astype("float64")
    return df.sort_values(["run", "step", "metric"], kind="stable").reset_index(drop=True)
