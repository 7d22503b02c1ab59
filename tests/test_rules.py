"""Per-layer norm / grad-sample rules vs. torch.func per-example gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import checked_step
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns.norms.rules import (
    GRAD_SAMPLE_RULES,
    NORM_RULES,
    _gram_sq_norm,
    _materialized_sq_norm,
    _use_gram,
    grad_sample_rule_for,
    norm_rule_for,
    register_grad_sample,
    register_norm,
)


def _output_grad(module: nn.Module, x: Tensor, r: Tensor) -> Tensor:
    """Gradient of (module(x) * r).sum() w.r.t. the module output, captured by a hook."""
    captured: list[Tensor] = []
    x = x.detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)
    out = module(x)
    if not out.requires_grad:  # nothing trainable upstream; d/d(out) of (out * r).sum() is r
        return r.clone()
    out.register_hook(lambda t: captured.append(t.detach()))
    (out * r).sum().backward()
    module.zero_grad(set_to_none=True)
    return captured[0]


def _per_example_grads(module: nn.Module, x: Tensor, r: Tensor) -> dict[str, Tensor]:
    """torch.func reference: per-example grads of (module(x_b) * r_b).sum()."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def loss(p: dict[str, Tensor], xb: Tensor, rb: Tensor) -> Tensor:
        return (functional_call(module, p, (xb.unsqueeze(0),)) * rb.unsqueeze(0)).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, r)


def _setup(make: Callable[[], nn.Module], x: Tensor) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """float64 module and input, random output functional r, output grad g."""
    torch.manual_seed(0)
    module = make().double()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        r = torch.randn_like(module(x))
    return module, x, r, _output_grad(module, x, r)


def _f32(x: Tensor) -> Tensor:
    return x.float() if x.is_floating_point() else x


def _no_grad_weight(m: nn.Module) -> nn.Module:
    m.weight.requires_grad_(False)
    return m


torch.manual_seed(1234)

# (id, module factory, input)
NORM_CASES: list[tuple[str, Callable[[], nn.Module], Tensor]] = [
    ("linear_2d", lambda: nn.Linear(5, 4), torch.randn(6, 5)),
    ("linear_seq_gram", lambda: nn.Linear(16, 12), torch.randn(4, 3, 16)),
    ("linear_seq_materialize", lambda: nn.Linear(3, 4), torch.randn(4, 20, 3)),
    ("linear_4d_nobias", lambda: nn.Linear(6, 7, bias=False), torch.randn(3, 2, 5, 6)),
    ("linear_frozen_weight", lambda: _no_grad_weight(nn.Linear(5, 3)), torch.randn(4, 2, 5)),
    (
        "conv1d_stride_pad_dil_groups",
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        torch.randn(3, 4, 11),
    ),
    (
        "conv1d_same_nobias",
        lambda: nn.Conv1d(3, 5, 4, padding="same", dilation=3, bias=False),
        torch.randn(3, 3, 10),
    ),
    (
        "conv1d_circular",
        lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"),
        torch.randn(3, 2, 7),
    ),
    (
        "conv2d_stride_pad_dil_groups",
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        torch.randn(3, 4, 9, 8),
    ),
    (
        "conv2d_reflect_nobias",
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False),
        torch.randn(2, 3, 6, 5),
    ),
    ("conv2d_1x1_gram", lambda: nn.Conv2d(32, 32, 1), torch.randn(2, 32, 2, 2)),
    ("conv2d_depthwise", lambda: nn.Conv2d(4, 8, 3, groups=4), torch.randn(2, 4, 6, 6)),
    (
        "conv3d_stride_pad_dil_groups",
        lambda: nn.Conv3d(
            2, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2
        ),
        torch.randn(2, 2, 5, 6, 4),
    ),
    (
        "conv3d_replicate_nobias",
        lambda: nn.Conv3d(2, 3, 2, padding=1, padding_mode="replicate", bias=False),
        torch.randn(2, 2, 3, 4, 3),
    ),
    (
        "embedding_padding_repeats",
        lambda: nn.Embedding(10, 5, padding_idx=0),
        torch.tensor([[0, 1, 1, 2, 0, 3, 1], [4, 4, 4, 4, 0, 0, 0], [5, 6, 7, 8, 9, 1, 2]]),
    ),
    ("embedding_1d", lambda: nn.Embedding(6, 3), torch.tensor([1, 4, 1, 5])),
    ("embedding_3d", lambda: nn.Embedding(5, 4), torch.randint(0, 5, (3, 2, 4))),
    ("layernorm", lambda: nn.LayerNorm(6), torch.randn(3, 4, 6)),
    (
        "layernorm_2d_shape_nobias",
        lambda: nn.LayerNorm((3, 4), bias=False),
        torch.randn(2, 5, 3, 4),
    ),
    ("layernorm_2d_input", lambda: nn.LayerNorm(5, eps=1e-3), torch.randn(4, 5)),
    ("rmsnorm", lambda: nn.RMSNorm(6), torch.randn(3, 4, 6)),
    ("rmsnorm_2d_shape_eps", lambda: nn.RMSNorm((2, 3), eps=1e-3), torch.randn(3, 4, 2, 3)),
    ("groupnorm", lambda: nn.GroupNorm(2, 6), torch.randn(3, 6, 4, 5)),
    ("groupnorm_no_spatial", lambda: nn.GroupNorm(3, 6, eps=1e-3), torch.randn(4, 6)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("make, x", [c[1:] for c in NORM_CASES], ids=[c[0] for c in NORM_CASES])
def test_norm_rule_matches_torch_func(make: Callable[[], nn.Module], x: Tensor) -> None:
    module, x, r, g = _setup(make, x)
    rule = norm_rule_for(module)
    assert rule is not None
    got = rule(module, _f32(x), g.float())
    ref = _per_example_grads(module, x, r)
    assert set(got) == set(ref) and got
    for name, ref_grad in ref.items():
        assert got[name].dtype == torch.float32
        assert got[name].shape == (x.shape[0],)
        expected = ref_grad.pow(2).flatten(1).sum(1).float()
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("make, x", [c[1:] for c in NORM_CASES], ids=[c[0] for c in NORM_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_rule_low_precision_inputs(
    make: Callable[[], nn.Module], x: Tensor, dtype: torch.dtype
) -> None:
    """Low-precision (large, loss-scaled) inputs are computed in float32 without overflow."""
    module, x, _, g = _setup(make, x)
    rule = norm_rule_for(module)
    assert rule is not None
    a_lp = x.to(dtype) if x.is_floating_point() else x
    g_lp = (g * 3e3).to(dtype)
    got = rule(module, a_lp, g_lp)
    want = rule(module, _f32(a_lp), g_lp.float())
    for name, v in got.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
        torch.testing.assert_close(v, want[name], rtol=1e-5, atol=0)


def test_linear_branches_agree() -> None:
    assert _use_gram(3, 16, 12) and not _use_gram(20, 3, 4)
    assert _use_gram(4, 32, 32)  # conv2d_1x1_gram case
    a, g = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(_gram_sq_norm(a, g), _materialized_sq_norm(a, g))


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: nn.LayerNorm(5, elementwise_affine=False), torch.randn(3, 5)),
        (lambda: nn.GroupNorm(2, 4, affine=False), torch.randn(3, 4, 5)),
        (lambda: nn.RMSNorm(5, elementwise_affine=False), torch.randn(3, 5)),
        (lambda: _no_grad_weight(nn.Embedding(5, 3)), torch.tensor([1, 2, 3])),
    ],
    ids=["layernorm", "groupnorm", "rmsnorm", "embedding_frozen"],
)
def test_no_trainable_params_gives_empty(make: Callable[[], nn.Module], x: Tensor) -> None:
    module, x, _, g = _setup(make, x)
    rule = norm_rule_for(module)
    assert rule is not None
    assert rule(module, _f32(x), g.float()) == {}


GRAD_SAMPLE_CASES: list[tuple[str, Callable[[], nn.Module], Tensor]] = [
    ("linear_2d", lambda: nn.Linear(5, 4), torch.randn(6, 5)),
    ("linear_seq", lambda: nn.Linear(3, 4), torch.randn(4, 6, 3)),
    ("linear_seq_nobias", lambda: nn.Linear(3, 4, bias=False), torch.randn(4, 2, 6, 3)),
    (
        "embedding_padding_repeats",
        lambda: nn.Embedding(8, 3, padding_idx=2),
        torch.tensor([[2, 1, 1, 2, 0], [3, 3, 7, 2, 6]]),
    ),
    ("embedding_1d", lambda: nn.Embedding(6, 3), torch.tensor([1, 4, 1, 5])),
]


@pytest.mark.parametrize(
    "make, x", [c[1:] for c in GRAD_SAMPLE_CASES], ids=[c[0] for c in GRAD_SAMPLE_CASES]
)
def test_grad_sample_rule_matches_torch_func(make: Callable[[], nn.Module], x: Tensor) -> None:
    module, x, r, g = _setup(make, x)
    rule = grad_sample_rule_for(module)
    assert rule is not None
    got = rule(module, _f32(x), g.float())
    ref = _per_example_grads(module, x, r)
    assert set(got) == set(ref)
    for name, ref_grad in ref.items():
        param = getattr(module, name)
        assert got[name].dtype == torch.float32
        assert got[name].shape == (x.shape[0], *param.shape)
        torch.testing.assert_close(got[name], ref_grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "module",
    [nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Embedding(5, 3, sparse=True)],
    ids=["scale_grad_by_freq", "sparse"],
)
def test_unsupported_embedding_options(module: nn.Module) -> None:
    assert norm_rule_for(module) is None
    assert grad_sample_rule_for(module) is None


def test_subclasses_get_the_nearest_registered_rule() -> None:
    class MyLinear(nn.Linear):
        pass

    class MyLayerNorm(nn.LayerNorm):
        pass

    assert norm_rule_for(nn.Linear(2, 3)) is NORM_RULES[nn.Linear]
    assert grad_sample_rule_for(nn.Linear(2, 3)) is GRAD_SAMPLE_RULES[nn.Linear]
    assert norm_rule_for(MyLinear(2, 3)) is NORM_RULES[nn.Linear]
    assert grad_sample_rule_for(MyLinear(2, 3)) is GRAD_SAMPLE_RULES[nn.Linear]
    assert norm_rule_for(MyLayerNorm(3)) is NORM_RULES[nn.LayerNorm]
    mha = nn.MultiheadAttention(4, 2)
    assert norm_rule_for(mha.out_proj) is NORM_RULES[nn.Linear]  # NonDynamicallyQuantizable
    assert norm_rule_for(nn.ReLU()) is None
    assert grad_sample_rule_for(nn.Conv2d(1, 1, 1)) is None


def test_register_decorators() -> None:
    class Custom(nn.Module):
        pass

    def rule(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        return {}

    try:
        assert register_norm(Custom)(rule) is rule
        assert register_grad_sample(Custom)(rule) is rule
        assert norm_rule_for(Custom()) is rule
        assert grad_sample_rule_for(Custom()) is rule
    finally:
        NORM_RULES.pop(Custom, None)
        GRAD_SAMPLE_RULES.pop(Custom, None)


def test_a_subclass_that_overrides_forward_has_no_rule_and_is_measured_exactly() -> None:
    """A rule is the registered class's forward: a subclass computing something else (an
    embedding scaled by √d, as Gemma's) must not inherit it; the torch.func fallback measures
    it exactly."""
    from lightning_gns.norms import PerExampleNorms

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids: Tensor) -> Tensor:
            return super().forward(ids) * 3.0

    class ScaledLinear(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 0.5

    class Kept(nn.Linear):  # the forward kept: the Linear rule
        pass

    assert norm_rule_for(ScaledEmbedding(5, 3)) is None
    assert norm_rule_for(ScaledLinear(2, 3)) is None
    assert norm_rule_for(Kept(2, 3)) is NORM_RULES[nn.Linear]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc, self.out = ScaledEmbedding(7, 4), ScaledLinear(4, 4), Kept(4, 2)

        def forward(self, ids: Tensor) -> Tensor:
            return self.out(torch.tanh(self.fc(self.emb(ids)))).sum(1)

    torch.manual_seed(0)
    model, ids, w = Net(), torch.randint(0, 7, (5, 3)), torch.linspace(-1, 1, 2)
    named = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, i: Tensor) -> Tensor:
        return (torch.func.functional_call(model, p, (i.unsqueeze(0),)) * w).sum()

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(named, ids)
    exact = sum(v.flatten(1).square().sum(1) for v in g.values())
    norms = PerExampleNorms(model)
    acc, _, bad = checked_step(model, ids, norms)
    assert bad is None and norms.left_out == {}
    torch.testing.assert_close(acc, exact, rtol=1e-5, atol=1e-7)
