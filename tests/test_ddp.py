"""DDP with 2 CPU processes (gloo): rank-local statistics plus one all-reduce at logging steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import rank_results, run_script
from zoo import ZOO, b_simple_on_batches, per_example_grads

pytestmark = pytest.mark.slow  # make test-fast leaves these out

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run_ddp(tmp_path: Path, source: str, accumulate: int) -> dict | None:
    out = tmp_path / "result.json"
    run_script(SCRIPT, out, source, accumulate, cwd=tmp_path)
    return json.loads(out.read_text()) if out.exists() else None


@pytest.mark.parametrize(
    "source,accumulate,batch_size",
    [("micro_batch", 1, 32), ("micro_batch", 2, 64), ("per_example", 1, 32)],
)
def test_ddp_matches_exact(tmp_path, source, accumulate, batch_size) -> None:
    r = run_ddp(tmp_path, source, accumulate)
    assert r is not None
    assert r["world_size"] == 2 and r["chosen_source"] == source
    assert r["batch_size"] == batch_size  # B_big = micro-batch × accumulation × world size
    assert r["small_batch_size"] == (16 if source == "micro_batch" else 1)  # one rank's
    truth = r["truth"]
    assert r["b_simple"] == pytest.approx(truth["b_simple"], rel=0.2)
    assert r["grad_norm_sq"] == pytest.approx(truth["grad_norm_sq"], rel=0.2)
    assert r["grad_variance"] == pytest.approx(truth["trace_cov"], rel=0.2)


def test_adaptive_batch_size_changes_on_every_rank_together(tmp_path) -> None:
    run_ddp(tmp_path, "adaptive", 1)
    ranks = rank_results(tmp_path / "result.json")
    assert ranks[0]["changes"], "the batch never grew: nothing to compare"
    assert ranks[0]["changes"] == ranks[1]["changes"]
    assert ranks[0]["steps"] == ranks[1]["steps"]  # same accumulation at every optimizer step
    assert ranks[0]["lr_scale"] == ranks[1]["lr_scale"] > 1
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-12)


def test_the_micro_batch_grows_on_every_rank_together(tmp_path) -> None:
    """A ResizableBatchSampler around Lightning's DistributedSampler: both ranks resize at the
    same step, every step has the same micro-batch size and accumulation on both, and each
    epoch still draws every example once across the ranks."""
    run_ddp(tmp_path, "resizable", 1)
    ranks = rank_results(tmp_path / "result.json")
    assert ranks[0]["changes"] == ranks[1]["changes"]
    assert [(c[1], c[2]) for c in ranks[0]["changes"]] == [(8, 1), (16, 1), (16, 2)]
    shape = [[[e, len(i), a] for e, i, a in r["seen"]] for r in ranks]
    assert shape[0] == shape[1]
    for epoch in (0, 1):
        drawn = [i for r in ranks for e, idx, _ in r["seen"] if e == epoch for i in idx]
        assert sorted(drawn) == list(range(100))
    assert ranks[0]["batch_size"] == ranks[1]["batch_size"] == 16 * 2 * 2
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-12)


def test_one_all_reduce_per_logging_step_and_none_between(tmp_path) -> None:
    """The model's and the preconditioned trackers are read with one reduction together."""
    r = run_ddp(tmp_path, "collectives", 2)
    assert r is not None
    per_step = r["per_step"]  # optimizer steps 1..30
    assert r["reads"] == 6 and r["preconditioned_steps"] > 0
    assert per_step == [1 if (i + 1) % 5 == 0 else 0 for i in range(30)], per_step


def test_simultaneous_route_under_ddp_matches_exact(tmp_path) -> None:
    """The routed Linears' weight gradients go through DDP's buckets like autograd's, and the
    two ranks' per-example norms give exactly the estimate that exact per-example gradients
    give on the same global batches (frozen nanoGPT, long context)."""
    run_ddp(tmp_path, "routed", 1)
    ranks = rank_results(tmp_path / "result.json")
    r = ranks[0]
    assert r["world_size"] == 2 and r["routed"] == ["Linear"] and r["coverage"] == 1.0
    assert r["batch_size"] == 32 and r["skipped"] == 0
    assert r["b_simple"] == ranks[1]["b_simple"]
    torch.manual_seed(0)
    model, data, loss = ZOO["nanogpt_long_context"]()
    per = per_example_grads(model, data, loss)
    # the global batch of a step: rank 0's examples, then rank 1's; the first step is the
    # structural check's, not estimated
    steps = [a + b for a, b in zip(r["batches"], ranks[1]["batches"], strict=True)][1:]
    assert r["steps"] == len(steps) == 23
    want = b_simple_on_batches(per, steps, 0.9)
    assert r["b_simple"] == pytest.approx(want, rel=1e-4)
    assert want != pytest.approx(b_simple_on_batches(per, steps[1:], 0.9), rel=1e-3)
