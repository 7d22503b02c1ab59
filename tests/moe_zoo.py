"""Mixture-of-experts models for the MoE rules' tests and benchmark (random weights, nothing
downloaded), and a harness that hooks their MoE modules by hand and applies the rules of
:mod:`lightning_gns.norms.moe` (until the per-example hooks do it themselves)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from zoo import SEQ, hf_logits, lm_loss, text_data

from lightning_gns._compat import tree_flatten, tree_unflatten
from lightning_gns.norms import moe, tokens
from lightning_gns.norms.rules import norm_rule_for

WIDTH = 32


def _common(vocab: int, **kw: Any) -> dict[str, Any]:
    return dict(
        vocab_size=vocab, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, attn_implementation="eager",
        bos_token_id=0, eos_token_id=0, pad_token_id=None, **kw,
    )  # fmt: skip


def mixtral(
    impl: str = "eager", experts: int = 4, top_k: int = 2
) -> tuple[nn.Module, Any, Callable]:
    from transformers import MixtralConfig, MixtralForCausalLM

    data, vocab = text_data()
    cfg = MixtralConfig(
        **_common(vocab), intermediate_size=48, num_local_experts=experts,
        num_experts_per_tok=top_k, experts_implementation=impl,
    )  # fmt: skip
    return MixtralForCausalLM(cfg), data, lm_loss(hf_logits)


def qwen2_moe(impl: str = "eager") -> tuple[nn.Module, Any, Callable]:
    """Qwen2-MoE: 6 experts, top 2, and a shared expert with its sigmoid gate."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    data, vocab = text_data()
    cfg = Qwen2MoeConfig(
        **_common(vocab), intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
        experts_implementation=impl,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(cfg), data, lm_loss(hf_logits)


def olmoe(impl: str = "eager") -> tuple[nn.Module, Any, Callable]:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    data, vocab = text_data()
    cfg = OlmoeConfig(
        **_common(vocab), intermediate_size=24, num_experts=8, num_experts_per_tok=4,
        experts_implementation=impl,
    )  # fmt: skip
    return OlmoeForCausalLM(cfg), data, lm_loss(hf_logits)


def gpt_oss(impl: str = "eager") -> tuple[nn.Module, Any, Callable]:
    """GPT-OSS: experts stored transposed (E, d_in, d_out), with biases, interleaved gate/up and
    a clamped SwiGLU of its own."""
    from transformers import GptOssConfig, GptOssForCausalLM

    data, vocab = text_data()
    cfg = GptOssConfig(
        **_common(vocab), intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
        head_dim=8, experts_implementation=impl, layer_types=["full_attention"] * 2,
    )  # fmt: skip
    return GptOssForCausalLM(cfg), data, lm_loss(hf_logits)


class ToyExpert(nn.Module):
    """A SwiGLU MLP of three Linears, as older Mixtral code had (w1, w2, w3)."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ToyMoE(nn.Module):
    """A sparse MoE block with a ``ModuleList`` of experts, each called on its tokens:
    ``expert(hidden[None, idx].reshape(-1, d))``, as transformers 4.x Mixtral did."""

    def __init__(self, d: int, f: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(ToyExpert(d, f) for _ in range(experts))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = x.view(-1, d)
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(h)
        mask = F.one_hot(idx, len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            kpos, tok = torch.where(mask[e])
            y = expert(h[None, tok].reshape(-1, d)) * w[tok, kpos, None]
            out = out.index_add(0, tok, y)
        return out.view(b, t, d)


class ToyMoELM(nn.Module):
    """Token embedding, two pre-norm blocks (a causal mixer, then the MoE), a head."""

    def __init__(self, vocab: int, d: int = WIDTH, experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))
        self.moe = nn.ModuleList(ToyMoE(d, 48, experts, top_k) for _ in range(2))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        t = x.shape[1]
        causal = torch.tril(torch.ones(t, t, device=x.device, dtype=x.dtype))
        causal = causal / causal.sum(1, keepdim=True)
        for mix, norm, block in zip(self.mix, self.norms, self.moe, strict=True):
            x = x + torch.tanh(mix(causal @ x))
            x = x + block(norm(x))
        return self.head(x)


def toy_modulelist() -> tuple[nn.Module, Any, Callable]:
    data, vocab = text_data()
    return ToyMoELM(vocab), data, lm_loss(lambda m, x: m(x))


MOE_MODELS: dict[str, Callable[[], tuple[nn.Module, Any, Callable]]] = {
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "olmoe": olmoe,
    "gpt_oss": gpt_oss,
    "toy_modulelist": toy_modulelist,
}


def trained(name: str, steps: int = 150) -> tuple[nn.Module, Any, Callable]:
    """A model of :data:`MOE_MODELS` after ``steps`` Adam steps (batches of 16) on its data, so
    that the experts matter (at initialisation the MoE parameters carry ~0.2% of |G|²)."""
    torch.manual_seed(0)
    make = MOE_MODELS[name]
    model, data, loss = make() if name == "toy_modulelist" else make(impl="grouped_mm")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (16,), generator=gen)
        opt.zero_grad()
        loss(model, data.tensors[0][idx], data.tensors[1][idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, data, loss


def moe_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters of the modules that see flattened tokens (routers, experts, shared
    experts): those under a sparse MoE block."""
    blocks = [n for n, m in model.named_modules() if type(m).__name__.endswith(("MoeBlock", "MoE"))]
    blocks += [n for n, m in model.named_modules() if type(m).__name__ == "GptOssMLP"]
    return {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and any(n.startswith(b + ".") for b in blocks)
    }


# --------------------------------------------------------------------------------------------
# hooks by hand


class HandHooks:
    """Saves, for every module owning MoE parameters, its forward's inputs and outputs and the
    gradients of the outputs; for every module called on gathered rows, their tokens."""

    def __init__(self, model: nn.Module, batch: int, tap: bool = False) -> None:
        """``tap``: stacked experts keep their gate's call for their rule, as the callback's
        hooks do (``moe.GateTap``)."""
        self.batch = batch
        names = {n.rsplit(".", 1)[0] for n in moe_parameters(model)}
        self.modules = {n: m for n, m in model.named_modules() if n in names}
        for m in self.modules.values():
            if tap and moe.token_rule_for(m) is not None:
                moe.tap_gate(m)
        self.calls: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, tuple[Tensor, int]] = {}  # module -> (token of each row, T)
        self.handles = [
            m.register_forward_hook(partial(self._saved, n), with_kwargs=True)
            for n, m in self.modules.items()
        ]
        self.handles += [
            m.register_forward_pre_hook(partial(self._scope, n))
            for n, m in model.named_modules()
            if n and not isinstance(m, nn.ModuleList)
        ]

    def _scope(self, name: str, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            found = tokens.token_map(args[0], self.batch)
            if found is not None:
                self.rows[name] = found

    def _saved(self, name: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        """Outputs are replaced by views of themselves: their hooks then see only the gradient
        from outside the module (a router's scores are computed from its logits, whose own
        hook would also see the gradient that reaches them through the scores)."""
        leaves, spec = tree_flatten(out)
        leaves = [_fresh(t) for t in leaves]
        rec: dict[str, Any] = {"args": args, "kwargs": kwargs, "outs": leaves, "grads": {}}
        rec["gate"] = moe.gate_call(module)
        for i, t in enumerate(leaves):
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(partial(_keep, rec["grads"], i))
        self.calls[name] = rec
        return tree_unflatten(leaves, spec)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.modules.values():
            moe.untap_gate(m)

    def row_map(self, name: str, x: Tensor) -> tokens.TokenMap | None:
        """Tokens of x's rows: its own map, or the nearest enclosing module's (a shared
        expert's or ModuleList expert's inner layers see fresh tensors of the same rows)."""
        parts = name.split(".")
        while parts:
            got = self.rows.get(".".join(parts))
            n = x.shape[0]
            if got is not None and (
                got[0] is None
                and n == self.batch * got[1]
                or got[0] is not None
                and got[0].shape[0] == n
            ):
                return got
            parts.pop()
        return None

    def norms(self) -> dict[str, Tensor]:
        """Per-example squared norms (B,) by parameter name, from the rules."""
        b, out = self.batch, {}
        for name, module in self.modules.items():
            rec = self.calls[name]
            args, kwargs, g = rec["args"], rec["kwargs"], rec["grads"].get(0)
            x = args[0] if args else next(iter(kwargs.values()))
            rule = moe.token_rule_for(module)
            if rule is not None:
                got = rule(module, args, kwargs, g, b, rec["gate"])
            elif isinstance(module, nn.Linear):
                got = self._linear(name, module, x, g)
            else:
                params = dict(module.named_parameters(recurse=False))
                found = self.row_map(name, x)
                assert found is not None and found[0] is None, f"{name}: not flattened tokens"
                t = found[1]
                sq = tokens.token_generic_sq_norms(
                    module, params, (args, kwargs), rec["outs"], rec["grads"], b, t
                )
                got = {"": sq}
            for attr, v in got.items():
                out[f"{name}.{attr}" if attr else name] = v
        return out

    def _linear(self, name: str, module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        rule = norm_rule_for(module)
        assert rule is not None
        found = self.row_map(name, x)
        assert found is not None, f"{name}: no token map"
        b = self.batch
        return rule(module, tokens.to_examples(x, found, b), tokens.to_examples(g, found, b))


def _fresh(t: Any) -> Any:
    return t.view_as(t) if isinstance(t, Tensor) and t.requires_grad else t


def _keep(store: dict[int, Tensor], i: int, g: Tensor) -> None:
    store[i] = g.detach()


def per_example_sq_norms(
    model: nn.Module, x: Tensor, y: Tensor, loss: Callable, params: dict[str, nn.Parameter]
) -> tuple[dict[str, Tensor], Tensor]:
    """Exact per-example squared norms (n,) by parameter name (one backward per example), and
    the mean gradient over the examples, flattened over ``params`` (float64)."""
    names, ps = list(params), list(params.values())
    sq = {n: torch.zeros(len(x), dtype=torch.float64) for n in names}
    total = torch.zeros(sum(p.numel() for p in ps), dtype=torch.float64)
    for j in range(len(x)):
        grads = torch.autograd.grad(loss(model, x[j : j + 1], y[j : j + 1]), ps)
        for n, gr in zip(names, grads, strict=True):
            sq[n][j] = gr.double().square().sum()
        total += torch.cat([gr.double().flatten() for gr in grads])
    return sq, total / len(x)


def rule_sq_norms(model: nn.Module, x: Tensor, y: Tensor, loss: Callable) -> dict[str, Tensor]:
    """Per-example squared norms by parameter name from the rules, one batch forward/backward
    (the loss is the mean over examples, so the gradients are scaled back by B)."""
    b = len(x)
    hooks = HandHooks(model, b)
    try:
        (loss(model, x, y) * b).backward()
        return {n: v.double() for n, v in hooks.norms().items()}
    finally:
        hooks.remove()
        model.zero_grad(set_to_none=True)
