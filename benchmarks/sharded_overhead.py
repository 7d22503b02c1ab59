"""The callback's cost per optimizer step under DDP, FSDP1, FSDP2, both hybrids and tensor
parallelism (2 CPU processes, gloo; hybrid: 2 replicas of one process each, so each gradient
shard is a replica; tp: tensor parallel over both processes, the first Linear column-wise and
the second row-wise, so both see the same micro-batch of 64).

Both ranks are launched here; each fit is timed per optimizer step (median after warm-up),
with and without the callback, in the same pair of processes, plain runs before and after the
measured ones (their mean is the reference). Model: an MLP 256 → 1024 → 1024 → 10 on random
data, micro-batch 64 per rank.

    python benchmarks/sharded_overhead.py              # about 7 minutes on 2 cores
    python benchmarks/sharded_overhead.py hsdp hybrid  # only these strategies
    python benchmarks/sharded_overhead.py ddp tp       # DDP beside tensor parallel
    python benchmarks/sharded_overhead.py --clock cpu ddp tp  # each training thread's CPU
                                                       # time (a machine shared with others)
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
CONFIGS = [
    ("ddp", "micro_batch", 2),
    ("ddp", "per_example", 1),
    ("fsdp1", "micro_batch", 2),
    ("fsdp2", "micro_batch", 2),
    ("fsdp2", "per_example", 1),
    ("hsdp", "micro_batch", 2),
    ("hsdp", "per_example", 1),
    ("hybrid", "micro_batch", 2),
    ("tp", "micro_batch", 2),
    ("tp", "per_example", 1),
]
ONLY = "GNS_OVERHEAD_ONLY"  # the strategies to run, from the command line
CLOCK = "GNS_OVERHEAD_CLOCK"  # "cpu": the training thread's CPU time, else wall time
STEPS, WARMUP = 40, 8


def worker(out: str) -> None:
    sys.path.insert(0, str(TESTS))
    import lightning.pytorch as pl
    import sharded_setup
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gns import GradientNoiseScale

    class Mlp(sharded_setup.Module):
        def __init__(self, kind: str) -> None:
            super().__init__(kind)
            torch.manual_seed(0)
            self.model = nn.Sequential(
                nn.Linear(256, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(),
                nn.Linear(1024, 10),
            )  # fmt: skip

        def configure_model(self) -> None:
            if self.kind != "tp":
                return super().configure_model()
            from torch.distributed.tensor.parallel import (
                ColwiseParallel,
                RowwiseParallel,
                parallelize_module,
            )

            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.model, self.device_mesh["tensor_parallel"], plan)

        def train_dataloader(self) -> DataLoader:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(64 * 2 * (STEPS + 2) * 2, 256, generator=gen)
            y = torch.randint(0, 10, (x.shape[0],), generator=gen)
            return DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=64)

    now_of = time.thread_time if os.environ.get(CLOCK) == "cpu" else time.perf_counter

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0: float | None = None

        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            if self.t0 is None:
                self.t0 = now_of()

        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.fit_loop._should_accumulate():
                return
            now = now_of()
            assert self.t0 is not None
            self.times.append(now - self.t0)
            self.t0 = now

    def timed(kind: str, acc: int, cb: pl.Callback | None) -> float:
        clock = Clock()
        callbacks = [clock] + ([cb] if cb is not None else [])
        sharded_setup.run(
            f"/tmp/sharded_overhead/{kind}", kind, callbacks, module=Mlp(kind),
            max_steps=STEPS, accumulate_grad_batches=acc,
        )  # fmt: skip
        return statistics.median(clock.times[WARMUP:])

    results = {}
    timed("ddp", 1, None)  # warm-up: the first fit in a process pays one-off costs
    only = os.environ.get(ONLY, "").split()
    for kind, source, acc in CONFIGS:
        if only and kind not in only:
            continue
        plain = [timed(kind, acc, None)]
        gns = timed(kind, acc, GradientNoiseScale(source=source, log_every_n_steps=20))
        plain.append(timed(kind, acc, None))
        results[f"{kind} {source} acc{acc}"] = (statistics.mean(plain), gns)
    with open(f"{out}.rank{os.environ['LOCAL_RANK']}", "w") as f:
        json.dump(results, f)


def main() -> None:
    t0 = time.time()
    out = Path("/tmp/sharded_overhead/out.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = 20000 + s.getsockname()[1] % 30000
    sys.path.insert(0, str(TESTS))
    from sharded_setup import rank_env

    args, clock = sys.argv[1:], "wall"
    if args[:1] == ["--clock"]:
        clock, args = args[1], args[2:]
    procs = []
    for rank in (0, 1):
        env = {**rank_env(rank, port, HERE.parent), ONLY: " ".join(args), CLOCK: clock}
        cmd = [sys.executable, __file__, "--worker", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
    assert [p.wait() for p in procs] == [0, 0]
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    print(f"{'strategy, source':32s} {'plain ms/step':>14s} {'callback':>10s} {'ratio':>7s}")
    for key in ranks[0]:
        plain = statistics.mean(r[key][0] for r in ranks)
        gns = statistics.mean(r[key][1] for r in ranks)
        print(f"{key:32s} {1e3 * plain:14.1f} {1e3 * gns:10.1f} {gns / plain:7.3f}")
    what = "CPU time of the training thread" if clock == "cpu" else "step time"
    print(f"({time.time() - t0:.0f} s; median {what} after {WARMUP} warm-up steps, 2 ranks)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
