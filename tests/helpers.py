"""Shared test helpers: the bundled digits, small models, exact references."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

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


class CloseProcessGroup(pl.Callback):
    """Closes the gloo process group at teardown. A worker that exits with it alive sometimes
    aborts in C++ ("terminate called without an active exception"), a torch exit race seen
    with ddp and ddp_spawn on CPU whatever the callbacks."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


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


def fit(
    cb: pl.Callback | None,
    tmp_path,
    module: pl.LightningModule | None = None,
    batch_size: int = 16,
    epochs: int | None = 6,
    callbacks: list | None = None,
    **kw,
) -> pl.Trainer:
    """One short CPU fit of ``module`` (default: the frozen digits classifier) with ``cb`` (or
    ``callbacks``); ``kw`` go to the Trainer (``max_steps`` replaces ``epochs``)."""
    if "max_steps" in kw:
        epochs = None
    callbacks = callbacks if callbacks is not None else [cb]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs, **kw), callbacks=callbacks)
    trainer.fit(module or Classifier(mlp(), batch_size=batch_size))
    return trainer


def per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Every example's gradient over all trainable parameters, (n, d) float64 (``torch.func``)."""
    named = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(named, x, y)
    return torch.cat([per[k].flatten(1).double() for k in named], dim=1)


def checked_step(model: nn.Module, x: Tensor, norms, check: bool = True, batch=None) -> tuple:
    """``norms`` (a PerExampleNorms) attached to ``model``: the structural check's micro-batch
    (unless ``check`` is False), then one measured micro-batch of ``x``, each the backward of
    Σ model(x)·w with w = linspace(-1, 1) over an example's outputs; detached after.
    ``close_micro_batch()``'s (per-example |g|², per-layer, reason) of the measured one."""

    def micro_batch() -> tuple:
        norms.start_micro_batch(x.shape[0])
        if check:
            norms.start_check(batch)
        out = model(x)
        (out * torch.linspace(-1, 1, out[0].numel()).view_as(out[0])).sum().backward()
        return norms.close_micro_batch()

    norms.attach()
    if check:
        micro_batch()
        model.zero_grad()
        check = False
    result = micro_batch()
    norms.detach()
    return result


def trained_mlp(steps: int = 30, seed: int = 0) -> nn.Module:
    """The digits MLP trained (full batch, Adam; loss 0.15 after 30 steps): B_simple ≈ 800."""
    x, y = digits()
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def simulate_per_example(
    grads: Tensor,
    batch: int,
    read_at: list[int],
    runs: int,
    seed: int = 0,
    ema_decay: float | None = None,
) -> tuple[float, dict[int, dict]]:
    """``runs`` data orders of batches drawn with replacement from the rows of ``grads``: per
    step the per-example source's record (mean |g_j|², |G_B|²) goes through the real tracker
    (one column per run), read after each step count in ``read_at``. Returns the truth
    tr(Σ)/|G|² and {steps: {run: GNSValues}}."""
    from lightning_gns.estimator import grad_norm_sq, trace_cov
    from lightning_gns.tracker import GNSTracker

    n = grads.shape[0]
    mean = grads.mean(0)
    truth = float((grads - mean).square().sum(1).mean() / mean.square().sum())
    gram = grads @ grads.T
    sq = gram.diagonal()
    gen = torch.Generator().manual_seed(seed)
    tracker = GNSTracker(ema_decay, columns=[str(r) for r in range(runs)])
    reads, done = {}, 0
    for stop in sorted(read_at):
        while done < stop:
            k = min(50, stop - done)
            idx = torch.randint(0, n, (k, runs, batch), generator=gen)
            small = sq[idx].mean(-1)  # (k, runs)
            big = gram[idx.unsqueeze(-1), idx.unsqueeze(-2)].mean((-1, -2))
            g2 = grad_norm_sq(small, big, 1.0, batch)
            tracker.update(g2, trace_cov(small, big, 1.0, batch))
            done += k
        reads[stop] = tracker.read()
    return truth, reads


def free_port() -> int:
    """A free TCP port below the system's ephemeral range, for a process group's store: no
    socket bound to port 0 or connecting out (gloo's pairs, another test's processes) is given
    one there, so none can take it between this choice and the store binding it (which, with
    an ephemeral port, hung a launch once in CI)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        port = rng.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def run_script(script: Path, *args: object, cwd: Path) -> None:
    """Run a test script (it starts its own processes) in a fresh interpreter of one thread,
    warnings off; fail with the end of its stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.setdefault("MASTER_PORT", str(free_port()))  # Lightning's launchers take it
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def rank_results(out: Path, world: int = 2) -> list[dict]:
    """What each process of a script wrote to ``{out}.rank{r}``."""
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
