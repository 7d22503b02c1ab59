"""Defects users hit (issue 7), one test each: they failed before the fix."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import helpers
import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, CloseProcessGroup, digits, mlp, trainer_kwargs
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseAnalyzer, GradientNoiseScale


def caught_warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught]


def fit(cb, tmp_path, *args, **kw) -> pl.Trainer:
    kw.setdefault("epochs", 4)
    return helpers.fit(cb, tmp_path, *args, **kw)


class IndexFirst(Classifier):
    """Batches are (arange(7.), x, y): Lightning infers a batch size of 7."""

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        x, y = digits()
        gen = torch.Generator().manual_seed(self.seed)

        def collate(items):
            xs, ys = zip(*items, strict=True)
            return torch.arange(7.0), torch.stack(xs), torch.stack(ys)

        data = TensorDataset(x, y)
        return DataLoader(data, self.batch_size, shuffle=True, generator=gen, collate_fn=collate)


# 1 ----------------------------------------------------------------------------------------
def test_batch_size_fn_and_a_warning_when_the_inferred_size_is_wrong(tmp_path, truth) -> None:
    cb = GradientNoiseScale(ema_decay=0.98, source="micro_batch")
    said = caught_warnings(
        lambda: fit(cb, tmp_path, IndexFirst(mlp(), batch_size=16), accumulate_grad_batches=4)
    )
    assert any("taken as 7" in m and "see 16" in m and "batch_size_fn" in m for m in said)

    for acc in (4, 1):  # micro-batches; per-example norms
        cb = GradientNoiseScale(ema_decay=0.98, batch_size_fn=lambda batch: len(batch[1]))
        said = caught_warnings(
            lambda cb=cb, acc=acc: fit(
                cb, tmp_path, IndexFirst(mlp(), batch_size=16), accumulate_grad_batches=acc
            )
        )
        assert not any("taken as" in m for m in said)
        assert cb.batch_size == 16 * acc
        assert cb.b_simple == pytest.approx(truth["b_simple"], rel=0.2)


def test_the_follow_up_advice_fits_a_run_that_already_accumulates(tmp_path) -> None:
    """With accumulation already on, a wrong batch size leaves every layer out: the advice is
    batch_size_fn, not "set accumulate_grad_batches>=2" (which the user did)."""
    cb = GradientNoiseScale()
    said = caught_warnings(
        lambda: fit(cb, tmp_path, IndexFirst(mlp(), batch_size=16), accumulate_grad_batches=2)
    )
    note = [m for m in said if "cover none" in m]
    assert note and "batch_size_fn" in note[0] and "taken as 7" in note[0], said
    assert "accumulate_grad_batches>=2" not in note[0]


@pytest.mark.parametrize("compiled", [False, True])
def test_a_wrong_batch_size_never_breaks_a_forward_with_shared_positions(
    tmp_path, compiled
) -> None:
    """Positions (T,) are expanded to the batch size announced; expanded to a wrong one, the
    model's `tok_emb(ids) + pos_emb(arange(T))` broke. Now training runs, the embedding is left
    out with advice (the other layers too: none sees 7 examples), and the steps are skipped."""
    from zoo import ZooModule, nanogpt

    torch.manual_seed(0)
    model, data, loss = nanogpt()
    model = torch.compile(model) if compiled else model
    cb = GradientNoiseScale(source="per_example", batch_size_fn=lambda batch: 7)
    said = caught_warnings(
        lambda: pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4), callbacks=[cb]).fit(
            ZooModule(model, data, loss, 16)
        )
    )
    why = [v for k, v in cb.left_out.items() if k.endswith("pos_emb")]
    assert len(why) == 1 and "taken as 7" in why[0] and "sees 16" in why[0], cb.left_out
    assert any("taken as 7" in m and "see 16" in m and "batch_size_fn" in m for m in said)
    assert cb.values.steps == 0 and cb.values.skipped == 3  # (the first step is the check's)


def test_an_error_in_the_users_step_leaves_no_hook_and_compilation_on(tmp_path) -> None:
    """Lightning skips teardown when the user's step raises: on_exception cleans up, so no hook
    stays on the model and torch.compile is not left off (force_eager) in the process."""
    from zoo import ZooModule, nanogpt

    from lightning_gns._compat import eager_depth

    class Broken(ZooModule):
        def training_step(self, batch, batch_idx):
            self.loss(self.model, *batch)  # the forward ran, hooks and all
            raise ValueError("the user's bug")

    model, data, loss = nanogpt()
    cb = GradientNoiseScale(source="per_example")
    with pytest.raises(ValueError, match="the user's bug"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[cb]).fit(
            Broken(model, data, loss, 16)
        )
    assert eager_depth() == 0
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())


# 2 ----------------------------------------------------------------------------------------
class StepReport(pl.Callback):
    """Puts the worker's own estimator step count where the parent process can read it."""

    def __init__(self, gns: GradientNoiseScale) -> None:
        self.gns = gns

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.callback_metrics["test/estimator_steps"] = torch.tensor(
            float(self.gns.values.steps + self.gns.values.skipped)
        )
        trainer.callback_metrics["test/optimizer_steps"] = torch.tensor(float(trainer.global_step))


@pytest.mark.slow  # make test-fast leaves it out (a real fit or subprocess)
def test_ddp_spawn_keeps_state_per_process_and_returns_the_estimate(tmp_path, truth) -> None:
    cb = GradientNoiseScale(ema_decay=0.98, source="micro_batch", log_every_n_steps=10)
    trainer = fit(
        cb,
        tmp_path,
        epochs=6,
        callbacks=[cb, StepReport(cb), CloseProcessGroup()],
        devices=2,
        strategy="ddp_spawn",
    )
    metrics = trainer.callback_metrics  # Lightning returns these from the spawned workers
    assert float(metrics["test/estimator_steps"]) == float(metrics["test/optimizer_steps"])
    lower, upper = float(metrics["gns/b_simple_lower"]), float(metrics["gns/b_simple_upper"])
    assert 0 < lower <= truth["b_simple"] <= (upper if math.isfinite(upper) else math.inf)


# 3 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"examples_per_batch": 16 / 4},
        {"batch_size_multiple": 2.5},
        {"log_every_n_steps": 5.0},
        {"examples_per_batch": True},
        {"ema_decay": "0.9"},
        {"source": "per-example"},
        {"batch_size_fn": 3},
    ],
)
def test_arguments_that_would_crash_later_are_refused_at_construction(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GradientNoiseScale(**kwargs)


# 4 ----------------------------------------------------------------------------------------
def batchnorm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))


def test_batchnorm_in_train_mode_is_refused_per_example_and_measured_by_micro_batch(
    tmp_path,
) -> None:
    with pytest.raises(RuntimeError, match=r"BatchNorm.*accumulate_grad_batches"):
        fit(GradientNoiseScale(), tmp_path, Classifier(batchnorm_mlp(), batch_size=32))
    cb = GradientNoiseScale(ema_decay=0.95)
    fit(cb, tmp_path, Classifier(batchnorm_mlp(), batch_size=16), accumulate_grad_batches=2)
    assert cb.chosen_source == "micro_batch" and cb.coverage == 1.0
    assert math.isfinite(cb.b_simple) and cb.b_simple > 0


# 5 ----------------------------------------------------------------------------------------
class RandomGain(nn.Module):
    """A layer no rule knows and the torch.func fallback cannot replay (random per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 10) * 0.1)

    def forward(self, x):
        return nn.functional.dropout(x, 0.1, training=True) @ self.w


class OwnRMSNorm(nn.Module):
    """A norm layer of the user's own (as Llama's), not a subclass of a known one."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_clear_messages_for_models_and_batches_it_cannot_measure(tmp_path) -> None:
    said = caught_warnings(
        lambda: fit(GradientNoiseScale(), tmp_path, Classifier(RandomGain(), batch_size=32))
    )
    assert any("cover none" in m and "RandomGain" in m and "accumulate" in m for m in said)

    with pytest.raises(RuntimeError, match=r"layers='norm' found no normalization layer"):
        fit(GradientNoiseScale(layers="norm"), tmp_path, Classifier(mlp(), batch_size=32))
    model = nn.Sequential(nn.Linear(64, 32), OwnRMSNorm(32), nn.Linear(32, 10))
    cb = GradientNoiseScale(layers="norm")  # the user's own RMSNorm is found (a look-alike)
    fit(cb, tmp_path, Classifier(model, batch_size=32), epochs=1)
    assert cb.covered_parameters == [model[1].weight]

    cb = GradientNoiseScale()
    said = caught_warnings(lambda: fit(cb, tmp_path, batch_size=1, max_steps=5))
    assert any("one example" in m and "raise the batch size" in m for m in said)
    assert not any("one micro-batch" in m for m in said)


# 6 ----------------------------------------------------------------------------------------
def test_uncertainty_is_unknown_not_zero_after_one_estimate(tmp_path) -> None:
    cb = GradientNoiseScale(source="micro_batch", log_every_n_steps=1)
    trainer = fit(cb, tmp_path, max_steps=1, accumulate_grad_batches=2)
    assert cb.values.steps == 1
    assert math.isnan(float(trainer.callback_metrics["gns/b_simple_se"]))
    assert math.isnan(float(trainer.callback_metrics["gns/b_simple_lower"]))
    x, y = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    result = GradientNoiseAnalyzer(mlp(), nn.CrossEntropyLoss(), loader, verbose=False).analyze(1)
    assert all(math.isnan(b) for b in result["confidence_interval"])
    assert math.isnan(result["gradient_noise_scale_se"])


# 7 ----------------------------------------------------------------------------------------
def test_resume_with_another_decay_keeps_the_new_one_and_warns(tmp_path) -> None:
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = GradientNoiseScale(ema_decay=0.9)
    fit(first, tmp_path, epochs=1, callbacks=[first, ck], enable_checkpointing=True)
    cb = GradientNoiseScale(ema_decay=0.99)
    said = caught_warnings(
        lambda: pl.Trainer(
            **trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True),
            callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "ck2")],
        ).fit(Classifier(mlp(), batch_size=16), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    )
    assert any("resuming with ema_decay=0.99" in m and "0.9" in m for m in said)
    assert cb.ema_decay == 0.99 and cb.tracker.ema_decay == 0.99
    assert cb.values.steps > first.values.steps  # the smoothed state was carried over


# 8 ----------------------------------------------------------------------------------------
def test_batch_size_follows_an_accumulation_schedule_at_once(tmp_path) -> None:
    sched = GradientAccumulationScheduler(scheduling={0: 1, 2: 4})
    cb = GradientNoiseScale(log_every_n_steps=1)
    trainer = fit(cb, tmp_path, epochs=3, callbacks=[cb, sched])
    assert float(trainer.callback_metrics["gns/batch_size"]) == 64


# 9 ----------------------------------------------------------------------------------------
class TurnsNaN(Classifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 30 else loss


def test_non_finite_steps_warn_and_the_estimate_reports_its_age(tmp_path) -> None:
    cb = GradientNoiseScale(log_every_n_steps=10)
    said = caught_warnings(lambda: fit(cb, tmp_path, TurnsNaN(mlp(), lr=0.1), max_steps=60))
    assert any("non-finite" in m for m in said)
    assert cb.values.stale == 30 and cb.values.skipped == 30


# 10 ---------------------------------------------------------------------------------------
def test_pending_steps_are_flushed_when_logging_never_comes(tmp_path) -> None:
    seen: list[int] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen.append(gns.tracker.pending)

    gns = GradientNoiseScale(log_every_n_steps=10_000)
    fit(gns, tmp_path, batch_size=8, epochs=2, callbacks=[gns, Spy()])
    assert len(seen) > 400 and max(seen) <= gns.tracker.max_pending


# 11 ---------------------------------------------------------------------------------------
def test_the_last_step_is_logged_once(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    cb = GradientNoiseScale(log_every_n_steps=5)
    fit(cb, tmp_path, max_steps=20, logger=logger, log_every_n_steps=5)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        steps = [r["step"] for r in csv.DictReader(f) if r.get("gns/b_simple")]
    assert steps == ["4", "9", "14", "19"]  # the steps Lightning logs self.log values at


# 12 ---------------------------------------------------------------------------------------
def test_analyzer_takes_dropout_but_refuses_batchnorm_in_train_mode() -> None:
    x, y = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 10))
    result = GradientNoiseAnalyzer(dropout, nn.CrossEntropyLoss(), loader, verbose=False).analyze(8)
    assert math.isfinite(result["gradient_noise_scale"]) and result["num_batches"] == 8
    with pytest.raises(ValueError, match="examples interact"):
        GradientNoiseAnalyzer(batchnorm_mlp(), nn.CrossEntropyLoss(), loader).analyze(2)


def test_per_layer_under_micro_batches_says_why_nothing_per_layer_is_logged(tmp_path) -> None:
    cb = GradientNoiseScale(per_layer=True)
    said = caught_warnings(
        lambda: fit(cb, tmp_path, Classifier(batchnorm_mlp(), batch_size=16), epochs=1,
                    accumulate_grad_batches=2)
    )  # fmt: skip
    assert cb.chosen_source == "micro_batch" and cb.layer_values == {}
    assert any("per_layer=True" in m and "BatchNorm" in m for m in said), said


class BareParameter(Classifier):
    """The model's only parameter is its own (no layer holds it)."""

    def __init__(self) -> None:
        super().__init__(nn.Identity(), batch_size=32)
        self.w = nn.Parameter(torch.zeros(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(x @ self.w, y)


def test_a_bare_parameter_is_refused_at_fit_start_with_the_fix(tmp_path) -> None:
    with pytest.raises(RuntimeError, match=r"only parameters are its own.*accumulate"):
        fit(GradientNoiseScale(), tmp_path, BareParameter(), epochs=1)
    cb = GradientNoiseScale()  # between micro-batches it is measured
    fit(cb, tmp_path, BareParameter(), epochs=1, accumulate_grad_batches=2)
    assert cb.chosen_source == "micro_batch" and cb.values.steps > 10
