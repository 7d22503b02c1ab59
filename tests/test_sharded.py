"""DDP, FSDP1 and FSDP2 on 2 CPU processes (gloo): the callback's values against a float64
replay of the same micro-batches, the same values under every strategy, one collective per
logging step, no host read between, resume, a NaN on one rank; refusals (issue 17).

Both ranks of tests/sharded_run.py are launched here and run every configuration one after
another (the imports are paid once).
"""

from __future__ import annotations

import math

import pytest
import torch
from sharded_setup import N, launch_once, per_example_grads, replay
from torch import Tensor, nn

from lightning_gns.norms.sharded import (
    MIXED_MESH,
    data_parallel_only,
    local_sq,
    refusal,
    replicas_of,
    sharding_of,
)

KINDS = ("ddp", "fsdp1", "fsdp1_flat", "fsdp2")
FITS = [f"fit:{k}:{a}:micro_batch" for k in KINDS for a in (1, 2)]
FITS += [f"fit:{k}:{a}:per_example" for k in ("ddp", "fsdp2") for a in (1, 2)]
OTHERS = ["resume:fsdp2", "resume:fsdp1", "resume:fsdp2:per_example", "nan:fsdp2"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch_once(tmp_path_factory, "sharded", FITS + OTHERS)


@pytest.fixture(scope="module")
def per_example() -> Tensor:
    return per_example_grads()


@pytest.mark.slow
@pytest.mark.parametrize("config", FITS)
def test_values_equal_a_float64_replay_of_the_same_micro_batches(ranks, per_example, config):
    _, kind, acc, source = config.split(":")
    r0, r1 = (r[config] for r in ranks)
    assert r0["chosen_source"] == source and r0["coverage"] == 1.0 and r0["left_out"] == {}
    want = replay(per_example, [r0, r1], int(acc), source).read()["model"]
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
@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1", "fsdp2:per_example"])
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


def test_hybrid_meshes_are_measured_and_tensor_parallel_placements_refused() -> None:
    """FSDP2 alone lays a parameter out as (Shard,) or, hybrid, (Replicate, …, Shard); a
    tensor-parallel dimension shows as a shard on an outer dimension or a replicate last."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    def laid(*placements: object) -> bool:
        return data_parallel_only(SimpleNamespace(placements=placements))  # type: ignore[arg-type]

    assert (
        laid(Shard(0)) and laid(Replicate(), Shard(0)) and laid(Replicate(), Replicate(), Shard(0))
    )
    assert not laid(Shard(0), Shard(0))  # FSDP × tensor parallel (colwise)
    assert not laid(Shard(0), Replicate())  # FSDP × a replicated tensor-parallel parameter
    assert not laid(Replicate(), Shard(0), Shard(1))  # hybrid × tensor parallel
    assert not laid(_StridedShard(0, split_factor=2)) and not laid()
    assert "fully_shard on a 1-D data-parallel mesh, or on a 2-D (replicate, shard)" in MIXED_MESH
    tp_only = nn.Linear(2, 2)  # parallelize_module without fully_shard: DTensors, no FSDP unit
    tp_only.weight.device_mesh, tp_only.weight.placements = object(), (Shard(0),)
    assert "fully_shard on a 1-D or (replicate, shard) mesh" in refusal(object(), tp_only)
    assert refusal(object(), nn.Linear(2, 2)) is None


def test_a_process_share_of_a_replicated_gradient() -> None:
    t = torch.arange(4.0)
    assert float(local_sq(t)) == pytest.approx(14.0)
    assert float(local_sq(t, replicas=2)) == pytest.approx(7.0)  # DDP: each holds all of it
    assert local_sq(None) is None and local_sq(t.bfloat16()).dtype == torch.float32
    assert replicas_of(4, 4) == 1 and replicas_of(2, 4) == 2 and replicas_of(None, 4) == 4
    assert N % 32 == 0  # whole micro-batches on both ranks
