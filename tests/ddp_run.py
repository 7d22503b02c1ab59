"""Run GradientNoiseScale under DDP on 2 CPU processes (gloo); rank 0 writes JSON results.

Usage: python tests/ddp_run.py OUT.json SOURCE ACCUMULATE
       python tests/ddp_run.py OUT.json adaptive 1   (AdaptiveBatchSize; OUT.json.rank<r>)
       python tests/ddp_run.py OUT.json resizable 1   (the micro-batch grows; OUT.json.rank<r>)
       python tests/ddp_run.py OUT.json collectives 2   (Python-level collectives per step)
       python tests/ddp_run.py OUT.json routed 1   (long-context nanoGPT, simultaneous route)
(Lightning's strategy="ddp" relaunches this script in new processes, so tests call it in a
subprocess rather than importing it.)
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from helpers import (  # noqa: E402
    Classifier,
    CloseProcessGroup,
    digits,
    exact_gns,
    mlp,
    trainer_kwargs,
)

from lightning_gns import GradientNoiseScale  # noqa: E402
from lightning_gns.adaptive import AdaptiveBatchSize  # noqa: E402


class History(pl.Callback):
    """Each rank's accumulation at every optimizer step, and its final parameters' sum."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append((trainer.global_step, trainer.accumulate_grad_batches))


def ddp_trainer(out: str, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    """2 CPU processes (gloo), writing under the folder of ``out``."""
    torch.set_num_threads(1)
    kwargs["callbacks"] = [*callbacks, CloseProcessGroup()]
    return pl.Trainer(
        **trainer_kwargs(
            os.path.dirname(out), accelerator="cpu", devices=2, strategy="ddp", **kwargs
        )
    )


def adaptive(out: str) -> None:
    """Training (lr > 0) with AdaptiveBatchSize on 2 ranks; every rank writes its history."""
    gns = GradientNoiseScale(log_every_n_steps=5)
    ada = AdaptiveBatchSize(max_accumulate=8, min_steps_between=10, probe=128)
    history = History()
    trainer = ddp_trainer(out, max_steps=120, callbacks=[gns, ada, history])
    module = Classifier(mlp(), lr=0.05, batch_size=8)
    trainer.fit(module)
    result = {
        "rank": trainer.global_rank,
        "steps": history.steps,
        "changes": [c.new for c in ada.changes],
        "lr_scale": ada.lr_scale,
        "param_sum": float(sum(p.double().sum() for p in module.parameters())),
    }
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump(result, f)


class Indexed(pl.LightningModule):
    """The digits MLP on 100 examples drawn by a ResizableBatchSampler (Lightning puts a
    DistributedSampler inside it); records each batch's example indices."""

    def __init__(self) -> None:
        super().__init__()
        self.model = mlp()
        self.seen: list[tuple[int, list[int], int]] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append((self.current_epoch, idx.tolist(), self.trainer.accumulate_grad_batches))
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        from torch.utils.data import DataLoader, RandomSampler, TensorDataset

        from lightning_gns.adaptive.sampler import ResizableBatchSampler

        x, y = digits()
        data = TensorDataset(x[:100], y[:100], torch.arange(100))
        return DataLoader(data, batch_sampler=ResizableBatchSampler(RandomSampler(data), 4))


def resizable(out: str) -> None:
    """The micro-batch grows on 2 ranks (LoudNoise: always asked to); every rank writes what
    it drew, its changes and parameters."""
    from adaptive_helpers import LoudNoise

    gns = LoudNoise()
    ada = AdaptiveBatchSize(
        max_accumulate=2, max_micro_batch=16, rule="lower_bound", check_every_n_steps=3
    )
    trainer = ddp_trainer(out, max_epochs=2, callbacks=[gns, ada])
    module = Indexed()
    trainer.fit(module)
    result = {
        "rank": trainer.global_rank,
        "seen": module.seen,
        "changes": [(c.step, c.new_micro, c.new) for c in ada.changes],
        "batch_size": gns.batch_size,
        "param_sum": float(sum(p.double().sum() for p in module.parameters())),
    }
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump(result, f)


class CountCollectives(pl.Callback):
    """Collectives (torch.distributed functions) called from this package or torchmetrics, per
    optimizer step. DDP's gradient all-reduce (C++) and Lightning's own are not counted."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
             "broadcast", "reduce", "gather")  # fmt: skip

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}
        self.count = 0

    def setup(self, trainer, pl_module, stage) -> None:
        dist = torch.distributed
        for name in self.NAMES:
            setattr(dist, name, self._counted(getattr(dist, name)))

    def _counted(self, fn):  # noqa: ANN202
        def wrapper(*args, **kwargs):
            files = [f.filename for f in traceback.extract_stack()]
            if any("lightning_gns" in f or "torchmetrics" in f for f in files):
                self.count += 1
            return fn(*args, **kwargs)

        return wrapper

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self.per_step[step] = self.per_step.get(step, 0) + self.count
        self.count = 0


class AdamClassifier(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def collectives(out: str, accumulate: int) -> None:
    """Micro-batch and preconditioned measurements side by side: collectives per step."""
    gns = GradientNoiseScale(source="micro_batch", preconditioned=True, log_every_n_steps=5)
    counter = CountCollectives()
    trainer = ddp_trainer(
        out, max_steps=30, accumulate_grad_batches=accumulate, callbacks=[gns, counter]
    )
    trainer.fit(AdamClassifier(mlp(), lr=1e-3, batch_size=16))
    if trainer.global_rank == 0:
        result = {
            "per_step": [counter.per_step.get(s, 0) for s in range(1, 31)],
            "reads": gns.reads,
            "preconditioned_steps": gns.preconditioned_values.steps,
        }
        with open(out, "w") as f:
            json.dump(result, f)


def routed(out: str) -> None:
    """Per-example norms of a frozen nanoGPT whose Linears all take the simultaneous route;
    every rank writes the examples of its batches and the estimate."""
    from zoo import ZOO, Batches, ZooModule

    from lightning_gns.norms.simultaneous import RoutedForward

    torch.manual_seed(0)
    model, data, loss = ZOO["nanogpt_long_context"]()
    seen: set[str] = set()

    class Routed(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            for m in module.modules():
                if isinstance(m.__dict__.get("forward"), RoutedForward):
                    seen.add(type(m).__name__)

    cb, batches = GradientNoiseScale(source="per_example", ema_decay=0.9), Batches(data)
    trainer = ddp_trainer(out, max_steps=24, log_every_n_steps=8, callbacks=[cb, Routed(), batches])
    trainer.fit(ZooModule(model, data, loss, 16))
    result = {
        "world_size": trainer.world_size,
        "routed": sorted(seen),
        "coverage": cb.coverage,
        "b_simple": cb.b_simple,
        "batch_size": cb.batch_size,
        "steps": cb.values.steps,
        "skipped": cb.values.skipped,
        "batches": batches.seen,
    }
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump(result, f)


def main(out: str, source: str, accumulate: int) -> None:
    cb = GradientNoiseScale(ema_decay=0.98, source=source, log_every_n_steps=10)
    trainer = ddp_trainer(out, max_epochs=8, accumulate_grad_batches=accumulate, callbacks=[cb])
    trainer.fit(Classifier(mlp(), batch_size=16))
    if trainer.global_rank == 0:
        x, y = digits()
        result = {
            "world_size": trainer.world_size,
            "chosen_source": cb.chosen_source,
            "b_simple": cb.b_simple,
            "grad_norm_sq": cb.grad_norm_sq,
            "grad_variance": cb.grad_variance,
            "batch_size": cb.batch_size,
            "small_batch_size": float(trainer.callback_metrics["gns/small_batch_size"]),
            "steps": cb.values.steps,
            "truth": exact_gns(mlp(), x, y),
        }
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[2] == "adaptive":
        adaptive(sys.argv[1])
    elif sys.argv[2] == "resizable":
        resizable(sys.argv[1])
    elif sys.argv[2] == "routed":
        routed(sys.argv[1])
    elif sys.argv[2] == "collectives":
        collectives(sys.argv[1], int(sys.argv[3]))
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
