"""GradientNoiseScale under tensor parallelism and 2-D data × tensor parallelism on CPU
processes (gloo), Lightning's ``ModelParallelStrategy``: one rank.

Usage (every rank launched by tests/test_tensor_parallel.py with LOCAL_RANK, GNS_TEST_RANK,
WORLD_SIZE, MASTER_*):
    python tests/tp_run.py OUT.json CONFIG ...
  CONFIG  fit:DP:PLAN:SOURCE:ACCUMULATE[:layers][:ac]
                 12 frozen steps of a transformer block, DP data-parallel ranks (fully_shard
                 over them when DP > 1) × world/DP tensor-parallel ones; layers: per_layer=True;
                 ac: the block under activation checkpointing (non-reentrant); compile:
                 the block compiled in place before fully_shard
          resume:DP:PLAN   two epochs of 6 steps per example, at once and resumed after one
          refuse:DP        tensor parallel, DP > 1, no fully_shard
  PLAN    tp (column-wise q, k, v, w1, head.0; row-wise o, w2, head.2) | sp (the same with
          SequenceParallel norms and row-wise outputs sharded over the sequence; run without
          the host-read check, so the per-example hooks take their lean path)
Each rank writes OUT.json.rank<global rank>: the logged values, each micro-batch's example
indices, this process's per-example squared norms (per-example source) or its share of each
step's Σ |micro-batch gradient|² (micro-batch source), collectives per step, host reads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import CloseProcessGroup, trainer_kwargs  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

D, HEADS, FF, T, F_IN, CLASSES = 16, 4, 32, 8, 7, 5
BATCH, N = 8, 256  # examples per micro-batch per data-parallel rank; examples in all


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        head = D // HEADS  # each process computes its own heads (-1: the local ones)
        q, k, v = (f(x).view(b, t, -1, head).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(D), Attention(), nn.LayerNorm(D)
        self.w1, self.w2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.w2(F.gelu(self.w1(self.ln2(x))))


class Pool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


class Net(nn.Module):
    """Input projection, one pre-norm transformer block, mean pool, an MLP head (its Linears
    see 2-D inputs)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.block, self.pool = nn.Linear(F_IN, D), Block(), Pool()
        self.head = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, CLASSES))
        with torch.no_grad():  # biases away from 0: a wrong bias rule shows
            for p in self.parameters():
                if p.dim() == 1:
                    p.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.block(self.inp(x))))


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, F_IN, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return TensorDataset(x, y, torch.arange(N))


SP_NORMS = ("block.ln1", "block.ln2")  # replicated, a sequence shard each: left out


def plan(kind: str) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    head = {"head.0": ColwiseParallel(), "head.2": RowwiseParallel()}
    if kind == "tp":
        col, row = ColwiseParallel, RowwiseParallel
        return {
            **{f"block.attn.{n}": col() for n in "qkv"},
            "block.attn.o": row(),
            "block.w1": col(),
            "block.w2": row(),
            **head,
        }
    seq = Shard(1)
    return {
        "block": PrepareModuleInput(
            input_layouts=Replicate(), desired_input_layouts=seq, use_local_output=True
        ),
        "block.ln1": SequenceParallel(),
        **{f"block.attn.{n}": ColwiseParallel(input_layouts=seq) for n in "qkv"},
        "block.attn.o": RowwiseParallel(output_layouts=seq),
        "block.ln2": SequenceParallel(),
        "block.w1": ColwiseParallel(input_layouts=seq),
        "block.w2": RowwiseParallel(output_layouts=seq),
        "pool": PrepareModuleInput(
            input_layouts=seq, desired_input_layouts=Replicate(), use_local_output=True
        ),
        **head,
    }


class Module(pl.LightningModule):
    """The frozen net (SGD, learning rate 0): ``parallelize_module`` on the tensor-parallel
    mesh, then ``fully_shard`` of the block and the root on the data-parallel one (DP > 1)."""

    def __init__(
        self, plan: str, shard: bool, checkpointed: bool = False, compiled: bool = False
    ) -> None:
        super().__init__()
        self.plan, self.shard, self.checkpointed = plan, shard, checkpointed
        self.compiled = compiled
        self.model = Net()
        self.seen: list[list[int]] = []
        self.block_calls = 0  # the block's forwards, recomputations included
        self.model.block.register_forward_pre_hook(lambda *_: self._count())

    def _count(self) -> None:
        self.block_calls += 1

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = self.device_mesh
        parallelize_module(self.model, mesh["tensor_parallel"], plan(self.plan))
        if self.checkpointed:  # the block's forward recomputed in the backward (non-reentrant)
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                checkpoint_wrapper,
            )

            self.model.block = checkpoint_wrapper(self.model.block)
        if self.compiled:  # in place, before fully_shard (torchtitan's order)
            self.model.block.compile()
        if self.shard:
            fully_shard(self.model.block, mesh=mesh["data_parallel"])
            fully_shard(self.model, mesh=mesh["data_parallel"])

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(), batch_size=BATCH, shuffle=False)


class Capture(pl.Callback):
    """This process's per-example squared norms of each micro-batch (backward units), or its
    share of each step's Σ |micro-batch gradient|², read from the callback's own source."""

    def __init__(self, gns: pl.Callback) -> None:
        self.gns, self.rows = gns, []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        source = self.gns._driver.source  # type: ignore[attr-defined]
        norms, rows = source.norms, self.rows
        if source.name == "per_example":
            close = norms.close_micro_batch

            def closed() -> tuple:
                acc, layers, bad = close()
                rows.append(None if acc is None else acc.detach().clone())
                return acc, layers, bad

            norms.close_micro_batch = closed
        else:
            take = norms.take

            def taken() -> Tensor | None:
                total = take()
                rows.append(None if total is None else total.detach().clone())
                return total

            norms.take = taken


def fit(
    root: str,
    dp: int,
    kind: str,
    source: str,
    accumulate: int,
    per_layer: bool = False,
    checkpointed: bool = False,
    compiled: bool = False,
) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from sharded_run import CountCollectives
    from sharded_setup import next_port, place

    from lightning_gns import GradientNoiseScale, forbid_host_sync

    os.environ["MASTER_PORT"] = next_port()
    torch.set_num_threads(1)
    world = int(os.environ["GNS_TEST_WORLD"])
    cb = GradientNoiseScale(ema_decay=0.9, source=source, log_every_n_steps=4, per_layer=per_layer)
    capture, counter = Capture(cb), CountCollectives()
    strategy = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=world // dp)
    trainer = pl.Trainer(
        **trainer_kwargs(
            root,
            devices=place(1),
            strategy=strategy,
            max_steps=12,
            accumulate_grad_batches=accumulate,
            callbacks=[cb, capture, counter, CloseProcessGroup()],
        )
    )
    module = Module(kind, shard=dp > 1, checkpointed=checkpointed, compiled=compiled)
    from torch._dynamo.utils import counters

    counters.clear()
    # sp: without the host-read check, so the hooks take their lean path (2-D Linear calls)
    watch = forbid_host_sync(raise_at_exit=False) if kind == "tp" else nullcontext([])
    with watch as found:
        trainer.fit(module)
    v = cb.values
    weight = module.model.block.w1.weight
    return {
        "grad_norm_sq": v.grad_norm_sq,
        "grad_variance": v.grad_variance,
        "b_simple": v.b_simple,
        "steps": v.steps,
        "skipped": v.skipped,
        "chosen_source": cb.chosen_source,
        "coverage": cb.coverage,
        "left_out": cb.left_out,
        "seen": module.seen,
        "block_calls": module.block_calls,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "rows": [None if r is None else r.tolist() for r in capture.rows],  # (after the fit)
        "collectives": [counter.per_step.get(s, 0) for s in range(1, 13)],
        "host_reads": len(found),
        "placements": [str(p) for p in weight.placements],
        "global_rank": trainer.global_rank,
        "layers": {
            k: [lv.grad_norm_sq, lv.grad_variance, lv.steps] for k, lv in cb.layer_values.items()
        },
    }


def refuse(root: str, dp: int) -> dict:
    """Tensor parallel with DP > 1 and no fully_shard: the refusal's message."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from sharded_setup import next_port, place

    from lightning_gns import GradientNoiseScale

    os.environ["MASTER_PORT"] = next_port()
    world = int(os.environ["GNS_TEST_WORLD"])
    strategy = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=world // dp)
    trainer = pl.Trainer(
        **trainer_kwargs(
            root,
            devices=place(1),
            strategy=strategy,
            max_steps=2,
            callbacks=[GradientNoiseScale(), CloseProcessGroup()],
        )
    )
    try:
        trainer.fit(Module("tp", shard=False))
    except RuntimeError as err:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return {"error": str(err)}
    return {"error": None}


def resume(root: str, dp: int, kind: str) -> dict:
    """Two epochs of 6 steps at once, and one with a (distributed) checkpoint at its end, then
    the second resumed from it (epochs, not steps: a fit stopped by ``max_steps`` at an
    epoch's last batch resumes inside that epoch)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from sharded_setup import next_port, place

    from lightning_gns import GradientNoiseScale

    torch.set_num_threads(1)
    world = int(os.environ["GNS_TEST_WORLD"])
    out = {}
    ck = f"{root}/ck"
    for part, epochs, ckpt in (("whole", 2, None), ("first", 1, None), ("resumed", 2, "last")):
        os.environ["MASTER_PORT"] = next_port()  # a new process group per fit
        cb = GradientNoiseScale(ema_decay=0.9, source="per_example", log_every_n_steps=4)
        extra = [ModelCheckpoint(dirpath=ck, save_last=True)] if part == "first" else []
        strategy = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=world // dp)
        trainer = pl.Trainer(
            **trainer_kwargs(
                f"{root}/{part}",
                devices=place(1),
                strategy=strategy,
                max_epochs=epochs,
                max_steps=-1,
                limit_train_batches=6,
                enable_checkpointing=bool(extra),
                callbacks=[cb, *extra, CloseProcessGroup()],
            )
        )
        path = f"{ck}/last.ckpt" if ckpt else None
        trainer.fit(Module(kind, shard=dp > 1), ckpt_path=path)
        v = cb.values
        out[part] = {
            "grad_norm_sq": v.grad_norm_sq,
            "grad_variance": v.grad_variance,
            "lower": v.b_simple_lower,
            "upper": v.b_simple_upper,
            "steps": v.steps,
        }
    return out


def main(out: str, configs: list[str]) -> None:
    rank = int(os.environ["GNS_TEST_RANK"])
    root = os.path.dirname(os.path.abspath(out))
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for config in configs:
        mode, dp, *rest = config.split(":")
        where = f"{root}/{config.replace(':', '_')}"
        if mode == "fit":
            flags = rest[3:]
            results[config] = fit(
                where,
                int(dp),
                *rest[:2],
                int(rest[2]),
                *(f in flags for f in ("layers", "ac", "compile")),
            )
        elif mode == "resume":
            results[config] = resume(where, int(dp), rest[0])
        else:
            results[config] = refuse(where, int(dp))
        results[config]["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
