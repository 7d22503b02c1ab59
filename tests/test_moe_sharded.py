"""Mixture-of-experts models per example under FSDP2 (fully_shard per decoder layer, 2 gloo CPU
processes), against a float64 replay of the same micro-batches from exact per-example
gradients and against the same run under DDP: coverage and values as on one device, for the
whole model and each MoE layer (routers, stacked experts, Qwen2-MoE's shared expert and its
gate), with the experts' rule taking the forward's gate call (``grouped_mm``) or recomputing
(``eager``).

One launch of tests/moe_sharded_run.py runs every configuration on both ranks."""

from __future__ import annotations

import pytest
import torch
from moe_sharded_run import built
from sharded_setup import launch_once, replay
from torch import Tensor
from zoo import per_example_grads

pytest.importorskip("transformers")

MODELS = ["mixtral:grouped_mm", "qwen2_moe:grouped_mm", "mixtral:eager"]
CONFIGS = [f"{kind}:{m}" for m in MODELS for kind in ("ddp", "fsdp2")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch_once(tmp_path_factory, "moe_sharded", CONFIGS, script="moe_sharded_run.py")


@pytest.fixture(scope="module")
def exact() -> dict[str, tuple[Tensor, dict[str, Tensor]]]:
    """Per model: every example's gradient (N, D) float64 (one backward each), and the columns
    of each module's own parameters."""
    out = {}
    for spec in MODELS:
        model, data, loss = built(*spec.split(":"))
        per = per_example_grads(model, data, loss)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        sizes = [p.numel() for p in model.parameters() if p.requires_grad]
        ends = torch.cumsum(torch.tensor(sizes), 0).tolist()
        starts = [0, *ends[:-1]]
        cols: dict[str, list[int]] = {}
        for n, s, e in zip(names, starts, ends, strict=True):
            cols.setdefault(n.rsplit(".", 1)[0], []).extend(range(s, e))
        out[spec] = (per, {k: torch.tensor(v) for k, v in cols.items()})
    return out


def _close(got: dict, want: object, rel: float) -> None:
    assert got["steps"] == want.steps
    assert got["grad_norm_sq"] == pytest.approx(want.grad_norm_sq, rel=rel)
    assert got["grad_variance"] == pytest.approx(want.grad_variance, rel=rel)


@pytest.mark.slow
@pytest.mark.parametrize("spec", MODELS)
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_moe_per_example_equals_a_float64_replay(ranks, exact, kind, spec) -> None:
    """Every parameter covered per example, nothing skipped; the whole model's and every MoE
    layer's |G|² and tr(Σ) those of exact per-example gradients on the same micro-batches."""
    config = f"{kind}:{spec}"
    r0, r1 = (r[config] for r in ranks)
    per, cols = exact[spec]
    for r in (r0, r1):
        assert r["chosen_source"] == "per_example"
        assert r["coverage"] == 1.0 and r["left_out"] == {}, r["left_out"]
        assert r["skipped"] == 0
    whole = replay(per, [r0, r1], 1, "per_example").read()["model"]
    layers = r0["layers"]
    assert any(k.endswith("experts") for k in layers) and any(k.endswith("gate") for k in layers)
    for r in (r0, r1):  # every rank holds the same state (pooled records)
        _close(r, whole, 1e-4)
        for name, got in r["layers"].items():
            module = name.removeprefix("model.")
            want = replay(per[:, cols[module]], [r0, r1], 1, "per_example").read()["model"]
            _close(got, want, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("spec", MODELS)
def test_moe_under_fsdp2_equals_ddp(ranks, spec) -> None:
    """The same micro-batches give the same values under FSDP2 as under DDP, per layer too."""
    ddp, fsdp2 = ranks[0][f"ddp:{spec}"], ranks[0][f"fsdp2:{spec}"]
    assert [r[f"fsdp2:{spec}"]["seen"] for r in ranks] == [r[f"ddp:{spec}"]["seen"] for r in ranks]
    assert set(fsdp2["layers"]) == set(ddp["layers"])
    for got, want in [(fsdp2, ddp)] + [
        (fsdp2["layers"][k], ddp["layers"][k]) for k in ddp["layers"]
    ]:
        assert got["steps"] == want["steps"]
        assert got["grad_norm_sq"] == pytest.approx(want["grad_norm_sq"], rel=1e-5)
        assert got["grad_variance"] == pytest.approx(want["grad_variance"], rel=1e-5)
