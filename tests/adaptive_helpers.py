"""Shared by the AdaptiveBatchSize tests: a monitor that always asks for a larger batch, a
small data module, and a run that records the rate each SGD step used."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from helpers import digits, mlp
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from lightning_gns import GradientNoiseScale
from lightning_gns.estimator import GNSValues

LOUD = GNSValues(1e6, 1e4, 9e5, 1.1e6, 1.0, 1e6, 100, 0, 0, 100.0)


class LoudNoise(GradientNoiseScale):
    """Measures as usual but reports B_noise = 10⁶ (known) at every read-out, so the rules
    always ask for a larger batch: changes at the read-outs, whatever the model does."""

    @property  # type: ignore[override]
    def values(self) -> GNSValues:
        return LOUD

    @values.setter
    def values(self, value: GNSValues) -> None:
        pass


class Small(pl.LightningModule):
    """The digits MLP on the first ``n`` examples (SGD, fixed order unless ``seed``);
    ``sampler``: a ResizableBatchSampler class to draw batches with."""

    def __init__(
        self,
        n: int = 256,
        batch_size: int = 8,
        lr: float = 0.1,
        seed: int | None = None,
        sampler: type | None = None,
        workers: int = 0,
    ) -> None:
        super().__init__()
        self.model = mlp()
        self.n, self.batch_size, self.lr, self.seed = n, batch_size, lr, seed
        self.sampler_cls, self.workers = sampler, workers

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        x, y = digits()
        data = TensorDataset(x[: self.n], y[: self.n])
        if self.seed is None:
            order = SequentialSampler(data)
        else:
            order = RandomSampler(data, generator=torch.Generator().manual_seed(self.seed))
        kw = {"num_workers": self.workers, "persistent_workers": self.workers > 0}
        if self.sampler_cls is None:
            return DataLoader(data, batch_size=self.batch_size, sampler=order, **kw)
        return DataLoader(data, batch_sampler=self.sampler_cls(order, self.batch_size), **kw)


def params(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])
