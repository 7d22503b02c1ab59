"""From a read-out to what users see: the logged ``gns/*`` values, the TensorBoard layout, and
the end-of-fit summary. Keys: :mod:`lightning_gns.publish`.

How a value reads (README, "What is logged"): ``gns/b_simple`` is the point estimate whenever
|G|² is significantly above zero (its 95% interval is bounded), always with that interval;
NaN ("not yet known") only while the interval is unbounded, when ``gns/b_simple_lower`` bounds
B_noise from below. The advice (``gns/optimal_batch_size``, ``gns/efficiency`` and the
summary's sentence) comes from :func:`lightning_gns.advice.decide`, as everywhere else.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gns import advice, keys
from lightning_gns._compat import set_callback_metrics
from lightning_gns.estimator import GNSValues


def point_estimate(v: GNSValues) -> float:
    """B_simple where it is known (:func:`lightning_gns.advice.known`: a bounded interval),
    else NaN."""
    return v.b_simple if advice.known(v.b_simple, v.b_simple_lower, v.b_simple_upper) else math.nan


def decide(v: GNSValues, batch_size: float, multiple: int | None = None) -> advice.Advice:
    """:func:`lightning_gns.advice.decide` for a read-out."""
    return advice.decide(v.b_simple, v.b_simple_lower, v.b_simple_upper, batch_size, multiple)


def read_out(
    v: GNSValues, batch_size: float, small_batch_size: float, multiple: int | None = None
) -> dict[str, float]:
    """The logged ``gns/*`` values of one read-out (see README for each key)."""
    out = {
        keys.B_SIMPLE: point_estimate(v),
        keys.B_SIMPLE_SE: v.b_simple_se,
        keys.B_SIMPLE_LOWER: v.b_simple_lower,
        keys.B_SIMPLE_UPPER: v.b_simple_upper if math.isfinite(v.b_simple_upper) else math.nan,
        keys.GRAD_NORM_SQ: v.grad_norm_sq,
        keys.GRAD_VARIANCE: v.grad_variance,
        keys.BATCH_SIZE: batch_size,
        keys.SMALL_BATCH_SIZE: small_batch_size,
        keys.SKIPPED_STEPS: float(v.skipped),
        keys.STALE_STEPS: float(v.stale),
        keys.WINDOW_STEPS: v.window,
    }
    a = decide(v, batch_size, multiple)
    out[keys.OPTIMAL_BATCH_SIZE] = a.size
    out[keys.EFFICIENCY] = a.efficiency
    if multiple is not None:  # the report decides with it too
        out[keys.BATCH_SIZE_MULTIPLE] = float(multiple)
    return out


def logging_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes ``self.log`` values to the loggers after this batch (its own
    ``log_every_n_steps``, counted in optimizer steps as :meth:`on_train_batch_end` sees them)."""
    n = int(getattr(trainer, "log_every_n_steps", 0) or 0)
    return n > 0 and trainer.global_step % n == 0


def publish(
    trainer: pl.Trainer, pl_module: pl.LightningModule | None, metrics: dict[str, float]
) -> None:
    """To every logger and ``trainer.callback_metrics`` (EarlyStopping, sweeps).

    Inside a training batch where Lightning itself logs (``pl_module`` given), through
    ``pl_module.log_dict``: the values share the step, the row and the ``epoch`` of the user's
    own ``self.log`` values. Elsewhere (another interval, the end of training) straight to the
    loggers at the step Lightning would use, with the epoch."""
    if pl_module is not None and logging_now(trainer):
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=bool(trainer.loggers))
        return
    set_callback_metrics(trainer, metrics)
    step = trainer.global_step - 1 if pl_module is not None else trainer.global_step
    row = {**metrics, "epoch": float(trainer.current_epoch)}
    for logger in trainer.loggers:
        logger.log_metrics(row, step=max(step, 0))


def tensorboard_layout() -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars charts: anchored tags, one scale per chart, the interval as a margin.

    TensorBoard draws a category's multiline charts before its margin charts whatever the
    layout's order, so the B_simple margin chart has a category of its own, listed first: it
    is the first chart on the Custom Scalars tab (categories keep the layout's order).
    """
    return {
        "gradient noise scale B_simple": {
            "B_simple with its 95% interval": [
                "Margin",
                [keys.B_SIMPLE, keys.B_SIMPLE_LOWER, keys.B_SIMPLE_UPPER],
            ],
        },
        "gradient noise scale: details": {
            "batch size: used and recommended": [
                "Multiline",
                [f"^{keys.BATCH_SIZE}$", f"^{keys.OPTIMAL_BATCH_SIZE}$"],
            ],
            "efficiency at the batch size used": ["Multiline", [f"^{keys.EFFICIENCY}$"]],
            "|G|² (smoothed)": ["Multiline", [f"^{keys.GRAD_NORM_SQ}$"]],
            "tr(Σ) (smoothed)": ["Multiline", [f"^{keys.GRAD_VARIANCE}$"]],
            "coverage": ["Multiline", [f"^{keys.COVERAGE}$"]],
            "averaging window (effective steps)": ["Multiline", [f"^{keys.WINDOW_STEPS}$"]],
            "skipped and stale steps": [
                "Multiline",
                [f"^{keys.SKIPPED_STEPS}$", f"^{keys.STALE_STEPS}$"],
            ],
        },
    }


def summary(
    v: GNSValues,
    batch_size: float,
    source: str,
    why: str,
    coverage: float,
    multiple: int | None = None,
    checked: int = 0,
) -> str:
    """The end-of-fit block: B_simple or its bound with the interval, the advice
    (:func:`lightning_gns.advice.decide`), the source and why, the steps (``checked``: those
    that ran the per-example structural check instead), coverage."""
    a = decide(v, batch_size, multiple)
    cover = f"; coverage {coverage:.1%}" if math.isfinite(coverage) else ""
    check = f" (and {checked} checking the per-example rules)" if checked else ""
    headline = a.headline()
    if v.steps == 0:  # not "too few steps, or all noise": say what happened
        what = f"all {v.skipped} steps were skipped (see the warning)" if v.skipped else ""
        headline = f"B_simple not known: no step measured{'; ' + what if what else ''}"
    elif not a.known and v.grad_norm_sq == 0 and v.grad_variance == 0:
        headline = "B_simple not known: the gradient is exactly zero (|G|² and tr(Σ) are 0)"
    return "\n".join(
        [
            "GradientNoiseScale summary",
            f"  {headline}",
            f"  {a.sentence()}",
            f"  source: {source} ({why}); {v.steps} steps measured{check}, "
            f"{v.skipped} skipped{cover}",
        ]
    )


ERROR_TAG = keys.ERROR  # why a run stopped, where `lightning-gns report` reads it
_MAX_CHARS = 1000


def record_failure(trainer: pl.Trainer, exception: BaseException) -> None:
    """Write ``<type>: <message>`` as TensorBoard text ``gns/error`` to each TensorBoard
    logger; never raises (the user's own error must come through unchanged)."""
    text = f"{type(exception).__name__}: {exception}".rstrip(": ")[:_MAX_CHARS]
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            try:
                logger.experiment.add_text(ERROR_TAG, text, trainer.global_step)
            except Exception:  # noqa: BLE001, S110 - a report aid, never a second failure
                pass
