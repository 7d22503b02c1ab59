"""Reports from logged ``gns/*`` metrics: a summary per run, plots and one HTML page.

``summary`` (tables and advice), ``plots`` (PNG figures), ``page`` (the HTML page), ``logs``
(reading TensorBoard and CSV logs). They need pandas and matplotlib, the ``report`` extra
(``pip install "lightning-gns[report]"``); ``import lightning_gns`` does not, and without the
extra this package still imports (the ``lightning-gns`` command names what to install).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SUMMARY_COLUMNS",
    "advise",
    "explore",
    "format_summary",
    "format_table",
    "plot_efficiency",
    "plot_noise_scale",
    "plot_pareto",
    "read_metrics",
    "summarize",
    "write_explore",
    "write_report",
]

try:
    import matplotlib  # noqa: F401
    import pandas  # noqa: F401
except ImportError as err:
    _MISSING: str | None = err.name or "pandas and matplotlib"
else:
    _MISSING = None
    from lightning_gns.report.logs import read_metrics
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


def __getattr__(name: str) -> Any:
    """Without the ``report`` extra, its names raise one clear error."""
    if _MISSING is not None and name in __all__:
        raise ModuleNotFoundError(
            f"lightning_gns.report (lightning-gns report and explore, read_metrics) needs "
            f'{_MISSING}: pip install "lightning-gns[report]"',
            name=_MISSING,
        )
    raise AttributeError(f"module 'lightning_gns.report' has no attribute {name!r}")
