"""CriticalBatchProbe: the decision, the refusals, the logged keys, and a run that goes on bit
for bit as without the probe (one device here, DDP with 2 gloo processes in a subprocess)."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import rank_results, run_script, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger
from probe_helpers import Noisy, Trace, flat_state, seed_everything
from torch.utils.data import DataLoader, IterableDataset

from lightning_gns import CriticalBatchProbe, GradientNoiseScale, keys
from lightning_gns.probe import branches
from lightning_gns.probe.restore import Snapshot
from lightning_gns.report.summary import probe_lines

SCRIPT = Path(__file__).with_name("probe_ddp_run.py")


def probed_run(
    tmp_path: Path, probe: CriticalBatchProbe | None, module: pl.LightningModule | None = None,
    alone: bool = False, **kw: object,
) -> tuple[dict, pl.Trainer, GradientNoiseScale]:  # fmt: skip
    """16 steps of the noisy digits MLP (accumulating 2 micro-batches of 8), with a
    GradientNoiseScale (not when ``alone``) and the trace; the probe (if any) last."""
    seed_everything(0)
    module = module or Noisy(batch_size=8)
    trace, gns = Trace(), GradientNoiseScale(log_every_n_steps=4, summary=False)
    callbacks = [trace] + ([] if alone else [gns]) + ([probe] if probe is not None else [])
    kw = {"max_steps": 16, "accumulate_grad_batches": 2, **kw}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **kw), callbacks=callbacks)
    trainer.fit(module)
    return flat_state(module, trainer, trace), trainer, gns


def small_probe(**kw: object) -> CriticalBatchProbe:
    args = {"at_steps": [5, 11], "factors": (1, 2, 4), "examples": 128, "eval_batches": 4}
    return CriticalBatchProbe(**{**args, **kw})  # type: ignore[arg-type]


# -- the decision on synthetic losses -----------------------------------------------------


def test_b_crit_is_the_largest_batch_within_the_tolerance() -> None:
    ref = 2.0
    losses = {1: ref, 2: ref * 1.004, 4: ref * 1.009, 8: ref * 1.05, 16: ref * 1.2}
    assert branches.b_crit(losses, 32, 0.01) == 4 * 32
    assert branches.b_crit(losses, 32, 0.005) == 2 * 32
    assert branches.b_crit(losses, 32, 0.0) == 32  # k = 1 always holds
    assert branches.b_crit(losses, 32, 0.1) == 8 * 32
    assert branches.b_crit({**losses, 4: math.nan}, 32, 0.01) != branches.b_crit(losses, 32, 0.01)
    assert math.isnan(branches.b_crit({**losses, 4: math.nan}, 32, 0.01))


def test_bootstrap_brackets_the_estimate_and_widens_with_noise() -> None:
    rng = np.random.default_rng(1)
    means = {1: 1.0, 2: 1.003, 4: 1.008, 8: 1.02, 16: 1.06}
    batch, widths = 16, []
    shared = rng.normal(0, 0.05, 32)  # batch-to-batch difficulty, the same for every branch
    for noise in (0.0, 0.002, 0.01):
        per = {k: m + shared + rng.normal(0, noise, 32) for k, m in means.items()}
        point = branches.b_crit({k: float(np.mean(v)) for k, v in per.items()}, batch, 0.01)
        lower, upper = branches.bootstrap(per, batch, 0.01, draws=500, seed=0)
        assert lower <= point <= upper
        assert {lower / batch, upper / batch} <= set(means)  # ends on the k·B grid
        widths.append(math.log2(upper / lower))
    assert widths[0] == 0  # paired: the shared difficulty alone leaves no doubt
    assert widths[2] >= widths[1] and widths[2] > 0


def test_bootstrap_over_data_orders_holds_their_disagreement() -> None:
    rng = np.random.default_rng(2)
    flat = rng.normal(0, 0.001, 16)  # evaluation noise far below the tolerance
    orders = {1: [1.0 + flat] * 4, 2: [1.0 + flat + d for d in (0.0, 0.0, 0.03, 0.03)],
              4: [1.2 + flat] * 4}  # fmt: skip
    pooled = {k: np.mean(v, axis=0) for k, v in orders.items()}  # one order's view
    assert branches.bootstrap(pooled, 8, 0.01) == (8.0, 8.0)  # k = 2: 1.5% worse on average
    lower, upper = branches.bootstrap(orders, 8, 0.01)
    assert (lower, upper) == (8.0, 16.0)  # half the orders keep k = 2 within 1%


def test_default_examples_keep_two_probes_under_ten_percent() -> None:
    factors, batch = (1, 2, 4, 8), 64
    for steps in (5_000, 20_000, 100_000):
        planned = steps * batch
        eval_examples = 8 * batch  # the default 8 held-back micro-batches (no accumulation)
        e = branches.branch_examples(None, factors, batch, planned, eval_examples)
        assert e % (max(factors) * batch) == 0
        assert 2 * len(factors) * (e + eval_examples) / planned < 0.10
    short = branches.branch_examples(None, factors, batch, 100 * batch)  # 2 largest steps
    assert short == branches.MIN_LARGEST_STEPS * max(factors) * batch


def test_the_line_says_whether_the_advice_holds() -> None:
    r = branches.ProbeResult(2000, 32, 4096, {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.2}, 128.0, 64.0,
                             128.0, 10_000, 1.0, b_simple=100.0)  # fmt: skip
    assert branches.line(r).endswith("B_simple 100: the advice holds")
    r.b_simple = 20.0
    assert "below it" in branches.line(r)
    r.b_simple = 600.0
    assert "above it" in branches.line(r)
    r.b_crit = r.upper = 256.0  # the largest branch: only a lower bound
    assert "≥ 256" in branches.line(r)


# -- the run afterwards is bit-identical --------------------------------------------------


def test_the_run_is_bit_identical_with_the_probe(tmp_path: Path) -> None:
    plain, _, gns_plain = probed_run(tmp_path, None)
    probe = small_probe()
    probed, trainer, gns = probed_run(tmp_path, probe)
    assert [r.step for r in probe.results] == [5, 11]
    assert all(math.isfinite(r.b_crit) for r in probe.results)
    assert probed == plain  # parameters, Adam's state, StepLR, losses, every generator
    assert gns.b_simple == gns_plain.b_simple  # its hooks saw none of the branches
    assert math.isfinite(probe.results[1].b_simple)  # GradientNoiseScale's read at step 8


def test_the_branches_train_the_model_with_its_own_hooks(tmp_path: Path) -> None:
    def counted(tmp: Path, probe: CriticalBatchProbe | None) -> tuple[dict, int]:
        module, calls = Noisy(batch_size=8), [0]
        first = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        return probed_run(tmp, probe, module)[0], calls[0]

    plain, plain_calls = counted(tmp_path, None)
    probed, probed_calls = counted(tmp_path, small_probe(at_steps=[5]))
    assert probed_calls > plain_calls  # the user's hook ran in the branches too
    assert probed == plain


def test_the_evaluation_batches_stay_when_the_micro_batch_grows(tmp_path, monkeypatch) -> None:
    counts, bootstrap = [], branches.bootstrap

    def spy(per_batch, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        counts.append(len(per_batch[1][0]))
        return bootstrap(per_batch, *args, **kw)

    class Grown(pl.Callback):  # stands for AdaptiveBatchSize growing the micro-batch
        def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
            if trainer.global_step > 6:
                probe._micro = 32

    monkeypatch.setattr(branches, "bootstrap", spy)
    probe = small_probe()  # eval_batches=4 of the micro-batch of 8 at the first probe
    seed_everything(0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=12, accumulate_grad_batches=2),
                         callbacks=[Grown(), probe])  # fmt: skip
    trainer.fit(Noisy(batch_size=8))
    assert [r.step for r in probe.results] == [5, 11]
    assert counts == [4, 4]


def test_the_comparison_sees_a_probe_that_does_not_restore(tmp_path, monkeypatch) -> None:
    plain, _, _ = probed_run(tmp_path, None)
    monkeypatch.setattr(Snapshot, "restore", lambda self: None)
    broken, _, _ = probed_run(tmp_path, small_probe(at_steps=[5]))
    assert broken["params"] != plain["params"]


def test_a_probe_that_fails_warns_and_leaves_the_run_alone(tmp_path: Path) -> None:
    class FailsInEval(Noisy):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            if not self.training:
                raise ValueError("no eval here")
            return super().training_step(batch, batch_idx)

    plain, _, _ = probed_run(tmp_path, None, FailsInEval(batch_size=8))
    probe = small_probe()
    with pytest.warns(UserWarning, match="failed and was skipped.*no eval here"):
        probed, _, _ = probed_run(tmp_path, probe, FailsInEval(batch_size=8))
    assert probe.results == []
    assert probed == plain


def test_a_probe_whose_copy_runs_out_of_memory_is_skipped(tmp_path, monkeypatch) -> None:
    def no_memory(*args: object) -> Snapshot:
        raise torch.OutOfMemoryError("CUDA out of memory (the snapshot)")

    plain, _, _ = probed_run(tmp_path, None)
    monkeypatch.setattr(Snapshot, "take", no_memory)
    probe = small_probe()
    with pytest.warns(UserWarning, match="failed and was skipped.*out of memory"):
        probed, _, _ = probed_run(tmp_path, probe)
    assert probe.results == [] and probed == plain


def test_rates_follow_the_adaptive_rule(tmp_path: Path) -> None:
    adam, sgd = small_probe(at_steps=[5]), small_probe(at_steps=[5])
    probed_run(tmp_path, adam, max_steps=6)
    probed_run(tmp_path, sgd, Noisy(batch_size=8, lr=0.05, sgd=True), max_steps=6)
    assert adam.results[0].lr_scales == {k: pytest.approx(math.sqrt(k)) for k in (1, 2, 4)}
    assert sgd.results[0].lr_scales == {k: pytest.approx(k) for k in (1, 2, 4)}  # momentum
    assert adam.results[0].batch == 16  # micro-batch 8 × accumulation 2


def test_every_n_steps_and_the_checkpointed_results(tmp_path: Path) -> None:
    probe = small_probe(at_steps=[], every_n_steps=6)
    probed_run(tmp_path, probe, max_steps=13)
    assert [r.step for r in probe.results] == [6, 12]
    again = small_probe(at_steps=[1])
    again.load_state_dict(probe.state_dict())
    assert again.results == probe.results and again.spent == probe.spent > 0


def test_a_run_resumed_at_a_probed_step_does_not_probe_it_again(monkeypatch) -> None:
    """Accumulating, the first micro-batch after a resume at probed step 5 ends at step 5."""
    probe = small_probe()
    calls: list[int] = []
    monkeypatch.setattr(probe, "probe", lambda trainer, module: calls.append(trainer.global_step))
    trainer, batch = SimpleNamespace(global_step=5, world_size=1), torch.zeros(8, 2)
    probe.on_train_batch_end(trainer, None, None, batch, 0)  # type: ignore[arg-type]
    assert calls == [5]
    again = small_probe()
    again.load_state_dict(probe.state_dict())
    monkeypatch.setattr(again, "probe", lambda trainer, module: calls.append(trainer.global_step))
    again.on_train_batch_end(trainer, None, None, batch, 0)  # type: ignore[arg-type]
    assert calls == [5]


@pytest.mark.slow
def test_bit_identical_under_ddp(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    run_script(SCRIPT, out, cwd=tmp_path)
    ranks = rank_results(out)
    for r in ranks:
        assert r["world_size"] == 2
        assert r["probed"] == r["plain"]
        assert [s[0] for s in r["results"]] == [5, 10]
        assert r["results"][0][1] == 16  # 8 per rank × 2 ranks
    assert ranks[0]["results"] == ranks[1]["results"]  # the same decision on every rank
    assert ranks[0]["probed"]["params"] == ranks[1]["probed"]["params"]


def test_repeats_cost_their_share_and_restore_exactly(tmp_path: Path) -> None:
    plain, _, _ = probed_run(tmp_path, None)
    once, twice = small_probe(at_steps=[5]), small_probe(at_steps=[5], repeats=2)
    probed_run(tmp_path, once)
    probed, _, _ = probed_run(tmp_path, twice)
    assert probed == plain
    assert twice.results[0].spent == 2 * once.results[0].spent == 2 * 3 * (128 + 4 * 8)
    assert twice.results[0].losses != once.results[0].losses  # a second data order


# -- logging ------------------------------------------------------------------------------


def test_keys_are_logged_at_the_probed_step_and_the_line_printed(tmp_path, caplog) -> None:
    probe = small_probe()
    logger = CSVLogger(tmp_path, name="probe")
    with caplog.at_level(logging.INFO):
        _, trainer, _ = probed_run(tmp_path, probe, logger=logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): r for r in rows if r.get(keys.B_CRIT_BRANCHED)}
    assert sorted(logged) == [r.step for r in probe.results]
    for r in probe.results:
        row = logged[r.step]
        assert float(row[keys.B_CRIT_BRANCHED]) == r.b_crit
        assert float(row[keys.B_CRIT_BRANCHED_LOWER]) == r.lower <= r.b_crit
        assert float(row[keys.B_CRIT_BRANCHED_UPPER]) == r.upper >= r.b_crit
        assert float(row[keys.B_CRIT_BRANCHED_EXAMPLES]) == r.spent == 3 * (128 + 4 * 8)
        assert float(row[keys.B_CRIT_BRANCHED_SECONDS]) > 0
    assert float(trainer.callback_metrics[keys.B_CRIT_BRANCHED]) == probe.results[-1].b_crit
    text = caplog.text
    assert f"B_crit (branched, step {probe.results[-1].step})" in text
    assert f"{probe.spent:,} examples" in text and f"the run's {16 * 16:,}" in text


def test_the_report_lists_and_draws_the_probes(tmp_path: Path) -> None:
    from lightning_gns.report.cli import main
    from lightning_gns.report.logs import read_metrics
    from lightning_gns.report.plots import noise_scale_figure

    probe = small_probe()
    probed_run(tmp_path, probe, logger=CSVLogger(tmp_path / "logs", name="run"))
    df = read_metrics(tmp_path / "logs")
    lines = probe_lines(df)
    assert len(lines) == len(probe.results) == 2
    for line, r in zip(lines, probe.results, strict=True):
        assert f"step {r.step:,}) {r.b_crit:.0f} ({r.lower:.0f}–{r.upper:.0f})" in line
    assert "B_simple" in lines[1]  # read at step 8, before the probe at step 11
    fig = noise_scale_figure(df)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "B_crit (branched probe)" in labels
    assert main(["report", str(tmp_path / "logs"), "--out", str(tmp_path / "report")]) == 0


def test_tensorboard_gets_the_probe_charts(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    written: list[dict] = []
    logger = TensorBoardLogger(tmp_path, name="tb")
    logger.experiment.add_custom_scalars = written.append  # type: ignore[method-assign]
    probed_run(tmp_path, small_probe(at_steps=[5]), logger=logger, max_steps=6)
    assert written and "critical batch (branched)" in written[-1]  # the last layout is read
    charts = written[-1]["critical batch (branched)"]
    assert keys.B_CRIT_BRANCHED in charts["B_crit (branched) with its 95% interval"][1]
    assert "gradient noise scale B_simple" in written[-1]  # GradientNoiseScale's kept


# -- refusals -----------------------------------------------------------------------------


def test_refuses_manual_optimization(tmp_path: Path) -> None:
    class Manual(Noisy):
        def __init__(self) -> None:
            super().__init__(batch_size=8)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(RuntimeError, match="manual optimization.*use automatic optimization"):
        probed_run(tmp_path, small_probe(), Manual(), alone=True, accumulate_grad_batches=1)


class Stream(IterableDataset):
    def __iter__(self):  # noqa: ANN204
        g = torch.Generator().manual_seed(0)
        for _ in range(1000):
            yield torch.randn(64, generator=g), torch.randint(10, (), generator=g)


def test_refuses_an_iterable_loader_and_takes_a_dataset_instead(tmp_path: Path) -> None:
    class Streamed(Noisy):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(Stream(), batch_size=8)

    with pytest.raises(RuntimeError, match="map-style.*CriticalBatchProbe\\(dataset="):
        probed_run(tmp_path, small_probe(), Streamed())
    x, y = torch.randn(200, 64), torch.randint(10, (200,))
    data = torch.utils.data.TensorDataset(x, y)
    probe = small_probe(dataset=data)
    probed_run(tmp_path, probe, Streamed())
    assert [r.step for r in probe.results] == [5, 11]


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("strategy", object(), "cannot restore exactly.*strategy='ddp'"),
        ("precision", "16-mixed", "GradScaler.*'32-true'"),
    ],
)
def test_refuses_what_it_cannot_restore_exactly(field: str, value: object, match: str) -> None:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    trainer = SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu")),
                              precision="32-true")  # fmt: skip
    setattr(trainer, field, value)
    module = SimpleNamespace(automatic_optimization=True)
    with pytest.raises(RuntimeError, match=match):
        small_probe().on_fit_start(trainer, module)  # type: ignore[arg-type]


def test_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at_steps"):
        CriticalBatchProbe()
    with pytest.raises(ValueError, match="hold 1"):
        CriticalBatchProbe(at_steps=[10], factors=(2, 4))
    with pytest.raises(ValueError, match="tolerance"):
        CriticalBatchProbe(at_steps=[10], tolerance=-1)
    # what was accepted and then did something else: never probed, coerced, a rate rule typo
    for kwargs, match in [
        ({"at_steps": [0]}, "at_steps"),
        ({"at_steps": [-3]}, "at_steps"),
        ({"at_steps": [5.7]}, "at_steps"),
        ({"at_steps": ["7"]}, "at_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"every_n_steps": 0}, "every_n_steps must be an int ≥ 1, got 0"),
        ({"at_steps": [10], "examples": 2.5}, "examples"),
        ({"at_steps": [10], "eval_batches": 3.5}, "eval_batches"),
        ({"at_steps": [10], "repeats": 0}, "repeats"),
        ({"at_steps": [10], "lr_scaling": "Sqrt"}, "lr_scaling"),
    ]:
        with pytest.raises(ValueError, match=match):
            CriticalBatchProbe(**kwargs)
    assert CriticalBatchProbe(every_n_steps=5, examples=64).examples == 64


@pytest.mark.parametrize("name", ["branches", "callback", "restore", "runner"])
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module(f"lightning_gns.probe.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 0 and result.failed == 0
