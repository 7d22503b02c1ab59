"""No host sync on non-logging steps: the check sees every hook kind (positive controls)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, mlp, trainer_kwargs
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseScale, forbid_host_sync
from lightning_gns.driver import StepDriver
from lightning_gns.host_sync import HostSyncError
from lightning_gns.norms import compiled, simultaneous, site_hooks
from lightning_gns.norms.micro_batch import MicroBatchNorms
from lightning_gns.norms.record import LinearRows
from lightning_gns.norms.sites import Site


class Scale(nn.Module):
    """A layer without a rule: the torch.func fallback covers it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class Seq(pl.LightningModule):
    """Every per-example path at once: a routed Linear (long sequence, small width), a layer on
    the torch.func fallback, a checkpointed block (its layers go through the taps) and plain
    hooked 2-D layers (a LayerNorm's rule, a Linear's row norms)."""

    def __init__(self, d: int = 8, t: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        self.scale = Scale(d)
        self.block = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.norm = nn.LayerNorm(d)  # 2-D: the lean hook and its rule
        self.head = nn.Linear(d, 3)  # 2-D: the step's row norms (LinearRows)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, t, d, generator=gen)
        self.y = torch.randint(0, 3, (64,), generator=gen)

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale(self.inp(x))
        h = h + checkpoint(self.block, h, use_reentrant=False)
        return self.head(self.norm(h.mean(1)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


def measured_fit(
    module: pl.LightningModule, source: str, tmp_path, accumulate: int = 1
) -> list[str]:
    cb = GradientNoiseScale(source=source, log_every_n_steps=1000)  # no logging step inside
    with forbid_host_sync(raise_at_exit=False) as found:
        trainer = pl.Trainer(
            **trainer_kwargs(tmp_path, max_steps=4, accumulate_grad_batches=accumulate),
            callbacks=[cb],
        )
        trainer.fit(module)
    assert cb.values.steps >= 2, cb.values  # the run was measured (steps after the check)
    return list(found)


def test_clean_runs_read_nothing_between_logging_steps(tmp_path) -> None:
    assert measured_fit(Seq(), "per_example", tmp_path) == []
    assert (
        measured_fit(Classifier(mlp(), batch_size=16), "micro_batch", tmp_path, accumulate=2) == []
    )
    assert (
        measured_fit(Classifier(mlp(), batch_size=16), "per_example", tmp_path, accumulate=2) == []
    )


def planted(fn):  # noqa: ANN001, ANN201
    """``fn`` with a host read added in front (what a careless change would do)."""

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        torch.ones(()).item()
        return fn(*args, **kwargs)

    return wrapper


PLANTS = {
    "micro-batch parameter hook": (MicroBatchNorms, "_hook_fp32", "micro_batch"),
    "per-example forward hook": (site_hooks, "eager", "per_example"),
    "per-example output-gradient hook": (site_hooks, "on_output_grad", "per_example"),
    "per-example rule": (Site, "norms", "per_example"),
    "per-example Linear rows": (LinearRows, "add", "per_example"),
    "torch.func fallback": (site_hooks, "close_generic", "per_example"),
    "routed Linear forward": (simultaneous, "_routed_forward", "per_example"),
    "routed Linear backward": (simultaneous, "_linear_backward", "per_example"),
    "tap backward (checkpointed block)": (compiled, "_tap_backward", "per_example"),
    "the step driver": (StepDriver, "end_step", "per_example"),
}


@pytest.mark.parametrize("where", list(PLANTS))
def test_a_planted_host_read_is_caught(where, tmp_path, monkeypatch) -> None:
    owner, name, source = PLANTS[where]
    monkeypatch.setattr(owner, name, planted(getattr(owner, name)))
    accumulate = 2 if source == "micro_batch" else 1
    found = measured_fit(Seq(), source, tmp_path, accumulate)
    assert found and all("item()" in f for f in found), where


def test_forbid_host_sync_raises_at_exit(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(site_hooks, "eager", planted(site_hooks.eager))
    cb = GradientNoiseScale(log_every_n_steps=1000)
    with pytest.raises(HostSyncError, match="item"), forbid_host_sync():
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3), callbacks=[cb])
        trainer.fit(Classifier(mlp(), batch_size=16))
