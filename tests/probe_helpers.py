"""A small module for CriticalBatchProbe's tests: dropout (the torch RNG), numpy and Python
draws in training_step, Adam, a StepLR schedule and ``self.log``, so a probe that left any of
them changed would change the run."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch
from helpers import digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def seed_everything(seed: int) -> None:
    """torch, numpy and ``random`` from ``seed``: two runs in one process start alike."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Noisy(pl.LightningModule):
    """The digits MLP with dropout; training_step also draws from numpy and ``random``."""

    def __init__(self, batch_size: int = 16, lr: float = 1e-2, sgd: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 10))
        self.batch_size, self.lr, self.sgd = batch_size, lr, sgd

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        np.random.rand(), random.random()  # draws the probe's branches make too
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        if self.sgd:
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9
            )
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)]

    def train_dataloader(self) -> DataLoader:
        x, y = digits()
        gen = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(x, y), batch_size=self.batch_size, shuffle=True, generator=gen
        )


class Trace(pl.Callback):
    """Each training batch's loss and a draw of every global generator after it (put before
    the probe in the callbacks: a probe that left a generator moved shows at the next batch)."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        state = torch.get_rng_state()
        torch_draw = float(torch.rand(()))
        torch.set_rng_state(state)  # read, not moved: dropout draws on as without the trace
        loss = float(outputs["loss"])
        self.rows.append((loss, torch_draw, float(np.random.rand()), random.random()))


def flat_state(module: pl.LightningModule, trainer: pl.Trainer, trace: Trace) -> dict:
    """Parameters, optimizer state and scheduler state as exact lists (bit-comparable)."""
    opt = trainer.optimizers[0]
    state = [
        [v.tolist() if isinstance(v, Tensor) else v for _, v in sorted(s.items())]
        for s in opt.state.values()
    ]
    return {
        "params": [p.detach().flatten().tolist() for p in module.parameters()],
        "opt": state,
        "lr": [g["lr"] for g in opt.param_groups],
        "sched": trainer.lr_scheduler_configs[0].scheduler.state_dict()["last_epoch"],
        "trace": trace.rows,
        "train_loss": float(trainer.callback_metrics["train_loss"]),
        "step": trainer.global_step,
        "torch_rng": torch.get_rng_state().tolist(),
    }
