"""DDP, FSDP1 and FSDP2 on 2 CPU processes (gloo): the callback's values against a float64
replay of the same micro-batches, the same values under every strategy, one collective per
logging step, no host read between, resume, a NaN on one rank; refusals (issue 17).

Both ranks of tests/sharded_run.py are launched here and run every configuration one after
another (the imports are paid once).
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sharded_setup import N, data, net, rank_env
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns.estimator import grad_norm_sq, trace_cov
from lightning_gns.norms.sharded import local_sq, refusal, sharding_of
from lightning_gns.tracker import GNSTracker

HERE = Path(__file__).parent
KINDS = ("ddp", "fsdp1", "fsdp1_flat", "fsdp2")
FITS = [f"fit:{k}:{a}:micro_batch" for k in KINDS for a in (1, 2)]
FITS += [f"fit:{k}:{a}:per_example" for k in ("ddp", "fsdp2") for a in (1, 2)]
OTHERS = ["resume:fsdp2", "resume:fsdp1", "nan:fsdp2"]


def launch(out: Path, configs: list[str], timeout: float = 900) -> list[dict]:
    """Both ranks (LOCAL_RANK, WORLD_SIZE, MASTER_* set here: Lightning does not relaunch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = 20000 + s.getsockname()[1] % 30000  # each Trainer takes the next port
    root = Path(__file__).resolve().parents[1]
    procs, logs = [], []
    for rank in (0, 1):
        env = rank_env(rank, port, root)
        log = open(out.parent / f"log.rank{rank}", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        cmd = [sys.executable, str(HERE / "sharded_run.py"), str(out), *configs]
        procs.append(subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=log, stderr=log))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    tails = "".join((out.parent / f"log.rank{r}").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], tails
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("sharded") / "out.json", FITS + OTHERS)


@pytest.fixture(scope="module")
def per_example() -> Tensor:
    """Every digit's gradient of the frozen net, (N, d) float64 (torch.func)."""
    model = net().double()
    named = {k: v.detach() for k, v in model.named_parameters()}
    x, y, _ = data().tensors

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0).double(),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(named, x, y)
    return torch.cat([g[k].flatten(1) for k in named], dim=1)


def replay(per_example: Tensor, r0: dict, r1: dict, accumulate: int, source: str) -> GNSTracker:
    """The estimator on the same micro-batches in float64: per step, every rank's micro-batches
    (or examples) are the small batches and the mean of the micro-batch means the big one."""
    tracker = GNSTracker(0.9)
    steps = len(r0["seen"]) // accumulate
    for s in range(steps):
        micro = [r["seen"][s * accumulate + i] for r in (r0, r1) for i in range(accumulate)]
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


@pytest.mark.slow
@pytest.mark.parametrize("config", FITS)
def test_values_equal_a_float64_replay_of_the_same_micro_batches(ranks, per_example, config):
    _, kind, acc, source = config.split(":")
    r0, r1 = (r[config] for r in ranks)
    assert r0["chosen_source"] == source and r0["coverage"] == 1.0 and r0["left_out"] == {}
    want = replay(per_example, r0, r1, int(acc), source).read()["model"]
    for r in (r0, r1):  # every rank holds the same state (pooled records)
        assert r["steps"] == want.steps and r["skipped"] == 0
        assert r["grad_norm_sq"] == pytest.approx(want.grad_norm_sq, rel=1e-4)
        assert r["grad_variance"] == pytest.approx(want.grad_variance, rel=1e-4)
        assert r["lower"] == pytest.approx(want.b_simple_lower, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("acc", [1, 2])
@pytest.mark.parametrize("source", ["micro_batch", "per_example"])
def test_every_strategy_logs_the_same_values(ranks, acc, source) -> None:
    kinds = KINDS if source == "micro_batch" else ("ddp", "fsdp2")
    got = [ranks[0][f"fit:{k}:{acc}:{source}"] for k in kinds]
    for r in got[1:]:
        for key in ("grad_norm_sq", "grad_variance", "b_simple", "logged_b_simple"):
            assert r[key] == pytest.approx(got[0][key], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("config", FITS)
def test_one_collective_per_logging_step_and_no_host_read_between(ranks, config) -> None:
    for r in ranks:
        assert r[config]["collectives"] == [1 if s % 4 == 0 else 0 for s in range(1, 13)]
        assert r[config]["host_reads"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1"])
def test_resume_under_fsdp_continues_the_estimate(ranks, kind) -> None:
    for r in ranks:
        res = r[f"resume:{kind}"]
        whole, first, resumed = res["whole"], res["first"], res["resumed"]
        assert resumed["steps"] == whole["steps"] > first["steps"]
        for key in ("grad_norm_sq", "grad_variance", "lower", "upper"):
            assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(ranks) -> None:
    r0, r1 = (r["nan:fsdp2"] for r in ranks)
    assert r0["skipped"] == r1["skipped"] == 1 and r0["steps"] == r1["steps"] == 11
    assert r0["grad_norm_sq"] == r1["grad_norm_sq"] and math.isfinite(r0["grad_norm_sq"])


# -- one process -------------------------------------------------------------------------------
def test_refusals_say_what_to_do_instead() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    model = nn.Linear(2, 2)
    tp = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    assert "tensor_parallel_size=1" in refusal(tp, model)
    dp = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    assert refusal(dp, model) is None
    deepspeed = type("DeepSpeedStrategy", (), {})()
    assert "FSDPStrategy" in refusal(deepspeed, model)
    assert sharding_of(model) == "none"


def test_a_process_share_of_a_replicated_gradient() -> None:
    t = torch.arange(4.0)
    assert float(local_sq(t)) == pytest.approx(14.0)
    assert float(local_sq(t, replicas=2)) == pytest.approx(7.0)  # DDP: each holds all of it
    assert local_sq(None) is None and local_sq(t.bfloat16()).dtype == torch.float32
    assert N % 32 == 0  # whole micro-batches on both ranks
