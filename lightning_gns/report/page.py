"""The HTML page: summary table, advice, plots (embedded PNGs) and how to read them.

The page is ``template.html`` with ``style.css`` (package data); it has no JavaScript.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path
from string import Template

import pandas as pd

from lightning_gns import advice
from lightning_gns.report.logs import Logs, read_logs
from lightning_gns.report.plots import (
    Curve,
    pick_runs,
    plot_efficiency,
    plot_efficiency_curves,
    plot_noise_scale,
    plot_pareto,
    plot_pareto_curves,
)
from lightning_gns.report.summary import (
    advise,
    explore,
    fmt_num,
    format_summary,
    format_table,
    summarize,
)

Progress = Callable[[str], None]
PLOT_FILES = {"noise": "noise_scale.png", "efficiency": "efficiency.png", "pareto": "pareto.png"}


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
    body = table.to_html(index=False, escape=True, classes="data", border=0)
    return f'<div class="scroll">{body}</div>'


def _page(title: str, body: str) -> str:
    here = files("lightning_gns.report")
    template = Template(here.joinpath("template.html").read_text(encoding="utf-8"))
    style = here.joinpath("style.css").read_text(encoding="utf-8")
    return template.substitute(title=html.escape(title), style=style, body=body)


def _options_table(b_noise: float, current: float, rec: float) -> pd.DataFrame:
    """Batch sizes around the recommendation (powers of two) plus the one in use."""
    sizes = {rec * 2.0**k for k in range(-4, 5) if rec * 2.0**k >= 1}
    if math.isfinite(current):
        sizes.add(float(current))
    return format_table(advice.efficiency_table(b_noise, sorted(sizes)))


def _read(
    data: str | os.PathLike[str] | pd.DataFrame | Logs, source: str | None, say: Progress
) -> tuple[Logs, str]:
    if isinstance(data, Logs):
        return data, source or "logs"
    if isinstance(data, pd.DataFrame):
        return Logs(data, sorted(data["run"].astype(str).unique())), source or "metrics table"
    say(f"reading logs under {data} ...")
    return read_logs(data), source or str(data)


def runs_note(logs: Logs) -> list[str]:
    """One line naming the runs read from two folders (logged to TensorBoard and CSV at once),
    or none."""
    if not logs.merged:
        return []
    pairs = "; ".join(f"{run} from {' and '.join(f)}" for run, f in logs.merged.items())
    return [f"Logged to TensorBoard and CSV at once, so each read as one run: {pairs}."]


def write_report(
    path_or_df: str | os.PathLike[str] | pd.DataFrame | Logs,
    out_dir: str | os.PathLike[str],
    progress: Progress | None = None,
    source: str | None = None,
) -> Path:
    """Write the three PNG plots and one self-contained ``report.html``; return its path.

    ``path_or_df`` is a log path (read with :func:`lightning_gns.report.logs.read_logs`), a table
    ``read_metrics`` returned, or ``read_logs``' result. ``progress`` (optional) receives one
    short message per stage; ``source`` names the logs in the page.

    Raises:
        FileNotFoundError: the log path does not exist.
        ValueError: no logs, or no run logged ``gns/*`` metrics.
    """
    say = progress or (lambda _msg: None)
    logs, source = _read(path_or_df, source, say)
    df = logs.frame
    summary = summarize(logs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"summarized {len(summary)} run(s)")
    say(f"plotting B_simple over training -> {out / PLOT_FILES['noise']}")
    noise_png = plot_noise_scale(df, out / PLOT_FILES["noise"], runs=pick_runs(summary))
    say(f"plotting efficiency vs batch size -> {out / PLOT_FILES['efficiency']}")
    eff_png = plot_efficiency(summary, out / PLOT_FILES["efficiency"])
    say(f"plotting steps/examples Pareto frontier -> {out / PLOT_FILES['pareto']}")
    pareto_png = plot_pareto(summary, out / PLOT_FILES["pareto"])
    merged = runs_note(logs)
    parts = [
        f'<p class="meta">Source: {html.escape(source)} · {len(summary)} run(s).</p>',
        "<h2>Summary</h2>",
        _table_html(format_summary(summary)),
        '<p class="meta">Each row describes the run\'s last read-out (step): B_simple there '
        "(not yet known while its interval has no upper end), its 95% interval, the batch size "
        "and the advice the callback gives for them (the same function): the recommended batch "
        f"size where the interval spans at most {advice.MAX_SPREAD:g}x, ≥ X where only a lower "
        "bound is known and X, that bound rounded down, is above the batch used (grow to at "
        "least X). B_simple early: the mean of the first 10% of "
        "known points. At recommended: the change in optimizer steps (time) and in examples "
        "(compute) to reach the same loss at the recommended batch size instead of the one "
        "used. Source: where the small-batch norms came from; coverage: the fraction of "
        "trainable parameters in the estimate.</p>",
        '<ul class="advice">' + "".join(f"<li>{html.escape(s)}</li>" for s in advise(summary)),
        "</ul>",
    ]
    if merged:
        parts.append(
            '<ul class="meta">' + "".join(f"<li>{html.escape(m)}</li>" for m in merged) + "</ul>"
        )
    parts += [
        "<h2>Noise scale during training</h2>",
        _img(
            noise_png,
            "B_simple over training steps",
            "B_simple per logged step with its 95% interval (band), the lower bound where "
            "B_simple is not yet known (dotted) and the batch size used (dashed).",
        ),
        "<h2>Efficiency of batch sizes</h2>",
        _img(
            eff_png,
            "Efficiency versus batch size",
            "Predicted efficiency 4·B·B_noise/(B+B_noise)² from each run's B_simple at its last "
            "read-out; circles: batch size used (its efficiency in the legend), stars: "
            "recommendation.",
        ),
        "<h2>Time versus compute</h2>",
        _img(
            pareto_png,
            "Steps versus examples Pareto frontier",
            "Every batch size lies on the same normalized frontier; where a run sits shows "
            "whether it spends extra time (up) or extra compute (right).",
        ),
    ]
    advised = summary[summary["recommended_batch_size"].notna() & summary["b_simple"].gt(0)]
    if 0 < len(advised) <= 8:
        parts.append("<h2>Batch-size options</h2>")
        for row in advised.itertuples(index=False):
            parts.append(
                f"<h3>{html.escape(str(row.run))} (B_noise ≈ {fmt_num(row.b_simple)})</h3>"
            )
            parts.append(
                _table_html(
                    _options_table(row.b_simple, row.batch_size, row.recommended_batch_size)
                )
            )
    parts += ["<h2>How to read this</h2>", _THEORY]
    page = out / "report.html"
    page.write_text(_page("Gradient noise scale report", "\n".join(parts)), encoding="utf-8")
    say(f"wrote {page}")
    return page


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
    curve = Curve(f"B_noise = {fmt_num(b_noise)}", float(b_noise), "C0")
    curve.current = [float(b) for b in table["batch_size"]]
    curve.recommended = [float(rec)]
    label = "batch sizes in the table"
    eff_png = plot_efficiency_curves([curve], out / PLOT_FILES["efficiency"], label)
    pareto_png = plot_pareto_curves([curve], out / PLOT_FILES["pareto"], label)
    body = "\n".join(
        [
            f'<p class="meta">Noise scale B_noise = {fmt_num(b_noise)}; recommended batch '
            f"size {rec}.</p>",
            _table_html(format_table(table)),
            _img(eff_png, "Efficiency versus batch size", "Circles: the batch sizes above."),
            _img(pareto_png, "Steps versus examples", "Each batch size's place on the frontier."),
            "<h2>How to read this</h2>",
            _THEORY,
        ]
    )
    page = out / "explore.html"
    page.write_text(_page("Batch-size calculator", body), encoding="utf-8")
    return page
