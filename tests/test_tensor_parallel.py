"""Tensor parallelism and 2-D data × tensor parallelism on 4 CPU processes (gloo), issue 28:
a transformer block under ``parallelize_module`` (column-wise q, k, v, w1; row-wise o, w2;
with and without ``SequenceParallel`` norms), alone (TP 4) and with ``fully_shard`` over the
data-parallel mesh (DP 2 × TP 2), through Lightning's ``ModelParallelStrategy``.

Against the same model unsharded: each example's squared norm (torch.func, float64) equals the
sum over its tensor-parallel group of the processes' per-example values; each step's Σ
|micro-batch gradient|² the sum of their shares; the logged estimate a float64 replay of the
same data-parallel batches. One launch of tests/tp_run.py runs every configuration.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from sharded_setup import launch_once, replay
from sharded_setup import per_example_grads as sharded_per_example_grads
from torch import Tensor, nn
from tp_run import BATCH, SP_NORMS, Net, data

from lightning_gns.norms.tensor_parallel import (
    NO_TP_RULE,
    SEQUENCE_PARALLEL,
    Layout,
    weights_for,
)

WORLD = 4
FITS = [
    "fit:1:tp:per_example:1",  # TP 4
    "fit:1:sp:per_example:1",
    "fit:1:tp:micro_batch:2",
    "fit:2:tp:per_example:1",  # DP 2 × TP 2, fully_shard over DP
    "fit:2:sp:per_example:1",
    "fit:2:tp:micro_batch:1",
    "fit:2:sp:micro_batch:2",
    "fit:2:tp:per_example:1:ac",  # the block under activation checkpointing
    "fit:2:tp:per_example:1:compile",  # the block compiled (then fully_shard)
]
LAYERED = ["fit:2:tp:per_example:1:layers", "fit:1:tp:per_example:1:layers"]  # per_layer
RESUME = "resume:2:tp"  # DP 2 × TP 2
REFUSE = "refuse:2"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch_once(
        tmp_path_factory, "tp", [*FITS, *LAYERED, RESUME, REFUSE], world=WORLD, script="tp_run.py"
    )


@functools.cache
def per_example_grads(left_out: tuple[str, ...]) -> Tensor:
    """Every example's gradient of the unsharded net over the covered parameters, (N, d)
    float64 (torch.func)."""
    return sharded_per_example_grads(Net(), left_out, data())


def groups(dp: int) -> list[list[int]]:
    """The tensor-parallel groups of Lightning's (data_parallel, tensor_parallel) mesh."""
    tp = WORLD // dp
    return [list(range(d * tp, (d + 1) * tp)) for d in range(dp)]


def split(config: str) -> tuple[int, str, str, int]:
    _, dp, plan, source, acc = config.split(":")[:5]
    return int(dp), plan, source, int(acc)


@pytest.mark.slow
@pytest.mark.parametrize("config", FITS)
def test_tensor_parallel_norms_equal_the_unsharded_model(ranks, config) -> None:
    """Per example (or per step's micro-batches), summed over each tensor-parallel group: the
    unsharded model's values to 1e-5; the logged estimate: the float64 replay to 1e-4."""
    dp, plan, source, acc = split(config)
    got = [r[config] for r in ranks]
    left = tuple(SP_NORMS) if plan == "sp" else ()
    assert all(r["chosen_source"] == source and r["skipped"] == 0 for r in got)
    recomputed = config.endswith(":ac")  # each micro-batch's block forward runs twice
    assert all(r["block_calls"] == len(r["seen"]) * (2 if recomputed else 1) for r in got)
    if config.endswith(":compile"):  # the block in one graph, no break
        assert all(r["graphs"] == 1 and r["graph_breaks"] == 0 for r in got), got[0]["graphs"]
    expected_left = {f"model.{m}": SEQUENCE_PARALLEL for m in left}
    assert all(r["left_out"] == expected_left for r in got), got[0]["left_out"]
    assert all((r["coverage"] == 1.0) == (plan == "tp") for r in got)
    assert got[0]["placements"] == (["S(0)"] if dp == 1 else ["_S(0, 2)", "S(0)"])  # FSDP × TP
    per_example = per_example_grads(left)
    sq = per_example.square().sum(1)
    for group in groups(dp):
        members = [got[r] for r in group]
        assert all(m["seen"] == members[0]["seen"] for m in members)  # the same examples
        seen = members[0]["seen"]
        rows = [m["rows"] for m in members]
        if source == "per_example":
            for i, idx in enumerate(seen):
                parts = torch.tensor([r[i] for r in rows], dtype=torch.float64) * BATCH**2
                want = sq[idx]
                torch.testing.assert_close(parts.sum(0), want, rtol=1e-5, atol=0)
                assert (parts.max(0).values < 0.9 * want).all()  # shards, not copies
        else:
            for s in range(len(seen) // acc):
                micro = seen[s * acc : (s + 1) * acc]
                want = sum(float(per_example[m].mean(0).square().sum()) for m in micro)
                parts = [r[s] * acc**2 for r in rows]
                assert sum(parts) == pytest.approx(want, rel=1e-5), (group, s)
                assert max(parts) < 0.9 * want
    leaders = [got[g[0]] for g in groups(dp)]  # one process per data-parallel rank
    want_gns = replay(per_example, leaders, acc, source).read()["model"]
    for rank, r in enumerate(got):
        where = f"{config} rank {rank}"
        assert r["steps"] == want_gns.steps, where
        assert r["grad_norm_sq"] == pytest.approx(want_gns.grad_norm_sq, rel=1e-4), where
        assert r["grad_variance"] == pytest.approx(want_gns.grad_variance, rel=1e-4), where
        assert r["collectives"] == [1 if s % 4 == 0 else 0 for s in range(1, 13)], where
        assert r["host_reads"] == 0, where  # (sp: not watched, the hooks' lean path runs)


@pytest.mark.slow
@pytest.mark.parametrize("config", LAYERED)
def test_per_layer_values_under_tensor_parallel_equal_the_unsharded_layers(ranks, config) -> None:
    """per_layer=True: every layer's logged |G|² and tr(Σ), on every process, equal the float64
    replay of that layer's own gradients on the unsharded model (column-wise, row-wise with
    its 1/TP bias, and layers outside the plan alike), to 1e-4."""
    dp, _, source, acc = split(config)
    got = [r[config] for r in ranks]
    per_example = per_example_grads(())
    names = [k for k, p in Net().named_parameters() if p.requires_grad]
    ends = torch.cumsum(torch.tensor([p.numel() for p in Net().parameters()]), 0).tolist()
    owner = [n.rsplit(".", 1)[0] for n in names]
    leaders = [got[g[0]] for g in groups(dp)]
    assert sorted(got[0]["layers"]) == sorted({f"model.{m}" for m in owner})
    for layer in sorted(set(owner)):
        cols = torch.cat(
            [
                torch.arange(e - p.numel(), e)
                for e, p, m in zip(ends, Net().parameters(), owner, strict=True)
                if m == layer
            ]
        )
        want = replay(per_example[:, cols], leaders, acc, source).read()["model"]
        for rank, r in enumerate(got):
            g2, tr, steps = r["layers"][f"model.{layer}"]
            where = f"{config} {layer} rank {rank}"
            assert steps == want.steps, where
            assert g2 == pytest.approx(want.grad_norm_sq, rel=1e-4), where
            assert tr == pytest.approx(want.grad_variance, rel=1e-4), where


@pytest.mark.slow
def test_resume_under_two_d_parallelism_continues_the_estimate(ranks) -> None:
    """A (distributed) checkpoint at step 6 of DP 2 × TP 2, resumed to step 12: the estimate
    and its interval equal those of the 12 steps at once, on every process."""
    for rank, r in enumerate(ranks):
        whole, first, resumed = (r[RESUME][k] for k in ("whole", "first", "resumed"))
        assert resumed["steps"] == whole["steps"] > first["steps"], rank
        for key in ("grad_norm_sq", "grad_variance", "lower", "upper"):
            assert resumed[key] == pytest.approx(whole[key], rel=1e-6), (rank, key)


@pytest.mark.slow
def test_tensor_parallel_without_fully_shard_over_data_parallel_ranks_is_refused(ranks) -> None:
    for r in ranks:
        assert "data_parallel_size=2" in r[REFUSE]["error"]
        assert "fully_shard" in r[REFUSE]["error"]


# -- one process -------------------------------------------------------------------------------
def test_each_layout_gets_its_weight_or_its_reason() -> None:
    """Column-wise: shards (1); row-wise: the weight's shard (1), the replicated bias 1/TP;
    outside the plan: 1/TP; replicated by the plan (SequenceParallel): left out."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Replicate, Shard

    layout = Layout(tp=2, world=4)
    mesh = SimpleNamespace(mesh_dim_names=("data_parallel", "tensor_parallel"))

    def laid(*placements: object) -> nn.Parameter:
        p = nn.Parameter(torch.zeros(1))
        p.device_mesh, p.placements = mesh, placements  # type: ignore[attr-defined]
        return p

    lin, ln = nn.Linear(2, 2), nn.LayerNorm(2)
    col = {"weight": laid(Shard(0), Shard(0)), "bias": laid(Shard(0), Shard(0))}
    row = {"weight": laid(Shard(0), Shard(1)), "bias": laid(Shard(0), Replicate())}
    seq = {"weight": laid(Shard(0), Replicate()), "bias": laid(Shard(0), Replicate())}
    plain = dict(lin.named_parameters())
    assert weights_for(lin, col, layout) == {"weight": 1.0, "bias": 1.0}
    assert weights_for(lin, row, layout) == {"weight": 1.0, "bias": 0.5}
    assert weights_for(lin, plain, layout) == {"weight": 0.5, "bias": 0.5}
    assert weights_for(ln, seq, layout) == SEQUENCE_PARALLEL
    assert weights_for(ln, {"weight": laid(Shard(0), Shard(0))}, layout) == NO_TP_RULE
    bad_row = {"weight": laid(Shard(0), Shard(1)), "bias": laid(Shard(0), Shard(0))}
    assert isinstance(weights_for(lin, bad_row, layout), str)


def test_a_process_share_of_each_gradient_counts_each_element_once() -> None:
    """Big batch: 1 / the processes holding each local element (world / Π shard dims); micro
    batch: its TP shard, or 1/TP of a gradient whole on the group; Partial: NaN."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from lightning_gns.norms import tensor_parallel as tpm

    def on(shape: tuple[int, ...], *placements: object) -> Tensor:
        t = torch.zeros(1)
        names = ("data_parallel", "tensor_parallel")[-len(shape) :]
        t.device_mesh = SimpleNamespace(shape=shape, mesh_dim_names=names)  # type: ignore[attr-defined]
        t.placements = placements  # type: ignore[attr-defined]
        return t

    strided = _StridedShard(0, split_factor=2)
    assert tpm.big_factor(on((2, 2), strided, Shard(0)), 4) == 1.0  # FSDP × column-wise
    assert tpm.big_factor(on((2, 2), Shard(0), Replicate()), 4) == 0.5  # × row-wise bias
    assert tpm.big_factor(on((2,), Shard(0)), 4) == 0.5  # outside the plan, on the DP mesh
    assert tpm.big_factor(torch.zeros(1), 4) == 0.25  # plain: whole everywhere
    assert math.isnan(tpm.big_factor(on((2,), Partial()), 2))
    assert tpm.micro_share(on((2,), Shard(1)), 2, "tensor_parallel") == 1.0
    assert tpm.micro_share(on((2,), Replicate()), 2, "tensor_parallel") == 0.5
    assert tpm.micro_share(torch.zeros(1), 2, "tensor_parallel") == 0.5
    assert math.isnan(tpm.micro_share(on((2,), Partial()), 2, "tensor_parallel"))
