"""Shared set-up of the 2- and 4-process workers: strategies on CPU, the model, data with
indices, and the (simulated) node layout.

(Imported by tests/sharded_run.py, which runs as every rank; tests/test_sharded.py and
tests/test_hybrid.py launch it.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from filelock import FileLock  # (a dependency of torch)
from helpers import CloseProcessGroup, digits, free_port, trainer_kwargs
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns.estimator import grad_norm_sq, trace_cov
from lightning_gns.tracker import GNSTracker

BATCH = 16  # examples per micro-batch per rank
N = 640  # digits used: 20 micro-batches per rank per epoch


HYBRID_DIMS = ("replicate", "shard")


def hybrid_mesh() -> object:
    """The (replicate, shard) CPU mesh of hybrid sharding: 2 replicas, each sharded over half
    the processes (on 4: shard within a node of 2, replicate across nodes, [[0, 1], [2, 3]];
    on 2: replicas of one process each)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=HYBRID_DIMS)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy refuses CPU (its accelerator check is on the exact class) and
    wraps with ``device_id=None``, which FSDP1 refuses for CPU modules: wrap with the CPU.
    ``HYBRID_SHARD`` gets a CPU :func:`hybrid_mesh` (Lightning builds a tuple mesh on CUDA)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        hybrid = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)
        if self.sharding_strategy in hybrid:
            self.kwargs["device_mesh"] = hybrid_mesh()
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


def rank_env(rank: int, port: int, root: object, world: int = 2) -> dict[str, str]:
    """The environment of rank ``rank`` of ``world`` processes launched by hand on one node
    (Lightning reads these), with ``root`` importable."""
    return {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "NODE_RANK": "0",
        "LOCAL_RANK": str(rank),
        "GNS_TEST_RANK": str(rank),
        "GNS_TEST_WORLD": str(world),  # (Lightning's teardown drops WORLD_SIZE)
        "GNS_TEST_PORTS": ports_dir(port),
    }


def ports_dir(port: int) -> str:
    """Where one launch's ranks agree on each Trainer's port (:func:`next_port`): named by the
    launching process and its first port, the same for every rank it starts."""
    return os.path.join(tempfile.gettempdir(), f"gns-ports-{os.getpid()}-{port}")


def place(nodes: int) -> int:
    """Set this process's ``NODE_RANK`` and ``LOCAL_RANK`` for ``nodes`` simulated nodes of
    equal size (its global rank unchanged); the processes per node."""
    rank, world = int(os.environ["GNS_TEST_RANK"]), int(os.environ["GNS_TEST_WORLD"])
    os.environ["WORLD_SIZE"] = str(world)
    per_node = world // nodes
    os.environ["NODE_RANK"], os.environ["LOCAL_RANK"] = str(rank // per_node), str(rank % per_node)
    return per_node


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
        if self.kind not in ("fsdp2", "hsdp"):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = hybrid_mesh() if self.kind == "hsdp" else self.device_mesh["data_parallel"]
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


FSDP1_SHARDING = {"hybrid": "HYBRID_SHARD", "hybrid_zero2": "_HYBRID_SHARD_ZERO2"}


def strategy_for(kind: str, world: int = 2) -> pl.strategies.Strategy:
    """``ddp``; ``fsdp2`` (1-D mesh) and ``hsdp`` (FSDP2 on :func:`hybrid_mesh`); ``fsdp1``
    (``use_orig_params``), ``fsdp1_flat``, ``hybrid`` and ``hybrid_zero2`` (FSDP1
    ``HYBRID_SHARD``, ``_HYBRID_SHARD_ZERO2``: :func:`hybrid_mesh`)."""
    if kind == "ddp":
        return DDPStrategy()
    if kind == "tp":  # tensor parallel over every process (the module's configure_model plans)
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world)
    if kind in ("fsdp2", "hsdp"):
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return CPUFSDPStrategy(
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        use_orig_params=kind in ("fsdp1", "hybrid", "hybrid_zero2"),
        sharding_strategy=FSDP1_SHARDING.get(kind, "FULL_SHARD"),
        state_dict_type="sharded",  # ("full" crashed rank 0 on CPU)
    )


FITS_STARTED = [0]  # Trainers started in this process


def next_port(wait: float = 300.0) -> str:
    """A port free now, for the next Trainer: rank 0 picks one (below the ephemeral range,
    :func:`helpers.free_port`) and leaves it in the launch's :func:`ports_dir`; the others
    read it. (Counting up from one port collided with other multi-process tests.)"""
    FITS_STARTED[0] += 1
    folder = Path(os.environ["GNS_TEST_PORTS"])
    path = folder / f"port.{FITS_STARTED[0]}"
    if os.environ["GNS_TEST_RANK"] == "0":
        folder.mkdir(parents=True, exist_ok=True)
        port = str(free_port())
        Path(f"{path}.tmp").write_text(port)
        os.replace(f"{path}.tmp", path)
        return port
    deadline = time.monotonic() + wait
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 wrote no {path}")
        time.sleep(0.02)
    return path.read_text()


def run(
    root: str,
    kind: str,
    callbacks: list[pl.Callback],
    module: Module | None = None,
    ckpt_path: str | None = None,
    nodes: int = 1,
    **kwargs,
) -> tuple[pl.Trainer, Module]:
    """One fit on every rank (``nodes`` simulated nodes); each Trainer takes a fresh port (a
    second on the same one hangs: :func:`next_port`)."""
    os.environ["MASTER_PORT"] = next_port()
    torch.set_num_threads(1)
    kwargs.setdefault("max_steps", 12)
    world = int(os.environ["GNS_TEST_WORLD"])
    trainer = pl.Trainer(
        **trainer_kwargs(
            root,
            accelerator="cpu",
            devices=place(nodes),
            num_nodes=nodes,
            strategy=strategy_for(kind, world),
            callbacks=[*callbacks, CloseProcessGroup()],
            **kwargs,
        )
    )
    module = module or Module(kind)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


# -- the launching test's side -----------------------------------------------------------------
def launch(
    out: Path,
    configs: list[str],
    world: int = 2,
    timeout: float = 900,
    script: str = "sharded_run.py",
) -> list[dict]:
    """Every rank of tests/sharded_run.py, or another ``script`` of tests/ (LOCAL_RANK,
    WORLD_SIZE, MASTER_* set here: Lightning does not relaunch); each rank's results, by
    global rank."""
    port = free_port()  # (names the launch's folder of ports; each Trainer takes its own)
    here = Path(__file__).resolve().parent
    procs, logs = [], []
    for rank in range(world):
        env = rank_env(rank, port, here.parent, world)
        log = open(out.parent / f"log.rank{rank}", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        cmd = [sys.executable, str(here / script), str(out), *configs]
        procs.append(subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=log, stderr=log))
    try:
        codes = wait_all(procs, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
        shutil.rmtree(ports_dir(port), ignore_errors=True)
    tails = "".join((out.parent / f"log.rank{r}").read_text()[-3000:] for r in range(world))
    assert codes == [0] * world, tails
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]


def launch_once(
    factory: pytest.TempPathFactory,
    name: str,
    configs: list[str],
    world: int = 2,
    script: str = "sharded_run.py",
) -> list[dict]:
    """:func:`launch`, once per test session: under pytest-xdist a module's tests may be split
    between workers, and each would launch its own processes. The first worker to take the
    lock launches and leaves the results; the others read them."""
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by this session's workers
    folder = base / f"launch-{name}"
    folder.mkdir(exist_ok=True)
    done = folder / "ranks.json"
    with FileLock(str(folder / "lock")):
        if done.exists():
            return json.loads(done.read_text())
        ranks = launch(folder / "out.json", configs, world, script=script)
        done.write_text(json.dumps(ranks))
        return ranks


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Every process's exit code; as soon as one fails the others are stopped (they would
    wait for it in a collective until the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            return codes
        time.sleep(0.1)
    return [p.poll() for p in procs]


def per_example_grads(
    model: nn.Module | None = None,
    left_out: tuple[str, ...] = (),
    dataset: TensorDataset | None = None,
) -> Tensor:
    """Every example's gradient of the frozen net (or ``model``, on ``dataset``) over the
    parameters outside the ``left_out`` modules, (N, d) float64 (torch.func)."""
    from torch.func import functional_call, grad, vmap

    model = (net() if model is None else model).double()
    named = {
        k: v.detach()
        for k, v in model.named_parameters()
        if not any(k.startswith(f"{m}.") for m in left_out)
    }
    x, y, _ = (data() if dataset is None else dataset).tensors

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0).double(),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(named, x, y)
    return torch.cat([g[k].flatten(1) for k in named], dim=1)


def replay(per_example: Tensor, ranks: list[dict], accumulate: int, source: str) -> GNSTracker:
    """The estimator on the same micro-batches in float64: per step, every rank's micro-batches
    (or examples) are the small batches and the mean of the micro-batch means the big one."""
    tracker = GNSTracker(0.9)
    steps = len(ranks[0]["seen"]) // accumulate
    for s in range(steps):
        micro = [r["seen"][s * accumulate + i] for r in ranks for i in range(accumulate)]
        means = torch.stack([per_example[m].mean(0) for m in micro])
        big = float(means.mean(0).square().sum())
        b = len(micro[0])
        if source == "per_example":
            if s == 0:
                continue  # the structural check's step is not measured
            every = torch.cat([per_example[m] for m in micro])
            small, b_small = float(every.square().sum(1).mean()), 1.0
        else:
            small, b_small = float(means.square().sum(1).mean()), float(b)
        b_big = len(micro) * b
        g2 = torch.tensor([[grad_norm_sq(small, big, b_small, b_big)]], dtype=torch.float64)
        tr = torch.tensor([[trace_cov(small, big, b_small, b_big)]], dtype=torch.float64)
        tracker.update(g2, tr)
    return tracker
