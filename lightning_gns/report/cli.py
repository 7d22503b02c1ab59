"""Command line: ``lightning-gns report PATH`` and ``lightning-gns explore --noise-scale N``."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

PROG = "lightning-gns"


class _UsageError(Exception):
    """A bad command line (reported as one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Gradient noise scale (critical batch size) reports and batch-size advice "
        "(McCandlish et al. 2018, arXiv 1812.06162).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{report,explore}", parser_class=_Parser)
    rep = sub.add_parser(
        "report",
        help="summarize logged gns/* metrics and write plots + one HTML page",
        description="Read TensorBoard event files and/or Lightning metrics.csv under PATH, print "
        "a summary per run and write PNG plots and a self-contained report.html.",
    )
    rep.add_argument("path", metavar="PATH", help="log file or folder (searched recursively)")
    rep.add_argument("--out", default="reports", metavar="DIR", help="output folder (reports/)")
    exp = sub.add_parser(
        "explore",
        help="batch-size calculator for a given noise scale",
        description="Print the predicted steps, examples and efficiency for each batch size.",
    )
    exp.add_argument(
        "--noise-scale", "-n", required=True, type=_positive_float, metavar="N", help="B_noise"
    )
    exp.add_argument(
        "--batch-sizes",
        nargs="+",
        type=_positive_int,
        metavar="B",
        help="batch sizes to compare (default: powers of two from N/64 to 64·N)",
    )
    exp.add_argument("--out", metavar="DIR", help="also write plots and explore.html here")
    return parser


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report(args: argparse.Namespace) -> int:
    from lightning_gns.report import advise, format_summary, summarize, write_report
    from lightning_gns.report.logs import find_runs, read_logs
    from lightning_gns.report.page import runs_note
    from lightning_gns.report.summary import probe_lines, text_table

    folders = find_runs(args.path)
    _progress(f"reading {len(folders)} log folder(s) under {args.path} ...")
    logs = read_logs(args.path)
    twins = (
        f", {len(logs.merged)} of them logged to TensorBoard and CSV at once" if logs.merged else ""
    )
    _progress(f"found {len(logs.runs)} run(s){twins}")
    df = logs.frame
    if not df["metric"].astype(str).str.startswith("gns/").any() and not logs.errors:
        raise ValueError(
            f"no gns/* metrics in the logs under {args.path}; "
            "train with the lightning_gns GradientNoiseScale callback to log them"
        )
    summary = summarize(logs)
    print(text_table(format_summary(summary)))
    print()
    for line in advise(summary) + probe_lines(df) + runs_note(logs):
        print(line)
    page = write_report(logs, args.out, progress=_progress, source=str(args.path))
    print(page)
    return 0


def _explore(args: argparse.Namespace) -> int:
    from lightning_gns import advice
    from lightning_gns.report import explore, format_table, write_explore
    from lightning_gns.report.summary import text_table

    table = explore(args.noise_scale, args.batch_sizes)
    rec = advice.optimal_batch_size(args.noise_scale)
    print(f"noise scale B_noise = {args.noise_scale:g}; recommended batch size: {rec}")
    print(text_table(format_table(table)))
    if args.out:
        _progress(f"writing plots to {args.out} ...")
        print(write_explore(args.noise_scale, args.batch_sizes, args.out))
    return 0


def _fail(message: object, code: int = 2) -> int:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 error)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise _UsageError("choose a command: report or explore (see --help)")
        return _report(args) if args.command == "report" else _explore(args)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except _UsageError as exc:
        return _fail(exc)
    except FileNotFoundError as exc:
        missing = exc.filename or exc
        return _fail(f"no such file or directory: {missing}" if exc.filename else missing)
    except (ValueError, OSError, ImportError) as exc:  # ImportError: the [report] extra
        return _fail(exc)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # the CLI must never print a traceback
        return _fail(f"unexpected {type(exc).__name__}: {exc}", 1)


if __name__ == "__main__":
    sys.exit(main())
