"""Shared test helpers: the bundled digits, small models, exact references."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset


def digits() -> tuple[Tensor, Tensor]:
    """The 1797 8×8 digits, standardised, as (X float32 (N, 64), y long (N,))."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target, dtype=torch.long)


def mlp(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def exact_gns(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    params: list[str] | None = None,
    loss_fn=nn.functional.cross_entropy,
) -> dict[str, float]:
    """True |G|², tr(Σ) and B_simple over the whole data set, from per-example gradients."""
    named = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    keys = params if params is not None else list(named)

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**named, **p}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))({k: named[k] for k in keys}, x, y)
    flat = torch.cat([per[k].flatten(1).double() for k in keys], dim=1)
    g = flat.mean(0)
    trace = (flat - g).square().sum(1).mean()
    g2 = g.square().sum()
    return {"grad_norm_sq": float(g2), "trace_cov": float(trace), "b_simple": float(trace / g2)}


class Classifier(pl.LightningModule):
    """A frozen-able classifier: learning rate 0 keeps the model (and the truth) fixed."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.0,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        x, y = digits()
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            TensorDataset(x, y), batch_size=self.batch_size, shuffle=self.shuffle, generator=gen
        )


def trainer_kwargs(tmp_path, **kw) -> dict:
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    base.update(kw)
    return base
