"""GradientNoiseMeter in own loops on 2 CPU processes (gloo); every rank writes JSON results.

Usage: python tests/meter_run.py OUT.json ddp    (Fabric DDP: per-example norms)
       python tests/meter_run.py OUT.json fsdp   (Fabric FSDP1: micro-batches)
       python tests/meter_run.py OUT.json torch PORT   (torch.distributed DDP: micro-batches)
       python tests/meter_run.py OUT.json fsdp2 PORT   (FSDP2 fully_shard: per-example norms)
       python tests/meter_run.py OUT.json uneven PORT   (DDP; the ranks' first steps differ)
Rank r writes OUT.json.rank<r>. (Fabric's strategy="ddp" relaunches this script in new
processes, so tests call it in a subprocess rather than importing it.)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from helpers import digits, mlp  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from lightning_gns import GradientNoiseMeter  # noqa: E402

EPOCHS, BATCH = 3, 16
TIMEOUT = datetime.timedelta(seconds=60)  # a rank that died does not hang the other for long


def write(out: str, rank: int, world: int, meter: GradientNoiseMeter) -> None:
    meter.read()  # a collective: every rank
    result = {
        "rank": rank,
        "world_size": world,
        "chosen_source": meter.chosen_source,
        "b_simple": meter.b_simple,
        "grad_norm_sq": meter.grad_norm_sq,
        "grad_variance": meter.grad_variance,
        "batch_size": meter.batch_size,
        "small_batch_size": meter.metrics()["gns/small_batch_size"],
        "steps": meter.values.steps,
        "skipped": meter.values.skipped,
    }
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(result, f)


def epochs(loader: DataLoader, sampler: DistributedSampler) -> Callable[[int], list]:
    """The micro-batches of one epoch, its sampler set to that epoch."""

    def batches(epoch: int) -> list:
        sampler.set_epoch(epoch)
        return list(loader)

    return batches


def train(
    meter: GradientNoiseMeter,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], list],
    backward: Callable[[Tensor, bool], None],
    model: nn.Module,
    accumulate: int = 1,
) -> None:
    """EPOCHS epochs of whole windows of ``accumulate`` micro-batches: ``backward(loss, sync)``
    of each (the loss divided by ``accumulate``; sync on the window's last), then
    ``meter.step()`` before the optimizer's."""
    for epoch in range(EPOCHS):
        micro = batches(epoch)
        for i in range(0, len(micro) - accumulate + 1, accumulate):
            for j, (xb, yb) in enumerate(micro[i : i + accumulate]):
                loss = nn.functional.cross_entropy(model(xb), yb)
                backward(loss / accumulate, j == accumulate - 1)  # exact when accumulate is 1
            meter.step()
            optimizer.step()
            optimizer.zero_grad()


def fabric_loop(out: str) -> None:
    """A litgpt-style loop: fabric.setup, fabric.backward; the frozen digits MLP."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=TIMEOUT))
    fabric.launch()
    model = mlp()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = digits()
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=gen)
    loader = fabric.setup_dataloaders(loader)
    meter = GradientNoiseMeter(model, ema_decay=0.98, log_every_n_steps=10)
    train(meter, optimizer, epochs(loader, loader.sampler),
          lambda loss, sync: fabric.backward(loss), model)  # fmt: skip
    write(out, fabric.global_rank, fabric.world_size, meter)
    dist.barrier()
    dist.destroy_process_group()


def fabric_fsdp(out: str) -> None:
    """Fabric FSDP (FSDP1: micro-batches, 2 per step) on CPU; Fabric refuses FSDP on CPU by an
    exact-type check, and Fabric wraps with device_id=None, which FSDP1 refuses on CPU."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDP(FSDPStrategy):
        def setup_module(self, module: nn.Module) -> nn.Module:
            return FullyShardedDataParallel(module, device_id=torch.device("cpu"))

    fabric = Fabric(accelerator="cpu", devices=2, strategy=CPUFSDP(timeout=TIMEOUT))
    fabric.launch()
    model = fabric.setup_module(mlp())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = digits()
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=gen)
    loader = fabric.setup_dataloaders(loader)
    meter = GradientNoiseMeter(model, ema_decay=0.98, accumulate=2, log_every_n_steps=10)

    def backward(loss: Tensor, sync: bool) -> None:
        with fabric.no_backward_sync(model, enabled=not sync):
            fabric.backward(loss)

    train(meter, optimizer, epochs(loader, loader.sampler), backward, model, accumulate=2)
    write(out, fabric.global_rank, fabric.world_size, meter)
    dist.barrier()
    dist.destroy_process_group()


def fsdp2_worker(rank: int, out: str) -> None:
    """A plain loop on FSDP2 (fully_shard): per-example norms of sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=TIMEOUT)
    model = mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = digits()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    meter = GradientNoiseMeter(model, ema_decay=0.98, log_every_n_steps=10)
    train(meter, optimizer, epochs(loader, sampler), lambda loss, sync: loss.backward(), model)
    write(out, rank, 2, meter)
    dist.barrier()
    dist.destroy_process_group()


def torch_worker(rank: int, out: str) -> None:
    """A plain torch.distributed DDP loop with 2 micro-batches per step (rank 0 starts rank 1
    as a second process of this script)."""
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=TIMEOUT)
    model = nn.parallel.DistributedDataParallel(mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = digits()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    meter = GradientNoiseMeter(model, ema_decay=0.98, source="micro_batch", accumulate=2)

    def backward(loss: Tensor, sync: bool) -> None:
        with contextlib.nullcontext() if sync else model.no_sync():
            loss.backward()

    train(meter, optimizer, epochs(loader, sampler), backward, model, accumulate=2)
    write(out, rank, 2, meter)
    dist.barrier()
    dist.destroy_process_group()


class Uneven(nn.Module):
    """The first forward differs between the 2 ranks: ``aux`` runs on rank 0 only, ``twice``
    twice on rank 1 only; later ones call ``twice`` once and never ``aux``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(64, 16), nn.Linear(16, 10)
        self.aux, self.twice = nn.Linear(16, 10), nn.Linear(16, 16)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        h, first, rank = self.body(x).tanh(), self.calls == 1, dist.get_rank()
        h = self.twice(self.twice(h)) if first and rank == 1 else self.twice(h)
        return self.head(h) + self.aux(h) if first and rank == 0 else self.head(h)


def uneven_worker(rank: int, out: str) -> None:
    """Per-example norms under DDP where the structural checks of the ranks disagree."""
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=TIMEOUT)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Uneven(), find_unused_parameters=True)
    x, y = digits()
    meter = GradientNoiseMeter(model, source="per_example", log_every_n_steps=5)
    saved: dict = {}
    for step in range(12):
        lo = (2 * step + rank) * BATCH
        nn.functional.cross_entropy(model(x[lo : lo + BATCH]), y[lo : lo + BATCH]).backward()
        meter.step()
        model.zero_grad()
        if step == 2:  # a checkpoint before the first read (at step 5)
            saved = meter.state_dict()
    write(out, rank, 2, meter)
    with open(f"{out}.rank{rank}") as f:
        result = json.load(f)
    result.update(left_out=sorted(meter.left_out), coverage=meter.coverage)
    result.update(saved_left_out=sorted(saved["left_out"]))
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2] == "ddp":
        fabric_loop(sys.argv[1])
    elif sys.argv[2] == "fsdp":
        fabric_fsdp(sys.argv[1])
    else:
        workers = {"fsdp2": fsdp2_worker, "uneven": uneven_worker}
        worker = workers.get(sys.argv[2], torch_worker)
        if "RANK" in os.environ:  # rank 1, started by rank 0 below
            worker(1, sys.argv[1])
            sys.exit(0)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
        other = subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, "RANK": "1"})
        worker(0, sys.argv[1])
        sys.exit(other.wait())
