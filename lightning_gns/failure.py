"""Why a run stopped, recorded where ``lightning-gns report`` reads it (TensorBoard text).

A run that fails at fit start (say, the callback refuses the model) logs no scalar; the report
lists it with this text instead of leaving it out.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gns import keys

ERROR_TAG = keys.ERROR
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
