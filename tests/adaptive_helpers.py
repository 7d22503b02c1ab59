"""Shared by the AdaptiveBatchSize tests: a monitor that always asks for a larger batch, a
small data module, and a run that records the rate each SGD step used."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from helpers import digits, mlp
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from lightning_gns import GradientNoiseScale
from lightning_gns.records import StepNorms


def loud(world: int = 1) -> StepNorms:
    """One process's record of a step with |G|² = 1, tr(Σ) = 10⁶ exactly, so B_noise = 10⁶,
    known: B_small 1, and B_big 2·W once ``world`` processes' records are pooled (summed);
    each process holds 1/W of |G_big|² = 1 + 10⁶/(2W)."""
    big = (1.0 + 1e6 / (2 * world)) / world
    return StepNorms(torch.tensor([1e6 + 1.0]), torch.tensor([big]), 1.0, 1.0, 1.0, 0.5)


class _LoudListeners(list):
    """Listeners that get the loud record instead of the measured one."""

    def __iter__(self):  # noqa: ANN204
        dist = torch.distributed
        record = loud(dist.get_world_size() if dist.is_initialized() else 1)
        for listener in list.__iter__(self):
            yield lambda sample, listener=listener: listener(None if sample is None else record)


class LoudNoise(GradientNoiseScale):
    """Measures as usual, but hands AdaptiveBatchSize a record with B_noise = 10⁶ (known) at
    every step, so its rules always ask for a larger batch, whatever the model does."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step_listeners = _LoudListeners()


def record(b_noise: float) -> StepNorms:
    """One process's record of a step with |G|² = 1 and tr(Σ) = ``b_noise`` exactly (B_small
    1, B_big 2): B_noise = ``b_noise``, known once a window holds a few of them."""
    return StepNorms(
        torch.tensor([b_noise + 1.0]), torch.tensor([1.0 + b_noise / 2]), 1.0, 1.0, 1.0, 0.5
    )


class _ScriptedListeners(list):
    def __init__(self, script) -> None:
        super().__init__()
        self.script, self.count = script, 0

    def __iter__(self):  # noqa: ANN204
        self.count += 1
        value = record(self.script(self.count))
        for listener in list.__iter__(self):
            yield lambda sample, listener=listener: listener(None if sample is None else value)


class ScriptedNoise(GradientNoiseScale):
    """Hands AdaptiveBatchSize (one process) B_noise = ``script(k)`` at the k-th record."""

    def __init__(self, script, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step_listeners = _ScriptedListeners(script)


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
