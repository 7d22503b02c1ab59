"""The mixture-of-experts rules (norms/moe.py, norms/tokens.py) against exact per-example
gradients: tiny transformers MoE models (random weights, built from configurations) and a
``ModuleList``-experts toy, hooked by hand (tests/moe_zoo.py), with the loss of the whole model
so that the gradients reaching the MoE layers are realistic."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from moe_zoo import (
    MOE_MODELS,
    HandHooks,
    mixtral,
    moe_parameters,
    per_example_sq_norms,
    rule_sq_norms,
)
from torch import Tensor, nn

from lightning_gns.norms import moe, moe_forms, tokens

pytest.importorskip("transformers")


def _by_module(exact: dict[str, Tensor], key: str) -> Tensor:
    """The exact squared norms of a rule's key: one parameter, or a module's own parameters."""
    return sum(v for n, v in exact.items() if n == key or n.rsplit(".", 1)[0] == key)


def _compare(name: str, impl: str = "eager", dtype=torch.float64, n: int = 4, rtol=1e-5):
    torch.manual_seed(0)
    model, data, loss = MOE_MODELS[name](impl=impl) if impl != "eager" else MOE_MODELS[name]()
    model = model.to(dtype)
    x, y = data.tensors[0][:n], data.tensors[1][:n]
    exact, _ = per_example_sq_norms(model, x, y, loss, moe_parameters(model))
    got = rule_sq_norms(model, x, y, loss)
    covered = {p for key in got for p in exact if p == key or p.rsplit(".", 1)[0] == key}
    assert covered == set(exact)  # every MoE parameter has a rule
    for key, v in got.items():
        ref = _by_module(exact, key)
        assert ref.min() > 0, key
        torch.testing.assert_close(v, ref, rtol=rtol, atol=0, msg=key)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss", "toy_modulelist"])
def test_rules_give_the_exact_per_example_norms(name) -> None:
    """Router, stacked experts (Mixtral, Qwen2-MoE with its shared expert, OLMoE top-4 of 8,
    GPT-OSS's transposed experts with biases and its own gate), ModuleList experts."""
    _compare(name)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_the_experts_rule_does_not_depend_on_the_experts_implementation(impl) -> None:
    _compare("mixtral", impl=impl, dtype=torch.float32, rtol=2e-4)


FORMS = {  # the form, and its slots per (example, expert) group (None: the largest group)
    "grouped": ("grouped", None),
    "masked_gram": ("masked", None),
    "padded_to_largest_group": ("padded", None),
    "padded_to_T": ("padded", "T"),
    "bucketed": ("bucketed", None),  # groups in multiples of 8 slots, batched by size (CPU)
}


def _force(monkeypatch, form: str) -> None:
    """The experts rule takes ``form`` whatever its cost."""
    name, cap = FORMS[form]

    def chosen(key, num, t, *rest):  # noqa: ANN001, ANN002, ANN202
        return name, t if cap == "T" else moe_forms.largest_group(key, num), 1  # one at a time

    monkeypatch.setattr(moe_forms, "choose_form", chosen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_exact_forms_agree(monkeypatch, dtype) -> None:
    """Grouped (example, expert) gradients, the masked per-example Gram and the padded groups
    give the same norms (float32: F.grouped_mm; float64: its loop)."""
    torch.manual_seed(0)
    model, data, loss = mixtral()
    model = model.to(dtype)
    x, y = data.tensors[0][:4], data.tensors[1][:4]
    got = {}
    for name in FORMS:
        _force(monkeypatch, name)
        got[name] = rule_sq_norms(model, x, y, loss)
    first, *others = got.values()
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for other in others:
        for key in first:
            torch.testing.assert_close(other[key], first[key], rtol=rtol, atol=0)


def _experts_call(name: str) -> tuple[nn.Module, dict, dict[str, Tensor]]:
    """An experts module, its saved call, and autograd's gradient of its parameters."""
    torch.manual_seed(0)
    model, data, loss = MOE_MODELS[name]()
    model = model.double()
    x, y = data.tensors[0][:4], data.tensors[1][:4]
    hooks = HandHooks(model, 4)
    loss(model, x, y).backward()
    hooks.remove()
    key = next(k for k, m in hooks.modules.items() if moe.is_stacked_experts(m))
    module = hooks.modules[key]
    return module, hooks.calls[key], {k: p.grad for k, p in module.named_parameters()}


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_the_rules_recomputation_gives_autograds_gradient(name) -> None:
    """The structural check's test for the experts rule: the whole gradient rebuilt from the
    rule's own recomputation equals autograd's; a gate the rule would model wrongly does not."""
    module, call, truth = _experts_call(name)
    mine = moe.stacked_experts_grads(module, call["args"], call["kwargs"], call["grads"][0])
    assert set(mine) == set(truth)
    for k in truth:
        torch.testing.assert_close(mine[k], truth[k], rtol=1e-10, atol=1e-14)
    module._apply_gate = lambda z: F.gelu(z[..., ::2]) * z[..., 1::2]  # not what ran
    wrong = moe.stacked_experts_grads(module, call["args"], call["kwargs"], call["grads"][0])
    up = "gate_up_proj"
    assert (wrong[up] - truth[up]).norm() > 0.1 * truth[up].norm()


def test_experts_layouts_no_rule_models_are_named() -> None:
    module, _, _ = _experts_call("mixtral")
    assert moe.token_rule_for(module) is moe.stacked_experts_norm
    module.has_post_expert_norm = True
    assert "has_post_expert_norm" in moe.stacked_experts_problem(module)
    assert moe.token_rule_for(module) is None
    module.has_post_expert_norm = False
    module.extra = nn.Parameter(torch.zeros(3))
    assert "extra" in moe.stacked_experts_problem(module)
    assert not moe.is_stacked_experts(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# token -> example maps


def test_a_flatten_of_the_batch_is_recognised_and_others_are_not() -> None:
    b, t, d = 4, 6, 3
    x = torch.randn(b, t, d, requires_grad=True) * 1.0  # a non-leaf, as inside a model
    assert tokens.flattened_from(x.view(-1, d), b) == t  # a view: its base
    assert tokens.flattened_from(x.view(-1, d).reshape(-1, d), b) == t
    assert tokens.flattened_from(torch.randn(b, t, d).view(-1, d), b) == t  # no grad: its base
    assert tokens.flattened_from(x.view(-1, d).detach(), b) is None  # no base, no history
    assert tokens.flattened_from(x.view(-1, d).clone(), b) is None  # a copy: unknown
    assert tokens.flattened_from(x.transpose(0, 1).reshape(-1, d), b) is None  # T-major, T≠B
    assert tokens.flattened_from(x, b) is None  # dim 0 is the batch itself
    assert tokens.flattened_from(torch.randn(b * t, d), b) is None  # no history
    assert tokens.flattened_from(x.view(-1, 2) * 1.0, b) is None  # not a reshape
    assert tokens.flattened_from((x * 1.0).view(-1, 2), b) == t * d // 2  # rows of 2 elements


def test_gathered_rows_are_read_off_autogards_graph() -> None:
    b, t, d = 3, 5, 4
    x = torch.randn(b, t, d, requires_grad=True) * 1.0
    h = x.view(-1, d)
    idx = torch.tensor([7, 0, 14, 3])
    mask = torch.zeros(b * t, dtype=torch.bool)
    mask[[2, 9, 11]] = True
    for rows, want in (
        (h[None, idx].reshape(-1, d), idx),  # transformers 4.x Mixtral
        (h[idx], idx),
        (torch.index_select(h, 0, idx), idx),
        (h[mask], torch.tensor([2, 9, 11])),
    ):
        got = tokens.gathered_rows(rows, b)
        assert got is not None and got[1] == t
        assert torch.equal(got[0], want)
        placed = tokens.to_examples(rows, got, b)
        assert torch.equal(placed.reshape(-1, d)[want], rows)
        packed = tokens.to_examples(rows, tokens.token_map(rows, b), b)  # per example, no gaps
        example = want // t
        assert packed.shape[1] == int(torch.bincount(example).max())
        for j in range(b):
            torch.testing.assert_close(packed[j].sum(0), rows[example == j].sum(0))
    assert tokens.gathered_rows(torch.randn(b * t, d)[idx], b) is None  # no history
    assert tokens.gathered_rows(x.transpose(0, 1).reshape(-1, d)[idx], b) is None  # T-major
    assert tokens.gathered_rows(h[idx] * 2, b) is None  # not a gather (an expert's inner layer)


def test_slices_agree_tells_routers_from_modules_that_mix_examples() -> None:
    torch.manual_seed(0)
    model, data, loss = mixtral()
    hooks = HandHooks(model, 4)
    loss(model, data.tensors[0][:4], data.tensors[1][:4]).backward()
    hooks.remove()
    key = "model.layers.0.mlp.gate"
    call = hooks.calls[key]
    router = hooks.modules[key]
    assert tokens.slices_agree(router, (call["args"], call["kwargs"]), call["outs"], 4, 16)

    class BatchCentred(nn.Linear):  # centres the logits over all tokens: mixes the examples
        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            return out - out.mean(0)

    mixer = BatchCentred(32, 4)
    x = torch.randn(64, 32)
    assert not tokens.slices_agree(mixer, ((x,), {}), [mixer(x)], 4, 16)


def test_b_simple_of_the_moe_parameters_from_the_rules() -> None:
    """Over 64 examples (4 batches of 16), Σ_j |g_j|² over the MoE parameters from the rules
    equals the exact one, so B_simple = (mean |g_j|² − |G|²)/|G|² over them does too."""
    torch.manual_seed(0)
    model, data, loss = mixtral()
    model = model.double()
    x, y = data.tensors[0][:64], data.tensors[1][:64]
    params = moe_parameters(model)
    exact, mean_grad = per_example_sq_norms(model, x, y, loss, params)
    ruled = torch.zeros(64, dtype=torch.float64)
    for s in range(0, 64, 16):
        got = rule_sq_norms(model, x[s : s + 16], y[s : s + 16], loss)
        ruled[s : s + 16] = sum(got.values())
    truth = sum(exact.values())
    g2 = mean_grad.square().sum()

    def b_simple(sq: Tensor) -> float:
        return float((sq.mean() - g2) / g2 * 64 / 63)  # tr(Σ) unbiased over the 64

    torch.testing.assert_close(ruled, truth, rtol=1e-9, atol=0)
    assert b_simple(ruled) == pytest.approx(b_simple(truth), rel=1e-8)
    assert b_simple(truth) > 1.0  # a noise scale that means something


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_experts_alone_with_expert_parallel_sentinels(dtype, form, monkeypatch) -> None:
    """Index E marks a pair another rank serves (expert parallelism): the experts skip it,
    and so does the rule, in each form. float64 takes the loops over experts, float32
    ``F.grouped_mm``."""
    _force(monkeypatch, form)
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    b, t, k, num, d = 3, 5, 2, 4, 8
    cfg = MixtralConfig(hidden_size=d, intermediate_size=12, num_local_experts=num)
    cfg._experts_implementation = "eager"
    experts = MixtralExperts(cfg).to(dtype)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(b * t, d, dtype=dtype)
    idx = torch.stack([torch.randperm(num)[:k] for _ in range(b * t)])
    idx[[1, 6, 7], 0] = num  # sentinels
    w = torch.rand(b * t, k, dtype=dtype)
    g = torch.randn(b * t, d, dtype=dtype)
    params = dict(experts.named_parameters())
    exact = {name: torch.zeros(b, dtype=torch.float64) for name in params}
    for j in range(b):
        rows = slice(j * t, (j + 1) * t)
        out = experts(x[rows], idx[rows], w[rows])
        grads = torch.autograd.grad((out * g[rows]).sum(), list(params.values()))
        for name, gr in zip(params, grads, strict=True):
            exact[name][j] = gr.double().square().sum()
    got = moe.stacked_experts_norm(experts, (x, idx, w), {}, g, b)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for name in params:
        torch.testing.assert_close(got[name].double(), exact[name], rtol=rtol, atol=0)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_a_gate_call_whose_rows_do_not_match_poisons_the_norms(name) -> None:
    """After the check, the rule takes the forward's gate call (z·v, h, and dz from backward)
    without reading anything back: rows out of place make every norm NaN (the step is dropped
    and counted), never a wrong value; the right call gives the recomputation's norms (GPT-OSS:
    biases in z, a gate of its own)."""
    torch.manual_seed(0)
    model, data, loss = MOE_MODELS[name](impl="grouped_mm")
    x, y = data.tensors[0][:4], data.tensors[1][:4]
    hooks = HandHooks(model, 4, tap=True)
    try:
        loss(model, x, y).backward()
    finally:
        hooks.remove()
    key = next(k for k, m in hooks.modules.items() if moe.is_stacked_experts(m))
    module, rec = hooks.modules[key], hooks.calls[key]
    call = rec["gate"]
    assert call is not None and call.dz is not None and "_apply_gate" not in module.__dict__
    args, kwargs, g = rec["args"], rec["kwargs"], rec["grads"][0]
    plain = moe.stacked_experts_norm(module, args, kwargs, g, 4)
    taken = moe.stacked_experts_norm(module, args, kwargs, g, 4, call)
    moved = moe.GateCall(call.zv.roll(1, 0), call.h.roll(1, 0))
    moved.keep_dz(call.dz.roll(1, 0))
    shuffled = moe.stacked_experts_norm(module, args, kwargs, g, 4, moved)
    for name in plain:
        torch.testing.assert_close(taken[name], plain[name], rtol=1e-4, atol=0)
        assert shuffled[name].isnan().all()


def test_a_tapped_model_copies_without_the_kept_activations() -> None:
    """``copy.deepcopy`` or pickling of a model while hooked (an EMA copy, ``torch.save``): the
    copy's gate is its own, keeps nothing from the original's forward nor records its own,
    and computes the same outputs."""
    torch.manual_seed(0)
    model, data, _ = MOE_MODELS["mixtral"](impl="grouped_mm")
    experts = [m for m in model.modules() if moe.is_stacked_experts(m)]
    for m in experts:
        moe.tap_gate(m)
    x = data.tensors[0][:2]
    out = model(x).logits
    assert all(len(m.__dict__["_apply_gate"].kept) == 1 for m in experts)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        taps = [m.__dict__["_apply_gate"] for m in clone.modules() if moe.is_stacked_experts(m)]
        assert all(tap.kept == [] and not tap.active for tap in taps)
        torch.testing.assert_close(clone(x).logits, out)
        assert all(tap.kept == [] for tap in taps)
    for m in experts:
        moe.untap_gate(m)
    assert not [m for m in model.modules() if "_apply_gate" in m.__dict__]


@pytest.mark.parametrize("per_token", [True, False])
def test_the_forms_in_pair_order_with_sentinels(per_token) -> None:
    """The pair-order forms (the grouped form's fallback off a CPU is padded to T) against
    the per-(example, expert) gradients built by hand, sentinels (index E) included."""
    torch.manual_seed(0)
    b, t, k, num, d_a, d_g = 3, 6, 2, 4, 5, 7
    key = torch.stack([torch.stack([torch.randperm(num)[:k] for _ in range(t)]) for _ in range(b)])
    key = key.reshape(b, t * k)
    key[0, 3] = key[2, 0] = num
    a = torch.randn(b, t if per_token else t * k, d_a, dtype=torch.float64)
    g = torch.randn(b, t * k, d_g, dtype=torch.float64)
    rows = a.repeat_interleave(k, 1) if per_token else a
    want = torch.stack(
        [
            sum((g[j, key[j] == e].mT @ rows[j, key[j] == e]).square().sum() for e in range(num))
            for j in range(b)
        ]
    )
    example = torch.arange(b).repeat_interleave(t * k)
    rows_a = rows.reshape(b * t * k, d_a)
    for got in (
        moe_forms.routed_padded(a, g, key, num, t, k),
        moe_forms.routed_padded(a, g, key, num, t, k, t),
        moe_forms.routed_masked_gram(a, g, key, num, t, k),
        moe_forms.routed_masked_gram(a, g, key, num, t, k, chunk=2),
        moe_forms.routed_grouped(a, g, key, num, t, k),
        moe_forms.padded_sq_norm(
            rows_a, g.reshape(-1, d_g), example, key.reshape(-1), b, num, t, chunk=2
        ),
        moe_forms.bucketed_sq_norm(rows_a, g.reshape(-1, d_g), example, key.reshape(-1), b, num),
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_the_forms_buffers_are_budgeted(monkeypatch) -> None:
    """Only forms whose buffers for one example fit in the budget compete, over as many
    examples at once as fit; if none fits, the smallest buffers win (at Mixtral-8x7B's sizes
    on a device: the masked Gram, 0.2 G elements, not the grouped form's 1.1 G)."""
    key = torch.zeros(4, 16 * 2, dtype=torch.long)
    assert moe_forms.choose_form(key, 8, 16, 2, 32, 96, True)[2] >= 4  # all at once
    monkeypatch.setattr(moe_forms, "_HELD", 1)  # nothing fits
    assert moe_forms.choose_form(key, 8, 16, 2, 32, 96, True)[2] == 1
    big = torch.zeros(1, 4096 * 2, dtype=torch.long, device="meta")
    monkeypatch.setattr(moe_forms, "_HELD", 1 << 25)
    assert moe_forms.choose_form(big, 8, 4096, 2, 4096, 2 * 14336, True)[0] == "masked"


@pytest.mark.parametrize("d_a,d_g", [(5, 7), (40, 56)])  # groups materialised; Grams
def test_the_bucketed_form_reads_per_token_sides_off_token_grams(d_a, d_g) -> None:
    """The bucketed form with a side per token (x for up; c = w·g for down), its Grams read
    off the examples' token Grams, against the same rows gathered, sentinels included."""
    torch.manual_seed(0)
    b, t, k, num = 3, 6, 2, 4
    key = torch.stack([torch.randperm(num)[:k] for _ in range(b * t)]).reshape(-1)
    key[[3, 20]] = num
    order = torch.argsort(key, stable=True)
    tok, key_s = order // k, key[order]
    example = tok // t
    x = torch.randn(b * t, d_a, dtype=torch.float64)
    g = torch.randn(b * t, d_g, dtype=torch.float64)
    w = torch.rand(b * t * k, dtype=torch.float64)[order]
    pair_a = torch.randn(b * t * k, d_a, dtype=torch.float64)
    pair_g = torch.randn(b * t * k, d_g, dtype=torch.float64)
    lay = moe_forms.Buckets(example, key_s, b, num)
    for a_side, g_side, a_rows, g_rows in (
        (moe_forms.TokenSide(x, tok, t), lay.rows(pair_g), x[tok], pair_g),
        (lay.rows(pair_a), moe_forms.TokenSide(g, tok, t, w), pair_a, w[:, None] * g[tok]),
    ):
        want = moe_forms.bucketed_sq_norm(a_rows, g_rows, example, key_s, b, num)
        torch.testing.assert_close(lay.sq_norm(a_side, g_side), want, rtol=1e-10, atol=0)
        brute = torch.stack(
            [
                sum(
                    (g_rows[m].mT @ a_rows[m]).square().sum()
                    for e in range(num)
                    if (m := (example == j) & (key_s == e)).any()
                )
                for j in range(b)
            ]
        )
        torch.testing.assert_close(want, brute, rtol=1e-10, atol=0)


def _tap_norms(router: nn.Module, b: int, t: int) -> tuple[object, object, Tensor]:
    """A site of ``router`` and the hooks' state it reads under torch.compile (the batch size,
    its sink, the flatten of the batch its input is), for moe_compiled's taps."""
    from types import SimpleNamespace

    sink = torch.zeros(b, requires_grad=True)
    record = SimpleNamespace(batch_size=b, sink_for=lambda site: sink)
    scopes = SimpleNamespace(map_for=lambda name, x: (None, t))
    params = dict(router.named_parameters())
    site = SimpleNamespace(name="gate", module=router, params=params, shared=set())
    return SimpleNamespace(record=record, scopes=scopes), site, sink


@pytest.mark.parametrize("name, renormalise", [("mixtral", None), ("qwen2_moe", True),
                                               ("qwen2_moe", False)])  # fmt: skip
def test_a_tapped_router_gives_its_outputs_and_the_exact_norms(name, renormalise) -> None:
    """Compiled, a router of a known form has its logits tapped and its scores recomputed from
    them (norms/moe_compiled.py): the same outputs as its forward, and per-example norms of
    ∂L/∂W for a loss of both logits and scores equal to one backward per example."""
    from lightning_gns.norms import moe_compiled

    torch.manual_seed(0)
    router = MOE_MODELS[name]()[0].model.layers[0].mlp.gate.double()
    if renormalise is not None:
        router.norm_topk_prob = renormalise
    b, t = 3, 5
    norms, site, sink = _tap_norms(router, b, t)
    hook = moe_compiled.compiled_hook(norms, site)
    assert hook is not None
    x = torch.randn(b, t, router.hidden_dim, dtype=torch.float64).view(b * t, -1)
    out = router(x)
    tapped = hook(router, (x,), {}, out)
    for got, want in zip(tapped, out, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    r = [torch.randn_like(v.double()) for v in out[:2]]

    def loss(logits: Tensor, scores: Tensor) -> Tensor:  # per token
        return (logits * r[0]).sum(1) + (scores * r[1]).sum(1)

    loss(*tapped[:2]).sum().backward()
    per_token = loss(*router(x)[:2])
    exact = torch.stack([
        torch.autograd.grad(per_token[j * t : (j + 1) * t].sum(), router.weight,
                            retain_graph=True)[0].square().sum()
        for j in range(b)
    ])  # fmt: skip
    assert exact.min() > 0
    torch.testing.assert_close(sink.grad.double(), exact, rtol=1e-5, atol=0)


def _experts_exact(
    experts: nn.Module, x: Tensor, index: Tensor, w: Tensor, r: Tensor, b: int
) -> Tensor:
    """Each example's squared gradient norm of the loss Σ experts(x)·r over the experts'
    parameters, one backward per example (its T rows of x)."""
    t = x.shape[0] // b
    params = [p for p in experts.parameters() if p.requires_grad]
    per_token = (experts(x, index, w) * r).sum(1)
    return torch.stack([
        sum(v.square().sum() for v in torch.autograd.grad(
            per_token[j * t : (j + 1) * t].sum(), params, retain_graph=True))
        for j in range(b)
    ])  # fmt: skip


@pytest.mark.parametrize("impl, dtype, rtol", [("grouped_mm", torch.float32, 2e-4),
                                               ("eager", torch.float64, 1e-5)])  # fmt: skip
def test_the_experts_tap_gives_the_exact_norms(impl, dtype, rtol) -> None:
    """Compiled, where the gate's rows are not taken (the eager loop, rows not verified), the
    experts' output goes through ExpertsTap, whose backward runs their rule in a custom op
    (recomputing z): the norms of one backward per example."""
    from lightning_gns.norms import moe_compiled

    torch.manual_seed(0)
    experts = mixtral(impl=impl)[0].model.layers[0].mlp.experts.to(dtype)
    b, t, d = 3, 5, experts.gate_up_proj.shape[-1]
    norms, site, sink = _tap_norms(experts, b, t)
    hook = moe_compiled.compiled_hook(norms, site)
    assert hook is not None
    x = torch.randn(b * t, d, dtype=dtype)
    logits = torch.randn(b * t, experts.num_experts, dtype=dtype)
    w, index = torch.topk(logits.softmax(-1), 2, dim=-1)
    out = experts(x, index, w)
    r = torch.randn_like(out)
    (hook(experts, (x, index, w), {}, out) * r).sum().backward()
    moe.untap_gate(experts)
    exact = _experts_exact(experts, x, index, w, r, b)
    torch.testing.assert_close(sink.grad.double(), exact.double(), rtol=rtol, atol=0)


def test_the_taken_experts_rule_checks_the_rows_order() -> None:
    """Compiled, with the gate's rows taken (grouped_mm, verified by the eager steps), the
    custom op gets the forward's z and dz: exact, and the rows' order is still checked on the
    step itself. A compiled sort may order tied experts otherwise: two tied rows of different
    examples swapped give a NaN step, not finite wrong norms."""
    from lightning_gns.norms import moe_compiled

    torch.manual_seed(0)
    ex = mixtral(impl="grouped_mm")[0].model.layers[0].mlp.experts  # (float32 only)
    b, t, d = 3, 5, ex.gate_up_proj.shape[-1]
    x = torch.randn(b * t, d)
    logits = torch.randn(b * t, ex.num_experts)
    w, index = torch.topk(logits.softmax(-1), 2, dim=-1)
    kept: dict[str, Tensor] = {}
    gate = type(ex)._apply_gate

    def keep(self: nn.Module, z: Tensor) -> Tensor:
        kept["z"] = z
        z.register_hook(lambda g: kept.__setitem__("dz", g))
        return gate(self, z)

    ex._apply_gate = keep.__get__(ex)  # the forward's own z and dz
    out = ex(x, index, w)
    r = torch.randn_like(out)
    (out * r).sum().backward()
    del ex._apply_gate
    exact = _experts_exact(ex, x, index, w, r, b)
    key = id(ex)
    moe_compiled._EXPERTS[key] = ex
    moe.tap_gate(ex)
    ex.__dict__["_apply_gate"].verified = True  # as after the eager steps
    z, dz = kept["z"].detach(), kept["dz"]
    got = moe_compiled._taken_sq_norms(key, x, index, w, r, z, dz, b)
    torch.testing.assert_close(got, exact, rtol=2e-4, atol=0)
    order = torch.sort(index.reshape(-1), stable=True)[1]
    expert, example = index.reshape(-1)[order], order // 2 // t
    i, j = next(
        (i, j)
        for i in range(len(order))
        for j in range(i + 1, len(order))
        if expert[i] == expert[j] and example[i] != example[j]
    )
    swap = torch.arange(len(order))
    swap[i], swap[j] = j, i
    bad = moe_compiled._taken_sq_norms(key, x, index, w, r, z[swap], dz[swap], b)
    assert bad.isnan().all(), bad
    moe.untap_gate(ex)


def test_the_compile_warning_names_only_the_layers_that_split_the_graph() -> None:
    """Compiled, routers of a known form and stacked experts are in the graph: the warning
    about layers on the torch.func fallback leaves them out; sharded by FSDP2 (their forward
    takes unsharded copies, the generic path), they are named again."""
    from types import SimpleNamespace

    from lightning_gns.norms import PerExampleNorms
    from lightning_gns.trainer_setup import warn_if_compiled_fallback

    model = mixtral()[0]
    module = SimpleNamespace(modules=lambda: [torch.compile(model)])
    source = SimpleNamespace(norms=PerExampleNorms(model))
    said: list[str] = []
    warn = lambda key, text: said.append(text)  # noqa: E731
    warn_if_compiled_fallback(module, source, warn)  # type: ignore[arg-type]
    assert said == []
    router = model.model.layers[0].mlp.gate
    router.weight.placements = ()  # as a DTensor's (FSDP2)
    warn_if_compiled_fallback(module, source, warn)  # type: ignore[arg-type]
    assert len(said) == 1 and "layers.0.mlp.gate" in said[0], said
    assert "layers.0.mlp.experts" not in said[0] and "layers.1.mlp.gate" not in said[0]


def test_only_routers_of_a_known_form_are_tapped() -> None:
    """A router whose forward is not one of the forms read (GraniteMoe's: top-k of the logits,
    then softmax), a subclass overriding the forward, or one with a second parameter, keeps
    the generic path (after backward, exact; its graph splits)."""
    from transformers import GraniteMoeConfig
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from lightning_gns.norms.moe_compiled import router_form

    mixtral_router = mixtral()[0].model.layers[0].mlp.gate
    assert router_form(mixtral_router) == ("always", False)

    class Scaled(MixtralTopKRouter):
        def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            logits, scores, index = super().forward(hidden_states)
            return logits, 2 * scores, index

    other = Scaled(_mixtral_config())
    cfg = GraniteMoeConfig(hidden_size=32, num_local_experts=4, num_experts_per_tok=2)
    biased = copy.deepcopy(mixtral_router)
    biased.bias = nn.Parameter(torch.zeros(4))
    for router in (GraniteMoeTopKRouter(cfg), other, biased):
        assert router_form(router) is None, type(router).__name__


def _mixtral_config():  # noqa: ANN202
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=32, num_local_experts=4, num_experts_per_tok=2)


@pytest.mark.slow
def test_a_compiled_moe_model_gives_the_eager_estimate(tmp_path, monkeypatch) -> None:
    """Qwen2-MoE (routers, stacked experts, and the shared expert's Linears and gate on the
    flattened tokens) under torch.compile: every parameter covered, no step skipped, and the
    whole model's and every MoE layer's |G|² and tr(Σ) as eager; in one graph, no break (the
    routers' and the experts' taps, norms/moe_compiled.py; 18 graphs, 11 breaks before), and
    no host read between logging steps. The experts' rule takes the forward's z and dz
    (through the gate's tap), never recomputing them."""
    import lightning.pytorch as pl
    from helpers import trainer_kwargs
    from torch._dynamo.utils import counters
    from zoo import ZooModule

    from lightning_gns import GradientNoiseScale, forbid_host_sync
    from lightning_gns.norms import moe_compiled

    calls = {"taken": 0, "recomputed": 0}
    for kind, name in (("taken", "_taken_sq_norms"), ("recomputed", "_experts_sq_norms")):
        inner = getattr(moe_compiled, name)

        def counted(*args, inner=inner, kind=kind):  # noqa: ANN002, ANN202
            calls[kind] += 1
            return inner(*args)

        monkeypatch.setattr(moe_compiled, name, counted)

    found = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model, data, loss = MOE_MODELS["qwen2_moe"](impl="grouped_mm")
        module = ZooModule(model, data, loss, 8)
        if compiled:
            module.model = torch.compile(model)
        gns = GradientNoiseScale(source="per_example", per_layer=True, log_every_n_steps=4)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8), callbacks=[gns])
        with forbid_host_sync():
            trainer.fit(module)
        if compiled:
            breaks = dict(counters["graph_break"])
            assert counters["stats"]["unique_graphs"] == 1 and not breaks, breaks
            assert calls == {"taken": 2 * 7, "recomputed": 0}  # 2 MoE layers, 7 steps
        assert gns.coverage == 1.0 and gns.left_out == {}, gns.left_out
        assert gns.values.skipped == 0 and gns.values.steps == 7
        found[compiled] = {
            k.replace("._orig_mod", ""): (v.grad_norm_sq, v.grad_variance)
            for k, v in {"": gns.values, **gns.layer_values}.items()
            if k == "" or ".mlp." in k
        }
    assert len(found[False]) == 13 and set(found[True]) == set(found[False])
    for k, want in found[False].items():
        assert found[True][k] == pytest.approx(want, rel=1e-4), k
