"""GradientNoiseAnalyzer: the seed-000 API on real data, checked against exact and the callback."""

from __future__ import annotations

import math
import re
import runpy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, digits, exact_gns, mlp, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseAnalyzer, GradientNoiseScale

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "seeds" / "000_801fda80a7d9dfc5.txt"


def loader(batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    x, y = digits()
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def test_seed_example_runs_as_written(capsys) -> None:
    if not SEED.exists():
        pytest.skip(f"{SEED} not found (the project's seeds live in ../shared)")
    blocks = re.findall(r"```python\n(.*?)```", SEED.read_text(), flags=re.S)
    code = blocks[0].replace("from tensight.analyzers import", "from lightning_gns import")
    code += "\n" + blocks[1]  # the "Example" block that acts on the results
    env = {"model": mlp(), "criterion": nn.CrossEntropyLoss(), "data_loader": loader()}
    exec(compile(code, str(SEED), "exec"), env)
    out = capsys.readouterr().out
    assert "Collecting gradients: 1/30" in out and "Collecting gradients: 30/30" in out
    assert re.search(r"Gradient noise scale: \d+\.\d\d", out)
    assert "Optimal batch size:" in out
    assert env["results"]["num_batches"] == 30


def test_example_script_runs(capsys) -> None:
    runpy.run_path(str(ROOT / "examples" / "analyzer_example.py"), run_name="__main__")
    assert "Batch 128: Optimal =" in capsys.readouterr().out


def test_agrees_with_exact_and_with_the_callback(tmp_path) -> None:
    x, y = digits()
    truth = exact_gns(mlp(), x, y)
    res = GradientNoiseAnalyzer(mlp(), nn.CrossEntropyLoss(), loader(64), verbose=False).analyze(
        num_batches=56
    )
    assert res["gradient_noise_scale"] == pytest.approx(truth["b_simple"], rel=0.2)
    lo, hi = res["confidence_interval"]
    assert lo < res["gradient_noise_scale"] < hi
    assert res["grad_norm_sq"] == pytest.approx(truth["grad_norm_sq"], rel=0.2)
    assert res["gradient_variance"] == pytest.approx(truth["trace_cov"], rel=0.2)
    assert res["mean_gradient_norm"] == pytest.approx(math.sqrt(res["grad_norm_sq"]))
    assert res["current_batch_size"] == 64 and res["coverage"] == 1.0

    cb = GradientNoiseScale(ema_decay=0.98)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=8), callbacks=[cb])
    trainer.fit(Classifier(mlp(), batch_size=64))
    diff = abs(cb.b_simple - res["gradient_noise_scale"])
    both = math.hypot(cb.values.b_simple_se, res["gradient_noise_scale_se"])
    assert diff < 3 * both, (cb.b_simple, res["gradient_noise_scale"], both)


def test_leaves_the_model_exactly_as_found() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.2), nn.Linear(32, 10))
    model.eval()  # eval mode: BatchNorm uses running stats, so examples don't interact
    model[0].train()  # a mixed mode that must come back as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    analyzer = GradientNoiseAnalyzer(
        model, nn.CrossEntropyLoss(), loader(), train_mode=None, verbose=False
    )
    analyzer.analyze(5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_runs_on_the_models_device_and_reports_coverage() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(10))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(mlp(), Scale())  # Scale has no rule: torch.func covers it
    res = GradientNoiseAnalyzer(model, nn.CrossEntropyLoss(), loader(), verbose=False).analyze(3)
    assert res["left_out"] == {} and res["coverage"] == 1.0
    tied = nn.Sequential(mlp(), Scale())
    tied[1].gain = tied[0][2].bias  # one weight in two modules, one of them without a rule
    res = GradientNoiseAnalyzer(tied, nn.CrossEntropyLoss(), loader(), verbose=False).analyze(3)
    assert 0.5 < res["coverage"] < 1.0 and res["left_out"]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (mlp(), nn.CrossEntropyLoss(), []), "empty"),
        (lambda: (mlp(), nn.CrossEntropyLoss(reduction="none"), loader()), "reduction"),
        (lambda: (mlp(), nn.CrossEntropyLoss(), loader(batch_size=1)), "batch size 1"),
        (
            lambda: (
                nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)),
                nn.CrossEntropyLoss(),
                loader(),
            ),
            "examples interact",
        ),
    ],
)
def test_bad_inputs_get_clear_errors(make, match) -> None:
    model, criterion, data = make()
    with pytest.raises(ValueError, match=match):
        GradientNoiseAnalyzer(model, criterion, data, verbose=False).analyze(3)


def test_num_batches_must_be_positive() -> None:
    analyzer = GradientNoiseAnalyzer(mlp(), nn.CrossEntropyLoss(), loader(), verbose=False)
    with pytest.raises(ValueError, match="num_batches"):
        analyzer.analyze(num_batches=0)


def test_a_summing_function_criterion_is_named_and_declared() -> None:
    """A plain function that sums gets an error naming ``loss_reduction='sum'`` (not "examples
    interact"); declared, it gives the estimate of the module criterion that sums."""

    def summed(out, y):
        return nn.functional.cross_entropy(out, y, reduction="sum")

    with pytest.raises(ValueError, match="loss_reduction='sum'"):
        GradientNoiseAnalyzer(mlp(), summed, loader(), verbose=False).analyze(3)
    declared = GradientNoiseAnalyzer(
        mlp(), summed, loader(), verbose=False, loss_reduction="sum"
    ).analyze(5)
    module = GradientNoiseAnalyzer(
        mlp(), nn.CrossEntropyLoss(reduction="sum"), loader(), verbose=False
    ).analyze(5)
    assert declared["gradient_noise_scale"] == pytest.approx(module["gradient_noise_scale"])
    with pytest.raises(ValueError, match="leave loss_reduction out"):
        GradientNoiseAnalyzer(mlp(), nn.CrossEntropyLoss(), loader(), loss_reduction="sum")
    with pytest.raises(ValueError, match="train_mode"):
        GradientNoiseAnalyzer(mlp(), nn.CrossEntropyLoss(), loader(), train_mode="yes")  # type: ignore[arg-type]


def test_a_bfloat16_model_is_not_taken_for_interacting_examples() -> None:
    """The independence check allows a bfloat16 loss its own rounding."""
    x, y = digits()
    data = DataLoader(TensorDataset(x.bfloat16(), y), batch_size=32)
    low = GradientNoiseAnalyzer(mlp().bfloat16(), nn.CrossEntropyLoss(), data, verbose=False)
    full = GradientNoiseAnalyzer(mlp(), nn.CrossEntropyLoss(), loader(32, False), verbose=False)
    b_low, b_full = (a.analyze(20)["gradient_noise_scale"] for a in (low, full))
    assert b_low == pytest.approx(b_full, rel=0.1)
