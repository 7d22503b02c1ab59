"""Run GradientNoiseScale under DDP on 2 CPU processes (gloo); rank 0 writes JSON results.

Usage: python tests/ddp_run.py OUT.json SOURCE ACCUMULATE
       python tests/ddp_run.py OUT.json adaptive 1   (AdaptiveBatchSize; OUT.json.rank<r>)
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
from helpers import (  # noqa: E402
    Classifier,
    CloseProcessGroup,
    digits,
    exact_gns,
    mlp,
    trainer_kwargs,
)

from lightning_gns import GradientNoiseScale  # noqa: E402
from lightning_gns.adaptive import AdaptiveBatchSize  # noqa: E402


class History(pl.Callback):
    """Each rank's accumulation at every optimizer step, and its final parameters' sum."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append((trainer.global_step, trainer.accumulate_grad_batches))


def ddp_trainer(out: str, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    """2 CPU processes (gloo), writing under the folder of ``out``."""
    torch.set_num_threads(1)
    kwargs["callbacks"] = [*callbacks, CloseProcessGroup()]
    return pl.Trainer(
        **trainer_kwargs(
            os.path.dirname(out), accelerator="cpu", devices=2, strategy="ddp", **kwargs
        )
    )


def adaptive(out: str) -> None:
    """Training (lr > 0) with AdaptiveBatchSize on 2 ranks; every rank writes its history."""
    gns = GradientNoiseScale(log_every_n_steps=5)
    ada = AdaptiveBatchSize(max_accumulate=8, min_steps_between=10)
    history = History()
    trainer = ddp_trainer(out, max_steps=120, callbacks=[gns, ada, history])
    module = Classifier(mlp(), lr=0.05, batch_size=8)
    trainer.fit(module)
    result = {
        "rank": trainer.global_rank,
        "steps": history.steps,
        "changes": [c.new for c in ada.changes],
        "lr_scale": ada.lr_scale,
        "param_sum": float(sum(p.double().sum() for p in module.parameters())),
    }
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump(result, f)


def main(out: str, source: str, accumulate: int) -> None:
    cb = GradientNoiseScale(ema_decay=0.98, source=source, log_every_n_steps=10)
    trainer = ddp_trainer(out, max_epochs=8, accumulate_grad_batches=accumulate, callbacks=[cb])
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
    if sys.argv[2] == "adaptive":
        adaptive(sys.argv[1])
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
