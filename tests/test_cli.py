"""The lightning-gns command line: output, files written and one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_gns.report.cli import main


def write_run(folder: Path, with_gns: bool = True) -> None:
    writer = SummaryWriter(str(folder))
    for step in range(0, 50, 5):
        if with_gns:
            writer.add_scalar("gns/b_simple", 40.0 + step, step)
            writer.add_scalar("gns/batch_size", 16, step)
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.close()


def assert_aligned(lines: list[str]) -> None:
    """A header, a rule of dashes per column, rows: every header and cell sits inside its
    column's dashes, and the gaps between columns are blank on every line."""
    header, rule, *rows = lines
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    assert len(spans) > 2 and rows
    for line in [header, *rows]:
        padded = line.ljust(spans[-1][1])
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert padded[end:start].strip() == "", (line, end, start)
        assert len(line) <= spans[-1][1], line
    names = [header[a:b].strip() for a, b in spans]
    assert all(names) and len(names) == len(spans)  # a header holding spaces is one column


def _spans(rule: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]


def test_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "logs" / "exp")
    out_dir = tmp_path / "out"
    assert main(["report", str(tmp_path / "logs"), "--out", str(out_dir)]) == 0
    captured = capsys.readouterr()
    assert "B_simple early" in captured.out and "95% interval" in captured.out
    assert "exp" in captured.out
    table = captured.out.splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("run "))
    assert_aligned(table[start : start + 3])
    names = [table[start][a:b].strip() for a, b in _spans(table[start + 1])]
    assert "B_simple early" in names and "at recommended" in names and "95% interval" in names
    assert captured.out.strip().splitlines()[-1] == str(out_dir / "report.html")
    assert "reading 1 log folder(s)" in captured.err and "found 1 run(s)" in captured.err
    assert "summarized 1 run(s)" in captured.err and "plotting" in captured.err
    for name in ("report.html", "noise_scale.png", "efficiency.png", "pareto.png"):
        assert (out_dir / name).is_file()


def test_report_default_out_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "logs")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "logs"]) == 0
    assert (tmp_path / "reports" / "report.html").is_file()
    capsys.readouterr()


def test_explore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", "--noise-scale", "16.07", "--batch-sizes", "8", "16", "64"]) == 0
    out = capsys.readouterr().out
    assert "recommended batch size: 16" in out
    lines = out.strip().splitlines()
    assert "time eff." in lines[1] and "compute eff." in lines[1]
    assert len(lines) == 3 + 3 and "100.0%" in lines[4]  # title, header, rule, 3 rows
    assert_aligned(lines[1:])
    assert not (tmp_path / "x").exists()
    assert main(["explore", "-n", "100", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "explore.html").is_file()
    assert (tmp_path / "x" / "efficiency.png").is_file()


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "choose a command"),
        (["frobnicate"], "invalid choice"),
        (["report"], "PATH"),
        (["report", "{missing}"], "no such file or directory"),
        (["report", "{empty}"], "no TensorBoard event files or metrics.csv"),
        (["report", "{nogns}"], "no gns/* metrics"),
        (["explore"], "--noise-scale"),
        (["explore", "--noise-scale", "abc"], "not a number"),
        (["explore", "--noise-scale", "0"], "positive"),
        (["explore", "--noise-scale", "inf"], "positive"),
        (["explore", "-n", "nan"], "positive"),
        (["explore", "-n", "10", "--batch-sizes", "0"], "positive whole number"),
        (["explore", "-n", "10", "--batch-sizes", "8.5"], "not a whole number"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "nogns", with_gns=False)
    paths = {k: str(tmp_path / k) for k in ("missing", "empty", "nogns")}
    argv = [a.format(**paths) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("lightning-gns: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], captured.err  # progress may precede it
    assert needle in errors[0]
    assert all(line.startswith(("reading ", "found ")) for line in lines[:-1]), captured.err
    assert "Traceback" not in captured.err + captured.out


def test_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "report" in capsys.readouterr().out


@pytest.mark.slow  # make test-fast leaves it out (a real fit or subprocess)
def test_module_entry_point_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_gns.report.cli", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"lightning-gns: error: no such file or directory: {tmp_path / 'nope'}"
    ]


@pytest.mark.slow
def test_without_the_report_extra_training_works_and_the_report_says_what_to_install(
    tmp_path: Path,
) -> None:
    """pandas and matplotlib are the [report] extra: the callback imports neither, and the
    command names the extra in one line instead of a traceback. The environment without them:
    this one's site-packages, less pandas and matplotlib, on a path of links."""
    site = Path(pd.__file__).resolve().parents[1]
    shadow = tmp_path / "site"
    shadow.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("pandas", "matplotlib")) and entry.suffix != ".pth":
            (shadow / entry.name).symlink_to(entry)
    code = (
        "import sys\n"
        "from lightning_gns import GradientNoiseScale, advice\n"
        "GradientNoiseScale()\n"
        "print(advice.decide(100.0, 85.0, 120.0, 32).sentence())\n"
        "assert not any(m.startswith(('pandas', 'matplotlib')) for m in sys.modules)\n"
        "from lightning_gns.report.cli import main\n"
        "sys.exit(main(['report', sys.argv[1]]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{root}"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "recommended batch size 128" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "lightning-gns: error: lightning_gns.report (lightning-gns report and explore, "
        'read_metrics) needs matplotlib: pip install "lightning-gns[report]"'
    )
