"""read_metrics on real TensorBoard event files and Lightning CSV logs written here."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from lightning_gns.report.logs import COLUMNS, ERROR_TAG, read_logs, read_metrics


def write_tb(folder: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def points(metric: str, df: pd.DataFrame, run: str) -> list[tuple[int, float]]:
    rows = df[(df["run"] == run) & (df["metric"] == metric)]
    return list(zip(rows["step"].tolist(), rows["value"].tolist(), strict=True))


def test_nested_event_folders_are_runs_named_by_relative_path(tmp_path: Path) -> None:
    write_tb(tmp_path / "exp1", {"gns/b_simple": [(0, 10.0), (5, 12.5)], "loss": [(0, 2.0)]})
    write_tb(tmp_path / "exp2" / "seed1", {"gns/b_simple": [(3, 40.0)]})
    df = read_metrics(tmp_path)
    assert list(df.columns) == COLUMNS
    assert sorted(df["run"].unique()) == ["exp1", "exp2/seed1"]
    assert points("gns/b_simple", df, "exp1") == [(0, 10.0), (5, 12.5)]
    assert points("gns/b_simple", df, "exp2/seed1") == [(3, 40.0)]
    assert df["step"].dtype == "int64" and df["value"].dtype == "float64"
    assert df.equals(df.sort_values(["run", "step", "metric"]).reset_index(drop=True))


def test_run_folder_or_single_event_file_is_named_after_the_folder(tmp_path: Path) -> None:
    run = tmp_path / "myrun"
    write_tb(run, {"gns/b_simple": [(1, 3.0), (2, 4.0)]})
    df = read_metrics(run)
    assert set(df["run"]) == {"myrun"} and len(df) == 2
    event_file = next(run.glob("events.out.tfevents.*"))
    df_file = read_metrics(event_file)
    assert set(df_file["run"]) == {"myrun"}
    assert points("gns/b_simple", df_file, "myrun") == [(1, 3.0), (2, 4.0)]


def test_several_event_files_in_one_folder_form_one_run(tmp_path: Path) -> None:
    write_tb(tmp_path / "run", {"gns/b_simple": [(0, 1.0), (1, 2.0)]})
    write_tb(tmp_path / "run", {"gns/b_simple": [(2, 3.0)]})  # a resumed writer
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 2
    df = read_metrics(tmp_path)
    assert points("gns/b_simple", df, "run") == [(0, 1.0), (1, 2.0), (2, 3.0)]


def test_lightning_csv_and_tensorboard_loggers_of_one_run_are_merged(tmp_path: Path) -> None:
    csv = CSVLogger(str(tmp_path), name="csv_exp")
    tb = TensorBoardLogger(str(tmp_path), name="tb_exp", default_hp_metric=False)
    other = TensorBoardLogger(str(tmp_path), name="tb_other", default_hp_metric=False)
    for step in range(4):
        metrics = {"gns/b_simple": 10.0 + step, "gns/batch_size": 32.0}
        if step % 2:
            metrics["train/loss"] = 1.0 / step
        for logger in (csv, tb):
            logger.log_metrics(metrics, step=step)
        other.log_metrics({**metrics, "gns/b_simple": 10.5 + step}, step=step)  # another run
    for logger in (csv, tb, other):
        logger.finalize("success")
    assert (tmp_path / "csv_exp" / "version_0" / "metrics.csv").is_file()

    logs = read_logs(tmp_path)
    twin = "tb_exp/version_0"  # two names: the run is named as TensorBoard shows it
    assert logs.runs == ["tb_exp/version_0", "tb_other/version_0"]
    assert logs.merged == {twin: ["csv_exp/version_0", "tb_exp/version_0"]}
    df = logs.frame
    assert points("gns/b_simple", df, twin) == [(s, 10.0 + s) for s in range(4)]  # not doubled
    assert points("train/loss", df, twin) == [(1, 1.0), (3, pytest.approx(1 / 3))]
    assert points("gns/b_simple", df, "tb_other/version_0") == [(s, 10.5 + s) for s in range(4)]
    assert not df["value"].isna().any()  # the CSV's empty cells are dropped
    assert read_metrics(tmp_path).equals(df)

    one = read_metrics(tmp_path / "csv_exp" / "version_0" / "metrics.csv")
    assert set(one["run"]) == {"version_0"}


def test_two_runs_of_one_seed_in_two_folders_are_not_merged(tmp_path: Path) -> None:
    """A CSV-only run, then a TensorBoard-only run of the same seed (equal values) in another
    folder: two runs, both listed, not one run's two loggers."""
    metrics = [{"gns/b_simple": 10.0 + step, "gns/batch_size": 32.0} for step in range(4)]
    csv = CSVLogger(str(tmp_path), name="csv_only")
    for step, m in enumerate(metrics):
        csv.log_metrics(m, step=step)
    csv.finalize("success")
    written = tmp_path / "csv_only" / "version_0" / "metrics.csv"
    os.utime(written, (time.time() - 60, time.time() - 60))  # a minute before the other run
    tb = TensorBoardLogger(str(tmp_path), name="tb_only", default_hp_metric=False)
    for step, m in enumerate(metrics):
        tb.log_metrics(m, step=step)
    tb.finalize("success")
    logs = read_logs(tmp_path)
    assert logs.runs == ["csv_only/version_0", "tb_only/version_0"]
    assert logs.merged == {}


def test_twins_are_merged_in_the_same_parent_and_two_tensorboard_copies_are_not(
    tmp_path: Path,
) -> None:
    """Lightning's default: TensorBoardLogger and CSVLogger with one name take version_0 and
    version_1. Two TensorBoard folders with equal values are two runs (a repeated seed)."""
    values = {"gns/b_simple": [(5, float("nan")), (10, 1.0 / 3)], "gns/b_simple_lower": []}
    values["gns/b_simple_lower"] = [(5, 0.1), (10, 0.3)]
    write_tb(tmp_path / "lr" / "version_0", values)
    (tmp_path / "lr" / "version_1").mkdir()
    (tmp_path / "lr" / "version_1" / "metrics.csv").write_text(
        "epoch,gns/b_simple,gns/b_simple_lower,step,train/loss\n"
        ",nan,0.1,5,\n0,,,4,0.9\n,0.3333333333333333,0.3,10,\n"
    )
    write_tb(tmp_path / "seed" / "version_0", values)
    write_tb(tmp_path / "seed" / "version_1", values)
    logs = read_logs(tmp_path)
    assert logs.runs == ["lr", "seed/version_0", "seed/version_1"]  # the loggers' one name
    assert logs.merged == {"lr": ["lr/version_0", "lr/version_1"]}
    df = logs.frame
    twin = points("gns/b_simple", df, "lr")
    assert len(twin) == 2 and math.isnan(twin[0][1]) and twin[1] == (10, 1.0 / 3)  # CSV's value
    assert points("train/loss", df, "lr") == [(4, 0.9)]
    write_tb(tmp_path / "lr" / "version_2", {"gns/b_simple": [(5, 2.0)]})  # a third run there
    assert read_logs(tmp_path).runs[0] == "lr/version_0"  # the TensorBoard twin's name


def test_a_run_that_logged_nothing_is_kept_with_its_recorded_error(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "crashed"))
    writer.add_text(ERROR_TAG, "RuntimeError: BatchNorm in train mode", 0)
    writer.close()
    write_tb(tmp_path / "fine", {"gns/b_simple": [(1, 3.0)]})
    logs = read_logs(tmp_path)
    assert logs.runs == ["crashed", "fine"]
    assert set(logs.frame["run"]) == {"fine"}
    assert logs.errors == {"crashed": "RuntimeError: BatchNorm in train mode"}


def test_csv_and_events_in_the_same_folder_do_not_duplicate(tmp_path: Path) -> None:
    run = tmp_path / "both"
    write_tb(run, {"gns/b_simple": [(0, 1.5), (1, 2.5)], "tb_only": [(0, 7.0)]})
    pd.DataFrame({"step": [0, 1], "epoch": [0, 0], "gns/b_simple": [1.5, 2.5]}).to_csv(
        run / "metrics.csv", index=False
    )
    df = read_metrics(tmp_path)
    assert set(df["run"]) == {"both"}
    assert points("gns/b_simple", df, "both") == [(0, 1.5), (1, 2.5)]
    assert points("tb_only", df, "both") == [(0, 7.0)]
    assert points("epoch", df, "both") == [(0, 0.0), (1, 0.0)]


def test_hand_written_metrics_csv_with_nans(tmp_path: Path) -> None:
    """An empty cell is not logged; a logged ``nan`` (B_simple not yet known) is kept."""
    path = tmp_path / "metrics.csv"
    path.write_text(
        "step,epoch,gns/b_simple,val_loss,note\n0,0,5.0,,a\n1,0,,0.5,\n2,1,nan,,b\n3,1,7.0,,\n"
    )
    df = read_metrics(path)
    got = points("gns/b_simple", df, tmp_path.name)
    assert [s for s, _ in got] == [0, 2, 3] and math.isnan(got[1][1])
    assert (got[0][1], got[2][1]) == (5.0, 7.0)
    assert points("val_loss", df, tmp_path.name) == [(1, 0.5)]
    assert "note" not in set(df["metric"])  # text is not a scalar


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing")
    (tmp_path / "empty" / "deep").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no TensorBoard event files or metrics.csv under"):
        read_metrics(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither a TensorBoard event file"):
        read_metrics(tmp_path / "empty" / "notes.txt")
    bad = tmp_path / "bad" / "metrics.csv"
    bad.parent.mkdir()
    bad.write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(ValueError, match="'step' column"):
        read_metrics(bad)


def test_event_folder_without_scalars_gives_an_empty_table(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "r"))
    writer.add_text("note", "no scalars here", 0)
    writer.close()
    df = read_metrics(tmp_path)
    assert df.empty and list(df.columns) == COLUMNS
