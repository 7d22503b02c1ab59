"""Shared set-up of the 2-process workers: strategies on CPU, the model, data with indices.

(Imported by tests/sharded_run.py, which runs as both ranks; tests/test_sharded.py launches it.)
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from helpers import CloseProcessGroup, digits, trainer_kwargs
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 16  # examples per micro-batch per rank
N = 640  # digits used: 20 micro-batches per rank per epoch


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy refuses CPU (its accelerator check is on the exact class) and
    wraps with ``device_id=None``, which FSDP1 refuses for CPU modules: wrap with the CPU."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class Scale(nn.Module):
    """A (1, d) weight no rule knows (torch.func covers it): FSDP2 gives rank 1 an empty shard."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d).unsqueeze(0))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def rank_env(rank: int, port: int, root: object) -> dict[str, str]:
    """The environment of rank ``rank`` of two processes launched by hand (Lightning reads
    these), with ``root`` importable."""
    return {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "LOCAL_RANK": str(rank),
    }


def net(seed: int = 0) -> nn.Module:
    """Odd sizes: FSDP1 pads a flat parameter's shard, FSDP2 shards rows unevenly."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 33), nn.Tanh(), nn.LayerNorm(33), nn.Linear(33, 10), Scale(10)
    )


def data() -> TensorDataset:
    """(x, y, index) of the first N digits: the index tells the test which examples each
    micro-batch held (Lightning sizes the batch from x)."""
    x, y = digits()
    return TensorDataset(x[:N], y[:N], torch.arange(N))


class Module(pl.LightningModule):
    """The frozen net (SGD, learning rate 0, with momentum so there is optimizer state to
    checkpoint) on the digits in a fixed order; FSDP2 shards each Linear and the root."""

    def __init__(self, kind: str, nan_at: int | None = None) -> None:
        super().__init__()
        self.kind, self.nan_at = kind, nan_at
        self.model = net()
        self.seen: list[list[int]] = []  # each micro-batch's example indices on this rank

    def configure_model(self) -> None:
        if self.kind != "fsdp2":
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for m in self.model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        loss = nn.functional.cross_entropy(self.model(x), y)
        if self.nan_at is not None and self.global_step == self.nan_at and self.global_rank == 1:
            loss = loss * float("nan")  # a non-finite gradient on one rank only
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """(After the callbacks read the step.) The NaN step must not poison the parameters:
        learning rate 0 times NaN is NaN."""
        if self.nan_at is not None:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.trainer.model.parameters() if self.kind == "fsdp1_flat" else self.parameters()
        return torch.optim.SGD(params, lr=0.0, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(), batch_size=BATCH, shuffle=False)


def strategy_for(kind: str) -> pl.strategies.Strategy:
    if kind == "ddp":
        return DDPStrategy()
    if kind == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return CPUFSDPStrategy(
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        use_orig_params=kind == "fsdp1",
        state_dict_type="sharded",  # ("full" crashed rank 0 on CPU)
    )


def run(
    root: str,
    kind: str,
    callbacks: list[pl.Callback],
    module: Module | None = None,
    ckpt_path: str | None = None,
    **kwargs,
) -> tuple[pl.Trainer, Module]:
    """One fit on both ranks; each Trainer takes a fresh port (a second on the same one hangs)."""
    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
    torch.set_num_threads(1)
    kwargs.setdefault("max_steps", 12)
    trainer = pl.Trainer(
        **trainer_kwargs(
            root,
            accelerator="cpu",
            devices=2,
            strategy=strategy_for(kind),
            callbacks=[*callbacks, CloseProcessGroup()],
            **kwargs,
        )
    )
    module = module or Module(kind)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module
