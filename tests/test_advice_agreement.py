"""One voice for the advice (issues 29 and 31): the callback's end-of-fit summary, its logged
``gns/optimal_batch_size`` and ``gns/efficiency``, ``make demo``'s closing lines, the analyzer
and ``lightning-gns report`` say the same thing for the same values, over a grid of intervals
and batch sizes with the edge cases; no sentence grows to the batch already used, and no
printed line shows a NaN."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from examples.demo import closing_lines
from lightning_gns import keys
from lightning_gns.analyzer import summary_lines
from lightning_gns.estimator import GNSValues
from lightning_gns.publish import decide, read_out, summary
from lightning_gns.report import advise, summarize

NAN, INF = math.nan, math.inf
INTERVALS = {  # name: (raw B_simple, lower, upper, |G|²)
    "precise": (100.0, 85.0, 120.0, 0.5),
    "exactly 1.5x": (163.8, 134.9, 1.5 * 134.9, 0.5),  # not exact in float32 either
    "just over 1.5x": (163.8, 134.9, 1.51 * 134.9, 0.5),
    "capped at 2 lower": (46.0, 31.0, 46.0, 0.5),  # 46 rounds to 64 > 2 × 31
    "wide, bound 40": (60.0, 40.0, 90.0, 0.5),  # between 32 and 64
    "open, bound 40": (NAN, 40.0, INF, 0.01),
    "open, bound 17": (NAN, 17.0, INF, 0.01),  # between 16 and 32 (issue 29)
    "open, raw value": (500.0, 400.0, INF, 0.01),  # a ratio, but not known
    "open, bound 45": (NAN, 45.0, INF, 0.01),  # 40 is a multiple of 8 between 32 and 45
    "wide, down to zero": (5.0, 0.0, 30.0, 0.5),
    "no interval yet": (NAN, NAN, NAN, 0.5),
    "NaN |G|²": (NAN, NAN, NAN, NAN),
}
BATCHES = [8.0, 16.0, 24.0, 32.0, 128.0, 256.0, NAN]
MULTIPLES = [None, 8]
NAN_WORD = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


def values(b: float, lo: float, hi: float, g2: float) -> GNSValues:
    return GNSValues(b, 1.0, lo, hi, g2, b * g2, steps=50, skipped=0, window=40.0)


def said(text: str) -> tuple[str, int | None]:
    """What a text advises: ("recommend", N), ("grow", N) or ("none", None); exactly one."""
    found = [("recommend", int(n)) for n in re.findall(r"recommended batch size (\d+)", text)]
    found += [("grow", int(n)) for n in re.findall(r"grow it to at least (\d+)", text)]
    if re.search(r"\bno advice\b", text):
        found.append(("none", None))
    assert len(set(found)) == 1, text
    return found[0]


def report_line(out: dict[str, float]) -> str:
    """``lightning-gns report``'s line for a run whose last read-out logged ``out``, read back
    as TensorBoard stores scalars (float32)."""
    rows = [("run", step, k, float(np.float32(v))) for step in (0, 10) for k, v in out.items()]
    (line,) = advise(summarize(pd.DataFrame(rows, columns=["run", "step", "metric", "value"])))
    return line


@pytest.mark.parametrize("multiple", MULTIPLES, ids=lambda m: f"multiple={m}")
@pytest.mark.parametrize("interval", list(INTERVALS), ids=str)
def test_the_four_outputs_agree(interval: str, multiple: int | None) -> None:
    v = values(*INTERVALS[interval])
    for batch in BATCHES:
        a = decide(v, batch, multiple)
        logged = read_out(v, batch, 1.0, multiple)
        texts = {
            "summary": summary(v, batch, "per_example", "auto", 1.0, multiple),
            "demo": "\n".join(closing_lines(v, batch, multiple, val_acc=0.9)),
            "analyzer": "\n".join(summary_lines(a)),
            "report": report_line(logged),
        }
        verdicts = {name: said(text) for name, text in texts.items()}
        assert len(set(verdicts.values())) == 1, (interval, batch, verdicts)
        kind, size = verdicts["summary"]
        opt, eff = logged[keys.OPTIMAL_BATCH_SIZE], logged[keys.EFFICIENCY]
        if kind == "none":
            assert opt == batch or (math.isnan(opt) and math.isnan(batch)), (interval, batch)
        else:
            assert opt == size, (interval, batch, opt, size)
        assert math.isfinite(eff) == (kind == "recommend" and batch > 0), (interval, batch)
        assert ("efficiency now" in texts["demo"]) == math.isfinite(eff)
        if kind == "grow":  # never the batch already used, nor a smaller one
            assert size is not None and size > batch, (interval, batch, size)
            assert size <= INTERVALS[interval][1]  # never past what is known
        for name, text in texts.items():
            for line in text.splitlines():
                assert not NAN_WORD.search(line), (name, interval, batch, line)


@pytest.mark.parametrize(
    "interval, batch, multiple, expected",
    [
        ("precise", 32.0, None, ("recommend", 128)),
        ("exactly 1.5x", 32.0, None, ("recommend", 128)),  # 1.5x is precise enough
        ("just over 1.5x", 32.0, None, ("grow", 128)),  # only the bound 134.9 now
        ("just over 1.5x", 128.0, None, ("none", None)),  # 128 is below it, 256 may be past
        ("capped at 2 lower", 8.0, None, ("recommend", 32)),
        ("wide, bound 40", 32.0, None, ("none", None)),  # 64 may be past B_noise
        ("wide, bound 40", 16.0, None, ("grow", 32)),
        ("wide, bound 40", 32.0, 8, ("grow", 40)),  # a multiple of 8 fits below the bound
        ("open, bound 17", 16.0, None, ("none", None)),  # issue 29: not "grow it to 16"
        ("open, bound 45", 32.0, 8, ("grow", 40)),
        ("open, bound 45", 32.0, None, ("none", None)),
        ("open, raw value", 32.0, None, ("grow", 256)),
        ("NaN |G|²", 32.0, None, ("none", None)),
        ("precise", NAN, None, ("recommend", 128)),
    ],
)
def test_edge_cases_by_hand(
    interval: str, batch: float, multiple: int | None, expected: tuple[str, int | None]
) -> None:
    v = values(*INTERVALS[interval])
    text = summary(v, batch, "per_example", "auto", 1.0, multiple)
    assert said(text) == expected, text


def test_the_words_of_the_issue_cases() -> None:
    """Issue 31: at batch 32 with B_noise at least 40 the summary said "grow it to at least
    32"; ``make demo`` said "not yet known" for a value the callback printed."""
    text = summary(values(*INTERVALS["open, bound 40"]), 32.0, "per_example", "auto", 1.0)
    assert "grow" not in text and "the next batch size, 64, may be past it" in text
    demo = closing_lines(values(163.8, 134.9, 203.8, 0.16), 32.0, None, val_acc=0.96)
    assert demo[0].endswith("B_simple 163.8 (95% interval 134.9 to 203.8), 40-step window")
    assert "not yet known" not in "\n".join(demo)
    assert (
        demo[1]
        == "advice              : " + decide(values(163.8, 134.9, 203.8, 0.16), 32.0).sentence()
    )
    assert not any(line.startswith("efficiency now") for line in demo)  # it was "nan%"
    nan_values = values(NAN, NAN, NAN, NAN)
    assert "|G|² (smoothed)     : not yet measured" in closing_lines(nan_values, 32.0, None)
