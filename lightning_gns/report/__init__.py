"""Reports from logged ``gns/*`` metrics: a summary per run, plots and one HTML page.

``summary`` (tables and advice), ``plots`` (PNG figures), ``page`` (the HTML page). Importing
this package imports pandas and matplotlib; ``import lightning_gns`` does not.
"""

from lightning_gns.report.page import write_explore, write_report
from lightning_gns.report.plots import plot_efficiency, plot_noise_scale, plot_pareto
from lightning_gns.report.summary import (
    SUMMARY_COLUMNS,
    advise,
    explore,
    format_summary,
    format_table,
    summarize,
)

__all__ = [
    "SUMMARY_COLUMNS",
    "advise",
    "explore",
    "format_summary",
    "format_table",
    "plot_efficiency",
    "plot_noise_scale",
    "plot_pareto",
    "summarize",
    "write_explore",
    "write_report",
]
