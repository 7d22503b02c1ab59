"""GradientNoiseScale under DDP, FSDP1 and FSDP2 on 2 or 4 CPU processes (gloo): one rank.

Usage (every rank launched by tests/test_sharded.py or tests/test_hybrid.py with LOCAL_RANK,
GNS_TEST_RANK, WORLD_SIZE, MASTER_*):
    python tests/sharded_run.py OUT.json CONFIG ...
  CONFIG  fit:KIND:ACCUMULATE:SOURCE[:NODES]   12 frozen steps; values, data order,
                                               collectives, host reads (NODES simulated nodes:
                                               NODE_RANK and LOCAL_RANK set per process)
          resume:KIND[:SOURCE]         2 epochs at once, and 1 epoch + resume for the second
          nan:KIND                     rank 1's loss is NaN at step 5
  KIND    ddp | fsdp1 (use_orig_params=True) | fsdp1_flat (False) | fsdp2 | hsdp (FSDP2 on a
          (replicate, shard) mesh) | hybrid (FSDP1 HYBRID_SHARD, use_orig_params=True) |
          hybrid_zero2 (FSDP1 _HYBRID_SHARD_ZERO2)
Each rank writes OUT.json.rank<global rank>.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from sharded_setup import Module, run  # noqa: E402

from lightning_gns import GradientNoiseScale, forbid_host_sync  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast", "reduce", "gather", "reduce_scatter_tensor")  # fmt: skip


STRATEGY_CODE = ("torch/distributed/fsdp", "torch/nn/parallel/distributed")


def ours(stack: traceback.StackSummary) -> bool:
    """Whether this package made the call: its frame is the closest of the package's and the
    strategies' (FSDP's own reduction runs inside the backward that a package hook may wrap;
    hybrid sharding's all-reduce across replicas is FSDP's, not the package's)."""
    for frame in reversed(stack):
        if "lightning_gns" in frame.filename:
            return True
        if any(code in frame.filename for code in STRATEGY_CODE):
            return False
    return False


class CountCollectives(pl.Callback):
    """torch.distributed calls made from this package, per optimizer step (FSDP's and DDP's
    own collectives, and Lightning's, are not counted: :func:`ours`)."""

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}
        self.count = 0
        self.saved: dict[str, object] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dist = torch.distributed
        for name in COLLECTIVES:
            self.saved[name] = getattr(dist, name)
            setattr(dist, name, self._counted(getattr(dist, name)))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, fn in self.saved.items():
            setattr(torch.distributed, name, fn)

    def _counted(self, fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if ours(traceback.extract_stack()[:-1]):
                self.count += 1
            return fn(*args, **kwargs)

        return wrapper

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        step = trainer.global_step
        self.per_step[step] = self.per_step.get(step, 0) + self.count
        self.count = 0


def values(cb: GradientNoiseScale) -> dict:
    v = cb.values
    return {
        "grad_norm_sq": v.grad_norm_sq,
        "grad_variance": v.grad_variance,
        "b_simple": v.b_simple,
        "lower": v.b_simple_lower,
        "upper": v.b_simple_upper,
        "steps": v.steps,
        "skipped": v.skipped,
        "chosen_source": cb.chosen_source,
        "coverage": cb.coverage,
        "left_out": cb.left_out,
    }


class Layout(pl.Callback):
    """How the first Linear's weight is laid out, read at the start of training: FSDP2 mesh
    shape and placements, FSDP1 sharding strategy and shard-group size, or [] (DDP)."""

    def __init__(self) -> None:
        self.value: list = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        units = [m for m in trainer.model.modules() if isinstance(m, FullyShardedDataParallel)]
        weight = pl_module.model[0].weight
        if units:
            shard = torch.distributed.get_world_size(units[-1].process_group)
            self.value = [units[-1].sharding_strategy.name, shard]
        elif hasattr(weight, "placements"):
            self.value = [list(weight.device_mesh.shape), [str(p) for p in weight.placements]]


def fit(root: str, kind: str, accumulate: int, source: str, nodes: int = 1) -> dict:
    cb = GradientNoiseScale(ema_decay=0.9, source=source, log_every_n_steps=4)
    counter, seen = CountCollectives(), Layout()
    with forbid_host_sync(raise_at_exit=False) as found:
        trainer, module = run(
            root, kind, [cb, counter, seen], nodes=nodes, accumulate_grad_batches=accumulate
        )
    return {
        **values(cb),
        "seen": module.seen,
        "collectives": [counter.per_step.get(s, 0) for s in range(1, 13)],
        "host_reads": len(found),
        "logged_b_simple": float(trainer.callback_metrics["gns/b_simple"]),
        "layout": seen.value,
        "global_rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
    }


def resume(root: str, kind: str, source: str = "auto") -> dict:
    """The same two epochs, at once and with a checkpoint after the first."""
    cb = GradientNoiseScale(ema_decay=0.9, log_every_n_steps=5, source=source)
    run(f"{root}/whole", kind, [cb], max_epochs=2, max_steps=-1)
    whole = values(cb)
    ck = ModelCheckpoint(dirpath=f"{root}/ck", save_last=True)
    first = GradientNoiseScale(ema_decay=0.9, log_every_n_steps=5, source=source)
    run(f"{root}/first", kind, [first, ck], max_epochs=1, max_steps=-1, enable_checkpointing=True)
    second = GradientNoiseScale(ema_decay=0.9, log_every_n_steps=5, source=source)
    last = f"{root}/ck/last.ckpt"
    run(f"{root}/second", kind, [second], ckpt_path=last, max_epochs=2, max_steps=-1)
    return {"whole": whole, "first": values(first), "resumed": values(second)}


def nan(root: str, kind: str) -> dict:
    cb = GradientNoiseScale(ema_decay=0.9, log_every_n_steps=4)
    run(root, kind, [cb], module=Module(kind, nan_at=5))
    return values(cb)


def main(out: str, configs: list[str]) -> None:
    rank = int(os.environ["GNS_TEST_RANK"])
    root = os.path.dirname(os.path.abspath(out))
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for config in configs:
        mode, kind, *rest = config.split(":")
        where = f"{root}/{config.replace(':', '_')}"
        if mode == "fit":
            nodes = int(rest[2]) if len(rest) > 2 else 1
            results[config] = fit(where, kind, int(rest[0]), rest[1], nodes)
        elif mode == "resume":
            results[config] = resume(where, kind, *rest)
        elif mode == "nan":
            results[config] = nan(where, kind)
        results[config]["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
