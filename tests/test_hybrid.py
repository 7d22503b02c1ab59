"""Hybrid sharding and (simulated) multi-node runs on 4 CPU processes (gloo), issue 28: FSDP2 on
a (replicate, shard) mesh and FSDP1 ``HYBRID_SHARD`` log the DDP estimate of the same global
batches and a float64 replay of them; 2 nodes × 2 processes (``num_nodes=2``, ``NODE_RANK`` set
per process) log what one node of 4 processes logs.

One launch of tests/sharded_run.py runs every configuration (the imports are paid once);
resuming under both hybrids continues the estimate exactly.
"""

from __future__ import annotations

import pytest
from sharded_setup import launch_once, per_example_grads, replay

ONE_NODE = [
    "fit:ddp:1:micro_batch",
    "fit:hsdp:1:micro_batch",
    "fit:hybrid:1:micro_batch",
    "fit:ddp:2:micro_batch",
    "fit:hybrid:2:micro_batch",
    "fit:hybrid_zero2:2:micro_batch",
    "fit:ddp:1:per_example",
    "fit:hsdp:1:per_example",
    "fit:ddp:2:per_example",
    "fit:hsdp:2:per_example",
]
TWO_NODES = [
    "fit:ddp:1:micro_batch:2",
    "fit:fsdp2:1:per_example:2",
    "fit:hsdp:1:per_example:2",
    "fit:hybrid:2:micro_batch:2",
]
RESUMES = ["resume:hsdp", "resume:hybrid"]
KEYS = ("grad_norm_sq", "grad_variance", "b_simple", "logged_b_simple", "lower", "upper")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    configs = ONE_NODE + TWO_NODES + RESUMES
    return launch_once(tmp_path_factory, "hybrid", configs, world=4)


def same_as_ddp(config: str) -> str:
    """The DDP configuration on one node with the same accumulation and source."""
    _, _, acc, source, *_ = config.split(":")
    return f"fit:ddp:{acc}:{source}"


@pytest.mark.slow
def test_hybrid_and_two_nodes_log_the_ddp_estimate_and_the_replay(ranks) -> None:
    """Every rank: the layout asked for, DDP's values to 1e-5 (the same global batches), the
    float64 replay to 1e-4, one collective per logging step, no host read between."""
    per_example = per_example_grads()
    layouts = {
        "hsdp": [[2, 2], ["R", "S(0)"]],
        "fsdp2": [[4], ["S(0)"]],
        "hybrid": ["HYBRID_SHARD", 2],
        "hybrid_zero2": ["_HYBRID_SHARD_ZERO2", 2],
    }
    for config in ONE_NODE + TWO_NODES:
        _, kind, acc, source, *nodes = config.split(":")
        got = [r[config] for r in ranks]
        want = replay(per_example, got, int(acc), source).read()["model"]
        ddp = ranks[0][same_as_ddp(config)]
        for rank, r in enumerate(got):
            where = f"{config} rank {rank}"
            assert r["global_rank"] == rank and r["node_rank"] == (rank // 2 if nodes else 0)
            assert r["layout"] == layouts.get(kind, []), where
            assert r["chosen_source"] == source and r["coverage"] == 1.0, where
            assert r["steps"] == want.steps and r["skipped"] == 0, where
            assert r["grad_norm_sq"] == pytest.approx(want.grad_norm_sq, rel=1e-4), where
            assert r["grad_variance"] == pytest.approx(want.grad_variance, rel=1e-4), where
            for key in KEYS:
                assert r[key] == pytest.approx(ddp[key], rel=1e-5), f"{where}: {key}"
            assert r["collectives"] == [1 if s % 4 == 0 else 0 for s in range(1, 13)], where
            assert r["host_reads"] == 0, where


@pytest.mark.slow
@pytest.mark.parametrize("config", RESUMES)
def test_resume_under_hybrid_sharding_continues_the_estimate(ranks, config) -> None:
    """FSDP2 (distributed checkpoint) and FSDP1 (sharded state dict) on a 2 × 2 mesh: one
    epoch, a checkpoint, a resumed second epoch equal the two epochs at once, on every rank."""
    for r in ranks:
        whole, first, resumed = (r[config][k] for k in ("whole", "first", "resumed"))
        assert resumed["steps"] == whole["steps"] > first["steps"]
        for key in ("grad_norm_sq", "grad_variance", "lower", "upper"):
            assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key
