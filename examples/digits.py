"""A small classifier on scikit-learn's bundled digits (no download), for the demo and the CLI."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, random_split


class DigitsDataModule(pl.LightningDataModule):
    """The 1797 8×8 digit images, standardised; 90% train, 10% validation.

    Args:
        batch_size: examples per micro-batch.
        seed: seed of the split and of the shuffling.
    """

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        full = TensorDataset(x, torch.tensor(data.target, dtype=torch.long))
        gen = torch.Generator().manual_seed(self.seed)
        n_val = len(full) // 10
        self.train_set, self.val_set = random_split(full, [len(full) - n_val, n_val], gen)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(pl.LightningModule):
    """An MLP with LayerNorm, trained with SGD and momentum.

    Args:
        hidden: width of the hidden layers.
        lr: learning rate.
    """

    def __init__(self, hidden: int = 32, lr: float = 0.005) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
