"""The hooks: micro-batch norms and per-example norms from module hooks, structure checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import checked_step
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns.norms import MicroBatchNorms, PerExampleNorms
from lightning_gns.norms.record import rows_sum


class TinyLM(nn.Module):
    """Token + positional embeddings, a LayerNorm, an MLP and an output head (maybe tied)."""

    def __init__(self, vocab=11, d=8, t=5, tie="none", pad=0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=pad)
        self.pos = nn.Embedding(t, d)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.tie = tie
        if tie == "module":
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        h = self.fc(self.norm(h)).relu_()  # an in-place op right after a hooked output
        if self.tie == "functional":
            return F.linear(h, self.tok.weight)
        return self.head(h)


def per_example_sq_norms(model: nn.Module, idx: Tensor, params: list[str]) -> Tensor:
    named = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x):
        out = functional_call(model, {**named, **p}, (x.unsqueeze(0),))
        return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()

    g = vmap(grad(loss), in_dims=(None, 0))({k: named[k] for k in params}, idx)
    return sum(g[k].flatten(1).square().sum(1) for k in params)


@pytest.fixture
def idx() -> Tensor:
    torch.manual_seed(0)
    x = torch.randint(0, 11, (6, 5))
    x[0, :2] = 0  # padding tokens
    x[1] = 3  # repeated tokens
    return x


def test_tied_module_weights_are_handled_exactly(idx) -> None:
    torch.manual_seed(1)
    model = TinyLM(tie="module")
    norms = PerExampleNorms(model)
    acc, _, bad = checked_step(model, idx, norms)
    assert bad is None
    assert norms.left_out == {}  # the positional embedding (on arange(T)) is covered too
    names = [k for k, _ in model.named_parameters()]
    ref = per_example_sq_norms(model, idx, names)
    torch.testing.assert_close(acc, ref.float(), rtol=1e-4, atol=1e-6)


def test_weight_used_outside_its_module_is_left_out(idx) -> None:
    torch.manual_seed(2)
    model = TinyLM(tie="functional")
    norms = PerExampleNorms(model)
    acc, _, _ = checked_step(model, idx, norms)
    assert "tok" in norms.left_out and "outside" in norms.left_out["tok"]
    # the head is never called and gets no gradient: not "used directly", unused
    assert "no gradient" in norms.left_out["head"] and "directly" not in norms.left_out["head"]
    names = ["pos.weight", "norm.weight", "norm.bias", "fc.weight", "fc.bias"]
    ref = per_example_sq_norms(model, idx, names)
    torch.testing.assert_close(acc, ref.float(), rtol=1e-4, atol=1e-6)
    assert norms.coverage() == pytest.approx(
        sum(p.numel() for n, p in model.named_parameters() if n in names)
        / sum(p.numel() for p in model.parameters())
    )


def test_module_called_twice_is_left_out() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    model = Twice()
    norms = PerExampleNorms(model)
    acc, _, _ = checked_step(model, torch.randn(5, 4), norms)
    assert "called 2 times" in norms.left_out["a"]
    assert acc is not None and acc.shape == (5,)


def test_norm_layers_mode_hooks_only_normalization_layers() -> None:
    model = TinyLM()
    norms = PerExampleNorms(model, layers="norm")
    assert set(norms.sites) == {"norm"}
    assert norms.left_out == {}  # other layers are not candidates, not failures


def test_per_layer_norms_add_up(idx) -> None:
    torch.manual_seed(3)
    model = TinyLM()
    norms = PerExampleNorms(model, per_layer=True)
    acc, layers, _ = checked_step(model, idx, norms)
    assert set(layers) == {"tok", "pos", "norm", "fc", "head"}
    torch.testing.assert_close(sum(layers.values()), acc)


def test_micro_batch_norms_see_each_local_gradient_before_accumulation() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    micro = MicroBatchNorms([p for p in model.parameters()])
    micro.attach()
    xs = [torch.randn(5, 3) for _ in range(3)]
    seen = []
    for x in xs:
        model(x).sum().backward()
        assert micro.close_micro_batch()
        seen.append(micro.take())
    model(xs[0]).sum().backward()
    micro.close_micro_batch(weight=0.25)
    model(xs[1]).sum().backward()
    micro.close_micro_batch()
    both = micro.take()
    micro.detach()
    refs = []
    for x in xs:
        ref = torch.autograd.grad(model(x).sum(), list(model.parameters()))
        refs.append(sum(float(g.square().sum()) for g in ref))
    for s, r in zip(seen, refs, strict=True):
        assert float(s) == pytest.approx(r, rel=1e-5)
    assert float(both) == pytest.approx(0.25 * refs[0] + refs[1], rel=1e-5)
    assert micro.take() is None and not micro.close_micro_batch()


def test_positional_embedding_is_covered_even_when_sequence_equals_batch() -> None:
    torch.manual_seed(5)
    model = TinyLM(t=6)
    x = torch.randint(1, 11, (6, 6))  # batch 6 = sequence 6: arange(6) is positions, not a batch
    norms = PerExampleNorms(model)
    acc, _, _ = checked_step(model, x, norms)
    assert norms.left_out == {}
    names = [k for k, _ in model.named_parameters()]
    torch.testing.assert_close(
        acc, per_example_sq_norms(model, x, names).float(), rtol=1e-4, atol=1e-6
    )


def test_a_module_failing_after_the_check_drops_the_micro_batch_not_the_module() -> None:
    class Maybe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.twice = False

        def forward(self, x):
            y = self.a(x)
            return self.a(y) if self.twice else y

    model = Maybe()
    norms = PerExampleNorms(model)
    checked_step(model, torch.randn(5, 4), norms)
    norms.attach()
    model.twice = True
    norms.start_micro_batch(5)
    model(torch.randn(5, 4)).sum().backward()
    acc, _, bad = norms.close_micro_batch()
    assert acc is None and "called 2 times" in bad
    assert "a" in norms.sites and norms.coverage() == 1.0


def test_a_failing_rule_never_breaks_the_backward(monkeypatch) -> None:
    from lightning_gns.norms import rules

    class Odd(nn.Linear):
        pass

    def broken(module, a, g):
        raise RuntimeError("unexpected shape")

    monkeypatch.setitem(rules.NORM_RULES, Odd, broken)
    model = nn.Sequential(nn.Linear(4, 4), Odd(4, 2))
    norms = PerExampleNorms(model)
    acc, _, bad = checked_step(model, torch.randn(5, 4), norms)  # check pass, then a normal pass
    assert "rule failed" in norms.left_out["1"] and bad is None
    assert acc is not None and acc.shape == (5,)


class PositionsLM(nn.Module):
    """Positions shared by the batch as Hugging Face passes them: (1, T), maybe packed."""

    def __init__(self, positions: Tensor) -> None:
        super().__init__()
        self.positions = positions
        self.tok = nn.Embedding(11, 8)
        self.pos = nn.Embedding(8, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.tok(idx) + self.pos(self.positions))


@pytest.mark.parametrize(
    "positions", [torch.arange(5).unsqueeze(0), torch.tensor([[0, 1, 2, 0, 1]])]
)
def test_broadcast_positions_are_exact_per_example(idx, positions) -> None:
    torch.manual_seed(6)
    model = PositionsLM(positions)  # the second case: packed sequences repeat positions
    norms = PerExampleNorms(model)
    acc, _, bad = checked_step(model, idx, norms)
    assert bad is None and norms.left_out == {}
    ref = per_example_sq_norms(model, idx, [k for k, _ in model.named_parameters()])
    torch.testing.assert_close(acc, ref.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_covered_by_the_fallback_exactly(batch_first) -> None:
    """No rule for nn.MultiheadAttention: torch.func covers its in_proj and, since it reads
    out_proj.weight without calling out_proj, adopts out_proj's parameters too."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
            self.head = nn.Linear(8, 11)

        def forward(self, idx: Tensor) -> Tensor:
            h = self.emb(idx)
            h = h if batch_first else h.transpose(0, 1)
            out = self.mha(h, h, h, need_weights=False)[0]
            return self.head(out if batch_first else out.transpose(0, 1))

    torch.manual_seed(3)
    model = Attn()
    idx = torch.randint(0, 11, (6, 5))
    norms = PerExampleNorms(model)
    acc, _, bad = checked_step(model, idx, norms)
    assert bad is None and norms.left_out == {} and norms.coverage() == 1.0
    ref = per_example_sq_norms(model, idx, [k for k, _ in model.named_parameters()])
    torch.testing.assert_close(acc, ref.float(), rtol=1e-4, atol=1e-6)


def test_positions_as_long_as_the_batch_are_recognised_once_not_every_step(monkeypatch) -> None:
    """Telling positions arange(T) from a batch of T token ids reads values back to the host:
    that may happen once per module, never on every step."""
    from lightning_gns.norms import positions, site_hooks

    calls = {"n": 0}
    real = positions.not_a_batch

    def counted(x):
        calls["n"] += 1
        return real(x)

    monkeypatch.setattr(positions, "not_a_batch", counted)
    monkeypatch.setattr(site_hooks, "not_a_batch", counted)
    torch.manual_seed(7)
    model = TinyLM(t=6)
    x = torch.randint(1, 11, (6, 6))  # batch 6 = sequence 6
    norms = PerExampleNorms(model)
    checked_step(model, x, norms)  # the check, then one more micro-batch
    before = calls["n"]
    norms.attach()
    for _ in range(3):
        norms.start_micro_batch(6)
        model(x).sum().backward()
        acc, _, bad = norms.close_micro_batch()
        assert bad is None and acc is not None
    assert calls["n"] == before  # decided during the first steps, not again


@pytest.mark.parametrize("inplace", [False, True])
def test_plain_2d_layers_take_the_lean_hook_and_stay_exact(inplace: bool) -> None:
    """A 2-D MLP's Linears are hooked through their autograd node (site_hooks._lean): the
    norms equal torch.func's, with an in-place activation right after each output, and a
    second backward through a kept graph adds its norms as the tensor hooks did."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(inplace=inplace), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3)
    )
    x, w = torch.randn(6, 5), torch.linspace(-1, 1, 3)
    named = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xi: Tensor) -> Tensor:
        return (functional_call(model, p, (xi.unsqueeze(0),)) * w).sum()

    g = vmap(grad(loss), in_dims=(None, 0))(named, x)
    exact = sum(v.flatten(1).square().sum(1) for v in g.values())
    norms = PerExampleNorms(model)
    norms.attach()
    norms.start_micro_batch(6)
    norms.start_check(None)
    (model(x) * w).sum().backward()
    norms.close_micro_batch()
    assert norms.left_out == {}
    calls: list[str] = []
    for site in norms.sites.values():  # count the lean hooks' calls from here on

        def counted(grads: tuple, hook=site.lean_hook, name=site.name) -> None:
            calls.append(name)
            hook(grads)

        site.lean_hook = counted
    for backwards in (1, 2):
        norms.start_micro_batch(6)
        out = (model(x) * w).sum()
        for _ in range(backwards):
            out.backward(retain_graph=True)
        acc, _, bad = norms.close_micro_batch()
        assert bad is None
        torch.testing.assert_close(acc, exact * backwards, rtol=1e-5, atol=1e-7)
    assert sorted(calls) == sorted(list(norms.sites) * 3)  # every Linear, 1 + 2 backwards
    norms.detach()


def test_deferred_linear_rows_sum_to_the_exact_norms() -> None:
    """With ``record.defer_rows`` (the step path), plain 2-D Linears keep row norms
    (norms/record.py) whose step sum equals Σ over examples of torch.func's |g_i|²: a
    bias-less layer, a frozen weight and a LayerNorm (its rule's per-example sums stay in
    ``acc``) included, over two micro-batches of different sizes and a second backward
    through a kept graph."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7),
        nn.ReLU(),
        nn.Linear(7, 7, bias=False),
        nn.LayerNorm(7),
        nn.Tanh(),
        nn.Linear(7, 3),
    )
    model[5].weight.requires_grad_(False)  # only its bias is measured
    named = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    w = torch.linspace(-1, 1, 3)

    def loss(p: dict, xi: Tensor) -> Tensor:
        return (functional_call(model, p, (xi.unsqueeze(0),)) * w).sum()

    norms = PerExampleNorms(model)
    norms.record.defer_rows = True
    norms.attach()
    norms.start_micro_batch(6)
    norms.start_check(None)
    (model(torch.randn(6, 5)) * w).sum().backward()
    norms.close_micro_batch()
    assert norms.take_rows() is None and norms.left_out == {}
    for n, backwards in ((6, 1), (4, 2)):
        x = torch.randn(n, 5)
        g = vmap(grad(loss), in_dims=(None, 0))(named, x)
        exact = sum(v.flatten(1).square().sum(1) for v in g.values()).sum()
        norms.start_micro_batch(n)
        out = (model(x) * w).sum()
        for _ in range(backwards):
            out.backward(retain_graph=True)
        acc, _, bad = norms.close_micro_batch()
        rows = norms.take_rows()
        assert bad is None and acc is not None and rows is not None and rows.n == n
        assert len(rows.weight_g) == 2 * backwards and len(rows.bias_g) == 2 * backwards
        total = rows_sum([rows]) + acc.sum()
        torch.testing.assert_close(total, exact * backwards, rtol=1e-5, atol=1e-6)
    norms.start_micro_batch(6)  # a micro-batch that cannot be used keeps no rows
    (model(torch.randn(6, 5)) * w).sum().backward()
    norms.record.bad = "a reason"
    assert norms.close_micro_batch()[2] == "a reason" and norms.take_rows() is None
    norms.detach()


class _AuxThenOut(torch.autograd.Function):
    """(aux, x W^T + b): the layer's output is its node's second output."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        ctx.save_for_backward(x, w)
        return x.sum(1, keepdim=True), x @ w.T + b

    @staticmethod
    def backward(ctx, g_aux: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        return g @ w + g_aux.expand_as(x), g.T @ x, g.sum(0)


class _FusedLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return _AuxThenOut.apply(x, self.weight, self.bias)[1]


def test_an_output_that_is_not_its_nodes_first_takes_the_general_hook() -> None:
    """A layer whose output is output 1 of its autograd node (a fused kernel returning
    (aux, out)): the lean pre-hook would read output 0's gradient, so the call takes the
    general tensor hook, and the norms stay exact (the Linear rule, registered for it)."""
    from lightning_gns.norms.rules import NORM_RULES, register_norm

    register_norm(_FusedLinear)(NORM_RULES[nn.Linear])
    try:
        torch.manual_seed(0)
        model = nn.Sequential(_FusedLinear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        x, w = torch.randn(6, 4), torch.linspace(-1, 1, 2)  # checked_step's weights
        exact = []  # one backward per example (torch.func cannot run the Function)
        for xi in x:
            model.zero_grad()
            (model(xi.unsqueeze(0)) * w).sum().backward()
            exact.append(sum(p.grad.square().sum() for p in model.parameters()))
        model.zero_grad()
        norms = PerExampleNorms(model)
        acc, _, bad = checked_step(model, x, norms)
        assert bad is None and norms.left_out == {}
        torch.testing.assert_close(acc, torch.stack(exact), rtol=1e-5, atol=1e-7)
    finally:
        NORM_RULES.pop(_FusedLinear, None)
