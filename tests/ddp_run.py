"""Run GradientNoiseScale under DDP on 2 CPU processes (gloo); rank 0 writes JSON results.

Usage: python tests/ddp_run.py OUT.json SOURCE ACCUMULATE
(Lightning's strategy="ddp" relaunches this script in new processes, so tests call it in a
subprocess rather than importing it.)
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from helpers import Classifier, digits, exact_gns, mlp, trainer_kwargs  # noqa: E402

from lightning_gns import GradientNoiseScale  # noqa: E402


def main(out: str, source: str, accumulate: int) -> None:
    torch.set_num_threads(1)
    cb = GradientNoiseScale(ema_decay=0.98, source=source, log_every_n_steps=10)
    trainer = pl.Trainer(
        **trainer_kwargs(
            os.path.dirname(out),
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=8,
            accumulate_grad_batches=accumulate,
            callbacks=[cb],
        )
    )
    trainer.fit(Classifier(mlp(), batch_size=16))
    if trainer.global_rank == 0:
        x, y = digits()
        result = {
            "world_size": trainer.world_size,
            "active_source": cb.active_source,
            "b_simple": cb.b_simple,
            "grad_norm_sq": cb.grad_norm_sq,
            "grad_variance": cb.grad_variance,
            "batch_size": cb.batch_size,
            "steps": cb.values.steps,
            "truth": exact_gns(mlp(), x, y),
        }
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
