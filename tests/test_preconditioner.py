"""The preconditioned noise scale: weights as the optimizer divides by, exact estimate."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, digits, per_example_grads, trained_mlp, trainer_kwargs
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_gns import GradientNoiseScale
from lightning_gns.norms.preconditioner import inverse_preconditioner, keeps_second_moment


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.0, 0.99)),  # β₁ = 0: step = −η·g·w
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.0, 0.9), weight_decay=0.0),
        lambda p: torch.optim.RMSprop(p, lr=1e-2),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=1e-2),
    ],
)
def test_weights_are_what_the_optimizer_divides_by(make) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = make(params)
    if not isinstance(opt, torch.optim.Adagrad):  # Adagrad makes its state up front
        assert keeps_second_moment(opt) is None  # no state before the first step
        assert inverse_preconditioner(opt, params) is None
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    old = [p.detach().clone() for p in params]
    opt.step()
    w = inverse_preconditioner(opt, params)  # the state after the step is the one it used
    assert w is not None and keeps_second_moment(opt) is True
    for p, o, g, wi in zip(params, old, grads, w, strict=True):
        torch.testing.assert_close(o - p.detach(), 1e-2 * g * wi, rtol=1e-4, atol=1e-7)


def test_sgd_has_no_preconditioner() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    assert keeps_second_moment(opt) is False
    assert inverse_preconditioner(opt, [p]) is None


class FixedRMSprop(Classifier):
    """Frozen (lr 0) with RMSprop whose second moment never moves (alpha 1): a fixed
    preconditioner P, so B_precond = tr(PΣP)/|PG|² has an exact value. Batches with
    replacement."""

    def __init__(self) -> None:
        super().__init__(trained_mlp(), batch_size=32)
        self.data_seed = 0
        gen = torch.Generator().manual_seed(1)
        # the first layer's weights count 10× more (its own B_simple is far from the model's)
        scales = [1e-4] + [1e-2] * (len(list(self.parameters())) - 1)
        self.v = [
            c * (0.5 + torch.rand(p.shape, generator=gen))
            for c, p in zip(scales, self.parameters(), strict=True)
        ]

    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=0.0, alpha=1.0)

    def on_train_start(self) -> None:
        opt = self.trainer.optimizers[0]
        for p, v in zip(self.parameters(), self.v, strict=True):
            opt.state[p] = {"step": torch.tensor(0.0), "square_avg": v.clone()}

    def train_dataloader(self) -> DataLoader:
        ds = TensorDataset(*digits())
        gen = torch.Generator().manual_seed(self.data_seed)  # not the global RNG: the order
        sampler = RandomSampler(ds, replacement=True, num_samples=32 * 4 * 1500, generator=gen)
        return DataLoader(ds, batch_size=32, sampler=sampler)


@pytest.mark.slow  # make test-fast leaves it out (a real fit or subprocess)
def test_preconditioned_estimate_matches_the_exact_value(tmp_path) -> None:
    module = FixedRMSprop()
    x, y = digits()
    w = torch.cat([(1.0 / (v.sqrt() + 1e-8)).flatten() for v in module.v]).double()
    per = per_example_grads(module.model, x, y) * w
    g = per.mean(0)
    truth = float((per - g).square().sum(1).mean() / g.square().sum())
    plain = per_example_grads(module.model, x, y)
    plain_g = plain.mean(0)
    plain_truth = float((plain - plain_g).square().sum(1).mean() / plain_g.square().sum())
    assert abs(truth / plain_truth - 1) > 0.2  # the weighting matters here

    gns = GradientNoiseScale(preconditioned=True, log_every_n_steps=500)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, accumulate_grad_batches=4, callbacks=[gns])
    )
    trainer.fit(module)
    pv = gns.preconditioned_values
    assert pv.steps == 1500
    assert pv.b_simple_lower <= truth <= pv.b_simple_upper
    assert pv.b_simple == pytest.approx(truth, rel=0.15)
    assert gns.values.b_simple == pytest.approx(plain_truth, rel=0.15)
    assert "gns/preconditioned/b_simple_lower" in trainer.callback_metrics


def test_preconditioned_with_sgd_warns_once_and_training_goes_on(tmp_path) -> None:
    gns = GradientNoiseScale(preconditioned=True, log_every_n_steps=5)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=20, accumulate_grad_batches=2, callbacks=[gns])
    )
    with pytest.warns(UserWarning, match="no second-moment estimate"):
        trainer.fit(Classifier(trained_mlp(), lr=0.01, batch_size=32))
    assert trainer.global_step == 20


def test_preconditioned_needs_micro_batches(tmp_path) -> None:
    gns = GradientNoiseScale(preconditioned=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[gns]))
    with pytest.raises(RuntimeError, match="accumulate_grad_batches>=2"):
        trainer.fit(Classifier(trained_mlp(), batch_size=32))


def test_device_step_counter_is_not_read_back() -> None:
    """Capturable/fused Adam keep ``step`` on the device: the bias correction stays a device op
    (a meta tensor stands in for a GPU one: reading it back to the host would raise)."""
    from lightning_gns.norms.preconditioner import _denominator

    state = {"exp_avg_sq": torch.rand(3, device="meta"), "step": torch.tensor(3.0, device="meta")}
    d = _denominator(state, {"betas": (0.9, 0.99), "eps": 1e-8})
    assert d is not None and d.device.type == "meta" and d.shape == (3,)
