"""The callback against exact references on a frozen model (learning rate 0) on real data."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, digits, exact_gns, fit, mlp, trainer_kwargs
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseScale

TOL = 0.20  # the bar: within 20% of the exact B_simple


def assert_close(cb: GradientNoiseScale, truth: dict[str, float], tol: float = TOL) -> None:
    assert cb.b_simple == pytest.approx(truth["b_simple"], rel=tol)
    assert cb.grad_norm_sq == pytest.approx(truth["grad_norm_sq"], rel=tol)
    assert cb.grad_variance == pytest.approx(truth["trace_cov"], rel=tol)


@pytest.mark.parametrize("source", ["micro_batch", "per_example"])
def test_accumulation_matches_exact(source, tmp_path, truth) -> None:
    cb = GradientNoiseScale(ema_decay=0.98, source=source)
    fit(cb, tmp_path, accumulate_grad_batches=4)
    assert cb.chosen_source == source
    assert_close(cb, truth)
    assert cb.values.steps > 100


def test_single_device_no_accumulation_uses_per_example(tmp_path, truth) -> None:
    cb = GradientNoiseScale(ema_decay=0.98)
    fit(cb, tmp_path, batch_size=64)
    assert cb.chosen_source == "per_example" and cb.coverage == 1.0
    assert_close(cb, truth)


def test_incomplete_last_window_and_changing_accumulation(tmp_path, truth) -> None:
    # 1797/50 → 36 micro-batches per epoch: windows of 4 leave none, of 5 leave one of 1,
    # of 7 leave one of 1 and sizes are uneven (the last micro-batch has 47 examples).
    sched = GradientAccumulationScheduler(scheduling={0: 4, 3: 5, 6: 7})
    cb = GradientNoiseScale(ema_decay=0.97, source="micro_batch")
    fit(cb, tmp_path, batch_size=50, epochs=10, callbacks=[cb, sched])
    assert_close(cb, truth)


def test_the_batch_size_of_an_epoch_shorter_than_the_accumulation(tmp_path) -> None:
    """``limit_train_batches=10`` with accumulation 16: Lightning steps at each epoch's end,
    after 10 micro-batches of 8, so a step has 80 examples (not 16 × 8)."""
    cb = GradientNoiseScale(source="micro_batch", log_every_n_steps=1)
    trainer = fit(cb, tmp_path, batch_size=8, epochs=3, limit_train_batches=10,
                  accumulate_grad_batches=16)  # fmt: skip
    assert cb.batch_size == 80 and trainer.callback_metrics["gns/batch_size"] == 80


def test_sum_reduction(tmp_path, truth) -> None:
    class SumLoss(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y, reduction="sum")

    for source in ("per_example", "micro_batch"):
        cb = GradientNoiseScale(ema_decay=0.98, source=source, loss_reduction="sum")
        fit(cb, tmp_path, module=SumLoss(mlp(), batch_size=16), accumulate_grad_batches=4)
        assert_close(cb, truth)


@pytest.mark.parametrize("source", ["micro_batch", "per_example"])
def test_amp_loss_scale_is_undone(source, tmp_path, truth) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    cb = GradientNoiseScale(ema_decay=0.98, source=source)
    fit(cb, tmp_path, plugins=[plugin], accumulate_grad_batches=4)
    assert_close(cb, truth, tol=0.25)  # fp16 forward changes the model's numbers a little


def test_overflow_step_is_skipped_and_counted(tmp_path) -> None:
    class Overflow(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 8 else loss

    # The GradScaler skips the optimizer step with inf/NaN gradients; so must the estimate.
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    cb = GradientNoiseScale(ema_decay=0.9, source="per_example", log_every_n_steps=1)
    trainer = fit(cb, tmp_path, module=Overflow(mlp(), batch_size=64), epochs=1, plugins=[plugin])
    assert cb.values.skipped == 1
    assert trainer.callback_metrics["gns/skipped_steps"].item() == 1.0
    assert math.isfinite(cb.b_simple)


def test_frozen_and_unused_parameters_are_ignored(tmp_path) -> None:
    class Partly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.unused = nn.Linear(3, 3)  # .grad stays None
            self.net[0].requires_grad_(False)

        def forward(self, x):
            return self.net(x)

    x, y = digits()
    model = Partly()
    names = [f"net.2.{n}" for n in ("weight", "bias")]
    ref = exact_gns(model, x, y, params=names)
    for source in ("micro_batch", "per_example"):
        torch.manual_seed(0)
        cb = GradientNoiseScale(ema_decay=0.98, source=source)
        fit(cb, tmp_path, module=Classifier(model, batch_size=16), accumulate_grad_batches=4)
        assert_close(cb, ref)


def test_logged_to_callback_metrics_and_every_n_steps(tmp_path) -> None:
    logged: list[int] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if "gns/b_simple" in trainer.callback_metrics:
                logged.append(trainer.global_step)
                trainer.callback_metrics.pop("gns/b_simple")

    cb = GradientNoiseScale(log_every_n_steps=5)
    trainer = fit(cb, tmp_path, batch_size=128, epochs=2, callbacks=[cb, Spy()])
    assert logged[:3] == [5, 10, 15]
    metrics = trainer.callback_metrics
    for key in ("b_simple_se", "grad_norm_sq", "grad_variance", "batch_size", "coverage"):
        assert f"gns/{key}" in metrics
    assert metrics["gns/batch_size"] == 128  # not the short last batch of 5
    assert metrics["gns/optimal_batch_size"] in (16, 32, 64)


def test_resume_from_checkpoint_continues_the_estimate(tmp_path) -> None:
    def run(epochs: int, root, ckpt=None, callbacks=()):
        cb = GradientNoiseScale(ema_decay=0.95, source="micro_batch")
        trainer = pl.Trainer(
            **trainer_kwargs(
                root, max_epochs=epochs, accumulate_grad_batches=4, enable_checkpointing=True
            ),
            callbacks=[cb, *callbacks],
        )
        trainer.fit(Classifier(mlp(), batch_size=32, shuffle=False), ckpt_path=ckpt)
        return cb

    full = run(4, tmp_path / "full")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    run(2, tmp_path / "a", callbacks=[ckpt_cb])
    resumed = run(4, tmp_path / "b", ckpt=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.values.steps == full.values.steps
    assert resumed.b_simple == pytest.approx(full.b_simple, rel=1e-9)


def test_a_reused_callback_starts_afresh_in_another_fit(tmp_path) -> None:
    """One callback object in two different fits (a sweep): the second run's estimate is its
    own, as a fresh callback's; a checkpoint into it still wins, and the same trainer's next
    fit continues."""

    def run(cb: GradientNoiseScale, epochs: int, root, ckpt=None, callbacks=()) -> pl.Trainer:
        trainer = pl.Trainer(
            **trainer_kwargs(
                root, max_epochs=epochs, accumulate_grad_batches=4, enable_checkpointing=True
            ),
            callbacks=[cb, *callbacks],
        )
        trainer.fit(Classifier(mlp(), batch_size=32, shuffle=False), ckpt_path=ckpt)
        return trainer

    def new() -> GradientNoiseScale:
        return GradientNoiseScale(ema_decay=0.95, source="micro_batch")

    reused, fresh = new(), new()
    run(reused, 3, tmp_path / "first")
    trainer = run(reused, 1, tmp_path / "second")
    run(fresh, 1, tmp_path / "fresh")
    assert reused.values.steps == fresh.values.steps
    assert reused.b_simple == pytest.approx(fresh.b_simple, rel=1e-9)
    assert trainer.callback_metrics["gns/batch_size"] == 128

    trainer.fit_loop.max_epochs = 2  # the same trainer and module go on: so does the estimate
    trainer.fit(trainer.lightning_module)
    twice = new()
    run(twice, 2, tmp_path / "twice")
    assert reused.values.steps == twice.values.steps
    assert reused.b_simple == pytest.approx(twice.b_simple, rel=1e-9)

    run(
        new(),
        2,
        tmp_path / "a",
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
    )
    run(reused, 4, tmp_path / "b", ckpt=str(tmp_path / "ck" / "last.ckpt"))
    full = new()
    run(full, 4, tmp_path / "full")
    assert reused.values.steps == full.values.steps
    assert reused.b_simple == pytest.approx(full.b_simple, rel=1e-9)


def test_resume_per_example_keeps_the_checked_layers(tmp_path) -> None:
    def run(epochs: int, ckpt=None, callbacks=()):
        cb = GradientNoiseScale(ema_decay=0.95, source="per_example")
        trainer = pl.Trainer(
            **trainer_kwargs(tmp_path, max_epochs=epochs, enable_checkpointing=True),
            callbacks=[cb, *callbacks],
        )
        trainer.fit(Classifier(mlp(), batch_size=128, shuffle=False), ckpt_path=ckpt)
        return cb

    full = run(4)
    run(2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    resumed = run(4, ckpt=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.b_simple == pytest.approx(full.b_simple, rel=1e-9)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_decay=0), "ema_decay"),
        (dict(source="grads"), "source"),
        (dict(layers="some"), "layers"),
        (dict(loss_reduction="none"), "loss_reduction"),
        (dict(log_every_n_steps=0), "log_every_n_steps"),
        (dict(per_layer=True, source="micro_batch"), "per_layer"),
        (dict(per_layer="no"), "per_layer must be True or False"),
        (dict(preconditioned="no"), "preconditioned must be True or False"),
        (dict(summary=1), "summary must be True or False"),
        (dict(log_every_n_steps=2**40), "log_every_n_steps"),
    ],
)
def test_invalid_arguments_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradientNoiseScale(**kwargs)


def test_micro_batch_source_needs_two_gradients(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
        fit(GradientNoiseScale(source="micro_batch"), tmp_path, epochs=1)


def test_manual_optimization_is_rejected(tmp_path) -> None:
    # Several optimizers need manual optimization in Lightning 2, so this covers both.
    class Manual(Classifier):
        def __init__(self):
            super().__init__(mlp())
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()

    with pytest.raises(RuntimeError, match="manual optimization"):
        fit(GradientNoiseScale(), tmp_path, module=Manual(), epochs=1)


def test_custom_module_without_a_rule_is_covered_exactly(tmp_path) -> None:
    class Scale(nn.Module):  # a custom parametrized module: no rule, the torch.func fallback
        def __init__(self, d: int) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

        def forward(self, x):
            return x * self.gain

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.LayerNorm(32), nn.Tanh(), Scale(32), nn.Linear(32, 10)
    )
    cb = GradientNoiseScale(ema_decay=0.98)
    trainer = fit(cb, tmp_path, module=Classifier(model, batch_size=64), epochs=6)
    assert cb.left_out == {} and cb.coverage == 1.0
    assert trainer.callback_metrics["gns/coverage"].item() == 1.0
    x, y = digits()
    assert_close(cb, exact_gns(model, x, y))


def test_sampled_per_example_norms_stay_unbiased(tmp_path, truth) -> None:
    cb = GradientNoiseScale(ema_decay=0.98, source="per_example", examples_per_batch=16)
    fit(cb, tmp_path, batch_size=64, epochs=10)
    assert cb.chosen_source == "per_example"
    assert cb.batch_size == 64  # the big batch is still the whole batch
    assert_close(cb, truth)


@pytest.mark.parametrize("source,accumulate", [("per_example", 1), ("micro_batch", 4)])
def test_bf16_autocast(source, accumulate, tmp_path, truth) -> None:
    cb = GradientNoiseScale(ema_decay=0.98, source=source)
    batch_size = 64 if accumulate == 1 else 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            cb,
            tmp_path,
            module=Classifier(mlp(), batch_size=batch_size),
            precision="bf16-mixed",
            accumulate_grad_batches=accumulate,
        )
    assert not [w for w in caught if "non-finite" in str(w.message)]  # bf16 does not overflow
    assert_close(cb, truth, tol=0.25)  # bf16 forward changes the model's numbers a little


def test_bf16_autocast_with_a_layer_covered_by_the_fallback(tmp_path) -> None:
    class Gain(nn.Module):  # no rule: torch.func re-runs it outside the autocast region
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 32))

        def forward(self, x):
            return x @ torch.diag(self.w)  # a matmul: bf16 activations against fp32 weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), Gain(), nn.Tanh(), nn.Linear(32, 10))
    cb = GradientNoiseScale(ema_decay=0.98)
    fit(cb, tmp_path, module=Classifier(model, batch_size=64), precision="bf16-mixed")
    assert cb.left_out == {} and cb.coverage == 1.0
    x, y = digits()
    assert_close(cb, exact_gns(model, x, y), tol=0.25)


def test_two_callbacks_side_by_side_all_layers_and_norm_layers(tmp_path) -> None:
    """Each one's structural check re-runs modules: the other's hooks must not count that as
    a second call; each has its own checkpoint entry."""
    from examples.digits import DigitsClassifier

    everything = GradientNoiseScale(log_every_n_steps=5)
    norm = GradientNoiseScale(log_every_n_steps=5, layers="norm", source="per_example")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=40, enable_checkpointing=True),
        callbacks=[everything, norm, ckpt],
    )
    module = DigitsClassifier(hidden=32, lr=0.0)
    x, y = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    trainer.fit(module, train_dataloaders=loader)
    assert everything.coverage == 1.0 and 0 < norm.coverage < 0.1
    assert everything.values.steps > 30 and norm.values.steps > 30
    assert not norm.left_out
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["callbacks"]
    assert {everything.state_key, norm.state_key} <= set(saved)


def test_upper_bound_and_source_reason_are_public(tmp_path) -> None:
    cb = GradientNoiseScale(ema_decay=0.98)
    fit(cb, tmp_path, epochs=2)
    assert cb.b_simple_lower <= cb.b_simple <= cb.b_simple_upper < math.inf
    assert cb.chosen_source == "per_example" and "rules cover every" in cb.source_reason


def test_a_tied_weight_covered_through_another_module_is_said_plainly(tmp_path) -> None:
    """A module left out whose only weight is covered through the module it is tied to: the
    warning must not read "cover 100.0% ...; left out" as if something were missing."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body, self.head = nn.Linear(64, 10), nn.Linear(64, 10, bias=False)
            self.head.weight = self.body.weight  # tied; ``head`` is never called

        def forward(self, x):
            return self.body(x)

    cb = GradientNoiseScale(source="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(cb, tmp_path, module=Classifier(Tied(), batch_size=32), epochs=1)
    said = [str(w.message) for w in caught if "per-example norms cover" in str(w.message)]
    assert cb.coverage == 1.0 and set(cb.left_out) == {"model.head"}
    assert said and "100.0%" not in said[0] and "left out" not in said[0], said
    assert "covered through the modules they are tied to" in said[0]
