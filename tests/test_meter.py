"""GradientNoiseMeter in own loops: the callback's values on the same batches, the exact
reference on a frozen model, Fabric, DDP on 2 gloo processes, resume, refusals, host syncs."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers import Classifier, digits, fit, free_port, mlp, rank_results, run_script
from torch import nn
from torch.utils.data import DataLoader

from lightning_gns import GradientNoiseMeter, GradientNoiseScale, forbid_host_sync
from lightning_gns.host_sync import HostSyncError

TOL = 0.20  # the exact-reference bar of tests/test_callback.py
ROOT = Path(__file__).resolve().parents[1]
ACCUMULATE, BATCH, EPOCHS = 4, 16, 6


def loader() -> DataLoader:
    """The batches the callback's Classifier trains on, in the same order."""
    return Classifier(mlp(), batch_size=BATCH).train_dataloader()


def own_loop(
    meter_kw: dict, fabric: bool = False, counted: bool = False, bf16: bool = False
) -> GradientNoiseMeter:
    """Lightning's accumulation written out: the loss / 4, a step every 4 micro-batches and
    at the end of each epoch (a short last window), on the frozen digits MLP."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    data = loader()
    backward = torch.Tensor.backward
    if fabric:
        from lightning.fabric import Fabric

        f = Fabric(accelerator="cpu", devices=1)
        model, optimizer = f.setup(model, optimizer)
        data = f.setup_dataloaders(data)
        backward = f.backward
    meter = GradientNoiseMeter(model, accumulate=None if counted else ACCUMULATE, **meter_kw)
    for _ in range(EPOCHS):
        n = len(data)
        for i, (x, y) in enumerate(data):
            if counted and n - i <= n % ACCUMULATE:
                break  # counted: whole windows only (the loss is divided by the count)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.cross_entropy(model(x), y)
            backward(loss / ACCUMULATE)
            if (i + 1) % ACCUMULATE == 0 or i + 1 == n:
                meter.step()
                optimizer.step()
                optimizer.zero_grad()
    meter.read()
    return meter


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("source", ["micro_batch", "per_example"])
def test_meter_gives_the_callbacks_values_on_the_same_batches(source, tmp_path, truth) -> None:
    cb = GradientNoiseScale(ema_decay=0.98, source=source, log_every_n_steps=10, summary=False)
    fit(cb, tmp_path, accumulate_grad_batches=ACCUMULATE, epochs=EPOCHS)
    meter = own_loop({"ema_decay": 0.98, "source": source, "log_every_n_steps": 10})
    assert meter.chosen_source == cb.chosen_source == source
    assert meter.values.steps == cb.values.steps > 100
    assert meter.values.skipped == cb.values.skipped
    ours, theirs = meter.metrics(), cb.metrics()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not same(ours[k], theirs[k])] == []
    assert meter.b_simple == pytest.approx(truth["b_simple"], rel=TOL)
    assert meter.grad_norm_sq == pytest.approx(truth["grad_norm_sq"], rel=TOL)
    assert meter.grad_variance == pytest.approx(truth["trace_cov"], rel=TOL)


def test_fabric_single_device_gives_the_plain_loops_values(truth) -> None:
    plain = own_loop({"ema_decay": 0.98})
    fabric = own_loop({"ema_decay": 0.98}, fabric=True)
    assert fabric.chosen_source == "per_example" and fabric.batch_size == BATCH * ACCUMULATE
    assert fabric.b_simple == pytest.approx(plain.b_simple, rel=1e-9)
    assert fabric.b_simple == pytest.approx(truth["b_simple"], rel=TOL)


@pytest.mark.parametrize("source", ["micro_batch", "per_example"])
def test_counted_accumulation_matches_exact(source, truth) -> None:
    meter = own_loop({"ema_decay": 0.98, "source": source}, counted=True)
    assert meter.batch_size == BATCH * ACCUMULATE and meter.values.skipped == 0
    assert meter.b_simple == pytest.approx(truth["b_simple"], rel=TOL)
    assert meter.grad_variance == pytest.approx(truth["trace_cov"], rel=TOL)


@pytest.mark.parametrize("source", ["micro_batch", "per_example"])
def test_bf16_autocast_matches_exact(source, truth) -> None:
    meter = own_loop({"ema_decay": 0.98, "source": source}, counted=True, bf16=True)
    assert meter.values.skipped == 0
    assert meter.b_simple == pytest.approx(truth["b_simple"], rel=TOL)
    assert meter.grad_variance == pytest.approx(truth["trace_cov"], rel=TOL)


def run_steps(meter: GradientNoiseMeter, model: nn.Module, start: int, stop: int) -> None:
    x, y = digits()
    for i in range(start, stop):
        lo = (i * 32) % 1760
        nn.functional.cross_entropy(model(x[lo : lo + 32]), y[lo : lo + 32]).backward()
        meter.step()
        model.zero_grad()


@pytest.mark.parametrize("source", ["micro_batch", "per_example"])
def test_resume_is_exact(source, tmp_path) -> None:
    kw = {"ema_decay": 0.9, "source": source}  # accumulation counted (2 or 1 micro-batches)

    def meter_for(model: nn.Module) -> GradientNoiseMeter:
        return GradientNoiseMeter(model, log_every_n_steps=7, **kw)

    def steps(meter: GradientNoiseMeter, model: nn.Module, start: int, stop: int) -> None:
        if source == "per_example":
            return run_steps(meter, model, start, stop)
        x, y = digits()
        for i in range(start, stop):
            for half in (0, 1):
                lo = (i * 32 + half * 16) % 1760
                loss = nn.functional.cross_entropy(model(x[lo : lo + 16]), y[lo : lo + 16])
                (loss / 2).backward()
            meter.step()
            model.zero_grad()

    full_model = mlp()
    full = meter_for(full_model)
    steps(full, full_model, 0, 40)
    full.read()

    first_model = mlp()
    first = meter_for(first_model)
    steps(first, first_model, 0, 23)
    torch.save(first.state_dict(), tmp_path / "meter.pt")
    first.close()
    model = mlp()
    resumed = meter_for(model)
    resumed.load_state_dict(torch.load(tmp_path / "meter.pt"))
    steps(resumed, model, 23, 40)
    resumed.read()
    assert resumed.values.steps == full.values.steps == (40 if source == "micro_batch" else 39)
    assert resumed.reads > 0 and resumed.b_simple == pytest.approx(full.b_simple, rel=1e-9)
    assert resumed.grad_norm_sq == pytest.approx(full.grad_norm_sq, rel=1e-9)


def test_no_host_sync_between_read_outs() -> None:
    model = mlp()
    meter = GradientNoiseMeter(model, log_every_n_steps=10)
    with forbid_host_sync():
        run_steps(meter, model, 0, 25)
    assert meter.reads == 2
    # the check can fail: a read on the per-step path between read-outs is found
    meter._driver.listeners.append(lambda step: step is not None and step.big_part.item())  # type: ignore[union-attr]
    with pytest.raises(HostSyncError, match="item"), forbid_host_sync():
        run_steps(meter, model, 25, 28)


def test_a_forward_under_no_grad_is_not_a_micro_batch(truth) -> None:
    model = mlp()
    meter = GradientNoiseMeter(model, source="micro_batch", accumulate=2)
    x, y = digits()
    for i in range(20):
        for half in (0, 1):
            lo = (i * 32 + half * 16) % 1760
            (nn.functional.cross_entropy(model(x[lo : lo + 16]), y[lo : lo + 16]) / 2).backward()
            with torch.no_grad():
                model(x[:5])  # an evaluation in between
        meter.step()
        model.zero_grad()
    meter.read()
    assert meter.values.steps == 20 and meter.values.skipped == 0 and meter.batch_size == 32


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"accumulate": 0}, ValueError, r"accumulate must be a positive int or None, got 0"),
        ({"source": "fast"}, ValueError, r"source must be one of"),
        ({"log_every_n_steps": 0}, ValueError, r"log_every_n_steps must be a positive int"),
        (
            {"source": "micro_batch", "accumulate": 1},
            RuntimeError,
            r"GradientNoiseMeter\(accumulate=2\)",
        ),
    ],
)
def test_refusals_name_the_fix(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        GradientNoiseMeter(mlp(), **kwargs)


def test_batchnorm_without_accumulation_is_refused_with_the_meters_fix() -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    with pytest.raises(RuntimeError, match=r"BatchNorm.*GradientNoiseMeter\(accumulate=2\)"):
        GradientNoiseMeter(model)
    meter = GradientNoiseMeter(model, accumulate=2)  # the fix it names
    assert meter.chosen_source == "micro_batch"
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GradientNoiseMeter(lambda x: x)  # type: ignore[arg-type]


def test_fabric_fp16_loss_scaling_is_refused() -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")  # precision="16-mixed" on a GPU
    fabric = Fabric(accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    model = fabric.setup(mlp())
    with pytest.raises(RuntimeError, match="bf16-mixed"):
        GradientNoiseMeter(model)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,source,batch_size",  # B_big: micro-batch × accumulation × world size
    [
        ("ddp", "per_example", 32),
        ("fsdp", "micro_batch", 64),
        ("torch", "micro_batch", 64),
        ("fsdp2", "per_example", 32),
    ],
    ids=["fabric-ddp", "fabric-fsdp", "torch-ddp", "torch-fsdp2"],
)
def test_two_processes_match_exact(mode, source, batch_size, tmp_path, truth) -> None:
    out = tmp_path / "result.json"
    run_script(ROOT / "tests" / "meter_run.py", out, mode, free_port(), cwd=tmp_path)
    ranks = rank_results(out)
    r = ranks[0]
    assert r["world_size"] == 2 and r["chosen_source"] == source
    assert r["batch_size"] == batch_size
    assert r["small_batch_size"] == (1 if source == "per_example" else 16)
    assert r["skipped"] == 0 and r["steps"] > 80
    for key in ("b_simple", "grad_norm_sq", "grad_variance", "steps"):
        assert ranks[1][key] == r[key]  # pooled at read-out: every rank reads the same
    assert r["b_simple"] == pytest.approx(truth["b_simple"], rel=TOL)
    assert r["grad_norm_sq"] == pytest.approx(truth["grad_norm_sq"], rel=TOL)
    assert r["grad_variance"] == pytest.approx(truth["trace_cov"], rel=TOL)


def test_processes_whose_first_steps_left_out_different_modules_agree(tmp_path) -> None:
    """Under DDP the first forward calls ``aux`` on rank 0 only and ``twice`` twice on rank 1
    only, so each rank's structural check leaves out other modules (each would sum norms of
    other parameters). At the first reduction, here a checkpoint's after 3 steps (before the
    first read), they agree: both are left out on both ranks, in the checkpoint too, and the
    steps so far, which mixed them, are dropped: 9 of the 12 remain."""
    out = tmp_path / "result.json"
    run_script(ROOT / "tests" / "meter_run.py", out, "uneven", free_port(), cwd=tmp_path)
    ranks = rank_results(out)
    assert ranks[0]["left_out"] == ranks[1]["left_out"] == ["aux", "twice"], ranks
    assert ranks[0]["saved_left_out"] == ranks[1]["saved_left_out"] == ["aux", "twice"]
    assert ranks[0]["coverage"] == ranks[1]["coverage"] < 1.0
    assert ranks[0]["steps"] == ranks[1]["steps"] == 9 and ranks[0]["skipped"] == 0
    assert ranks[0]["b_simple"] == ranks[1]["b_simple"]


@pytest.mark.parametrize("example", ["fabric_gpt", "plain_loop"])
def test_examples_run_small_and_log_the_gns_keys(example, tmp_path, monkeypatch) -> None:
    from lightning_gns import read_metrics

    monkeypatch.chdir(tmp_path)
    small = ["--width", "32", "--layers", "1", "--seq-len", "32", "--micro-batch", "8"]
    argv = [example, "--steps", "12", "--log-every", "4", "--logdir", str(tmp_path / "logs")]
    argv += small
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "examples" / f"{example}.py"), run_name="__main__")
    metrics = read_metrics(tmp_path / "logs")
    logged = set(metrics["metric"])
    assert {"gns/b_simple_lower", "gns/grad_norm_sq", "gns/batch_size"} <= logged
    steps = sorted(set(metrics.loc[metrics["metric"] == "gns/batch_size", "step"]))
    assert steps == [4, 8, 12]
