"""The simultaneous route: a Linear's weight gradient from its per-example gradients."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns.norms import PerExampleNorms, simultaneous
from lightning_gns.norms.simultaneous import RoutedForward, can_route, route, unroute


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D (y = x W + b, W of shape (d_in, d_out)), written here."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__, Conv1D.__qualname__ = "transformers.pytorch_utils", "Conv1D"


def layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        return Conv1D(24, 16)
    return nn.Linear(16, 24, bias=kind == "linear")


def per_example_truth(mod: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    params = {k: v.detach() for k, v in mod.named_parameters()}

    def loss(p: dict, xi: Tensor, wi: Tensor) -> Tensor:
        return (functional_call(mod, p, (xi.unsqueeze(0),)).squeeze(0) * wi).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, w)
    return sum(v.flatten(1).square().sum(1) for v in g.values())


def sink(n: int) -> Tensor:
    """A (n,) leaf: the route returns the per-example squared norms as its gradient."""
    return torch.zeros(n, requires_grad=True)


def routed_run(mod: nn.Module, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    norms = sink(x.shape[0])
    route(mod, lambda x: norms)
    out = mod(x)
    assert isinstance(out, Tensor) and "forward" in mod.__dict__
    (out * w).sum().backward()
    unroute(mod)
    assert "forward" not in mod.__dict__
    return out, norms.grad


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d"])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_weight_gradient_and_norms_equal_autograd_and_the_per_example_truth(
    kind, chunk_bytes, monkeypatch
) -> None:
    if chunk_bytes is not None:  # one example at a time
        monkeypatch.setattr(simultaneous, "CHUNK_BYTES", chunk_bytes)
    mod = layer(kind)
    assert can_route(mod)
    x = torch.randn(5, 12, 16, requires_grad=True)
    w = torch.randn(5, 12, 24)
    out_ref = mod(x)
    (out_ref * w).sum().backward()
    ref = {k: p.grad.clone() for k, p in mod.named_parameters()}
    ref_x = x.grad.clone()
    mod.zero_grad()
    x.grad = None
    out, got = routed_run(mod, x, w)
    torch.testing.assert_close(out, out_ref)
    for k, p in mod.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x)
    torch.testing.assert_close(got, per_example_truth(mod, x.detach(), w), rtol=1e-4, atol=0)


def test_in_place_op_on_the_output_and_a_frozen_bias() -> None:
    mod = layer("linear")
    mod.bias.requires_grad_(False)
    x = torch.randn(4, 12, 16)
    w = torch.randn(4, 12, 24)
    norms = sink(4)
    route(mod, lambda x: norms)
    (mod(x).relu_() * w).sum().backward()
    unroute(mod)
    g_routed = mod.weight.grad.clone()
    mod.zero_grad()
    (mod(x).relu_() * w).sum().backward()
    torch.testing.assert_close(g_routed, mod.weight.grad)
    assert mod.bias.grad is None
    # the norms are of the trainable weight alone (relu's mask is part of the output gradient)
    mask_w = w * (mod(x) > 0)
    mod.bias.requires_grad_(True)
    truth = per_example_truth(mod, x, mask_w)
    bias_part = mask_w.sum(1).square().sum(1)
    torch.testing.assert_close(norms.grad, truth - bias_part, rtol=1e-4, atol=1e-5)


def test_double_backward_through_the_routed_layer_matches_autograd() -> None:
    """A gradient penalty (create_graph=True) differentiates the backward itself."""
    mod = layer("linear")
    x = torch.randn(3, 12, 16, requires_grad=True)

    def penalty() -> Tensor:
        (gx,) = torch.autograd.grad(mod(x).tanh().sum(), x, create_graph=True)
        return gx.square().sum()

    penalty().backward()
    ref = mod.weight.grad.clone()
    mod.zero_grad()
    route(mod, lambda x: sink(3))
    penalty().backward()
    unroute(mod)
    torch.testing.assert_close(mod.weight.grad, ref, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_computes_in_bf16_and_keeps_float32_gradients() -> None:
    mod = layer("linear")
    x = torch.randn(4, 12, 16)
    w = torch.randn(4, 12, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = mod(x)
    (out_ref.float() * w).sum().backward()
    ref = mod.weight.grad.clone()
    mod.zero_grad()
    norms = sink(4)
    route(mod, lambda x: norms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x)
    (out.float() * w).sum().backward()
    unroute(mod)
    assert out.dtype == torch.bfloat16 and mod.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, out_ref)
    # exact product of the bf16 operands: ours (float32 sum of per-example products) is no
    # further from it than autograd's (one bf16 product)
    gy, xb = w.bfloat16().double(), x.bfloat16().double()
    exact = torch.einsum("bto,bti->oi", gy, xb).float()
    ours, theirs = (mod.weight.grad - exact).abs().max(), (ref - exact).abs().max()
    assert ours <= theirs + 1e-3, (ours, theirs)
    truth = per_example_truth(mod, x, w)
    torch.testing.assert_close(norms.grad, truth, rtol=3e-2, atol=0)


def test_calls_that_do_not_qualify_run_the_plain_forward() -> None:
    mod = layer("linear")
    asked: list[Tensor] = []
    route(mod, lambda x: asked.append(x))  # would hand out None: plain forward
    mod(torch.randn(4, 16))  # 2-D: |g|²|a|² is cheaper, nothing to materialise
    with torch.no_grad():
        mod(torch.randn(4, 12, 16))
    mod(torch.randn(4, 1, 16))  # one position per example
    assert asked == []
    mod(torch.randn(4, 12, 16))
    assert len(asked) == 1
    unroute(mod)
    frozen = layer("linear").requires_grad_(False)
    assert not can_route(frozen)


def _gpt_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(20, 16), nn.LayerNorm(16), nn.Linear(16, 48), nn.GELU(), Conv1D(20, 48)
    )


def _step(model: nn.Module, norms: PerExampleNorms, idx: Tensor, check: bool) -> Tensor:
    norms.start_micro_batch(idx.shape[0])
    if check:
        norms.start_check()
    out = model(idx)
    (out * torch.linspace(-1, 1, out[0].numel()).view_as(out[0])).sum().backward()
    acc, _, bad = norms.close_micro_batch()
    assert bad is None
    return acc


def test_per_example_norms_and_gradients_are_those_of_the_plain_backward() -> None:
    idx = torch.randint(0, 20, (6, 30))
    results = {}
    for on in (True, False):
        model = _gpt_like()
        norms = PerExampleNorms(model, simultaneous=on)
        norms.attach()
        _step(model, norms, idx, check=True)
        model.zero_grad()
        routed = [type(m).__name__ for m in model if "forward" in m.__dict__]
        acc = _step(model, norms, idx, check=False)
        grads = [p.grad.clone() for p in model.parameters()]
        norms.detach()
        assert not [m for m in model if "forward" in m.__dict__]
        results[on] = (acc, grads, routed)
    assert results[True][2] == ["Linear", "Conv1D"] and results[False][2] == []
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=0)
    for a, b in zip(results[True][1], results[False][1], strict=True):  # float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_a_deep_copy_of_the_model_runs_its_own_weights_the_plain_way() -> None:
    """An EMA or SWA copy taken while the hooks are attached."""
    model = _gpt_like()
    norms = PerExampleNorms(model)
    norms.attach()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    idx = torch.randint(0, 20, (3, 30))
    with torch.no_grad():
        out = twin(idx)
    norms.detach()
    assert not [m for m in model if "forward" in m.__dict__]
    plain = copy.deepcopy(twin)
    for m in plain:
        m.__dict__.pop("forward", None)
    torch.testing.assert_close(out, plain(idx))
    again = PerExampleNorms(twin)  # the copy can be monitored in its turn
    again.attach()
    assert [m for m in twin if isinstance(m.__dict__.get("forward"), RoutedForward)]
    again.detach()


def test_a_routed_layer_saved_whole_loads_with_the_plain_forward() -> None:
    mod = layer("linear")
    route(mod, lambda x: sink(2))
    buf = io.BytesIO()
    torch.save(mod, buf)
    unroute(mod)
    buf.seek(0)
    twin = torch.load(buf, weights_only=False)
    x = torch.randn(2, 12, 16)
    torch.testing.assert_close(twin(x), mod(x))
