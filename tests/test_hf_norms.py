"""Hugging Face's RMSNorm classes have rules of their own (no torch.func fallback).

Per layer: each registered class's rule equals torch.func per-example gradients of the class's
own forward, float32 and (under mixed precision) bfloat16 and float16 inputs, where the
forward rounds x̂ (before the weight: Llama; after: Gemma, OLMo 2) matters. Per model: small
models built from configurations (random weights, nothing downloaded) are measured whole,
exactly, with no RMSNorm on the fallback (Gemma's embedding scale set to 1 there; its scaled
embedding is tested on its own below);
compiled, a Llama gives the eager estimate in one graph, and ``source="auto"`` takes
per-example norms with accumulation.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_hf_coverage import t5
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns.norms import PerExampleNorms
from lightning_gns.norms.rules import (
    _HF_RMS_NORMS,
    hf_rms_norm_cast_first,
    hf_rms_norm_float32,
    norm_rule_for,
)

pytest.importorskip("transformers")

V, T, B = 40, 8, 4  # vocabulary (test_hf_coverage.t5 has its own: 40 too), tokens, examples
NAMES = [name for names in _HF_RMS_NORMS.values() for name in names]


def norm_class(name: str) -> type[nn.Module]:
    path, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"transformers.models.{path}"), cls)


def layer_case(name: str, dtype: torch.dtype) -> tuple[nn.Module, Tensor, Tensor]:
    """The layer (random float32 weight), an input of ``dtype`` and its output's gradient."""
    torch.manual_seed(0)
    layer = norm_class(name)(6, eps=1e-5)
    with torch.no_grad():
        layer.weight.normal_()  # (Gemma's starts at zero)
    x = (torch.randn(3, 5, 6) * 3).to(dtype)
    r = torch.randn(3, 5, 6)
    out = layer(x)
    kept: list[Tensor] = []
    out.register_hook(kept.append)
    (out.float() * r).sum().backward()
    return layer, x, kept[0]


def func_weight_sq(layer: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """|∂ℓ_j/∂w|² from torch.func, ℓ_j = <layer(x_j), g_j>."""
    w = {"weight": layer.weight.detach()}

    def loss(p: dict[str, Tensor], xj: Tensor, gj: Tensor) -> Tensor:
        return (functional_call(layer, p, (xj[None],)).float() * gj[None].float()).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(w, x, g)["weight"].square().sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_each_rule_equals_torch_func_on_its_class(name: str, dtype: torch.dtype) -> None:
    layer, x, g = layer_case(name, dtype)
    rule = norm_rule_for(layer)
    assert rule is not None and rule in _HF_RMS_NORMS and name in _HF_RMS_NORMS[rule]
    got = rule(layer, x, g)
    assert set(got) == {"weight"} and got["weight"].dtype == torch.float32
    truth = func_weight_sq(layer, x, g)
    torch.testing.assert_close(got["weight"], truth, rtol=1e-5, atol=0)
    if dtype != torch.float32 and rule in (hf_rms_norm_cast_first, hf_rms_norm_float32):
        # where x̂ is rounded matters at this precision: the other form is measurably off
        other = hf_rms_norm_float32 if rule is hf_rms_norm_cast_first else hf_rms_norm_cast_first
        if not hasattr(layer, "variance_epsilon"):
            layer.variance_epsilon = layer.eps
        wrong = other(layer, x, g)["weight"]
        assert not torch.allclose(wrong, truth, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# whole models


def _common(**kw: Any) -> dict[str, Any]:
    return dict(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        attn_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=None, **kw,
    )  # fmt: skip


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
HEAD = dict(head_dim=8)
GEMMA2 = dict(**HEAD, query_pre_attn_scalar=8, sliding_window=4)
# model: (config class, model class, config kwargs) in transformers.models.<model>
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(**MOE, shared_expert_intermediate_size=8),
    ),  # fmt: skip
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", HEAD),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(**MOE, **HEAD)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", HEAD),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GEMMA2),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA2),
}


def build(model: str, unscaled: bool = True) -> nn.Module:
    """The model; Gemma's embedding scale set to 1 where ``unscaled`` (see
    :func:`test_gemma_scaled_embedding_is_measured_exactly`)."""
    cfg_cls, model_cls, kw = MODELS[model]
    mod = importlib.import_module(f"transformers.models.{model}")
    built = getattr(mod, model_cls)(getattr(mod, cfg_cls)(**_common(**kw)))
    scale = getattr(built.model.embed_tokens, "embed_scale", None)
    if unscaled and isinstance(scale, Tensor):
        scale.fill_(1.0)
    return built


def inputs(model: str, x: Tensor) -> dict[str, Tensor]:
    return {"input_ids": x, "decoder_input_ids": x} if model == "t5" else {"input_ids": x}


def example_losses(model: nn.Module, kw: dict[str, Tensor], y: Tensor) -> Tensor:
    """Each example's mean token loss (B,)."""
    logits = model(**kw).logits
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return per_token.view(y.shape[0], -1).mean(1)


def hooked(
    model: nn.Module, name: str, x: Tensor, y: Tensor
) -> tuple[PerExampleNorms, Tensor, dict[str, Tensor]]:
    """The hooks after the structural check (first micro-batch) and one measured one: the
    whole model's per-example squared norms and each layer's."""
    norms = PerExampleNorms(model, per_layer=True)
    norms.attach()
    acc, layers = torch.zeros(0), {}
    for check in (True, False):
        norms.start_micro_batch(x.shape[0])
        if check:
            norms.start_check((x, y))
        example_losses(model, inputs(name, x), y).sum().backward()
        got, layers, bad = norms.close_micro_batch()
        assert bad is None and got is not None, bad
        acc = got
        model.zero_grad()
    norms.detach()
    return norms, acc, layers


def exact_sq_norms(model: nn.Module, name: str, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """|∂ℓ_j/∂θ|² (B,) per trainable parameter: torch.func per-example gradients (dense), one
    backward per example (MoE: routing is data-dependent control flow, which vmap refuses)."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        live = dict(model.named_parameters())
        rows = []
        for j in range(len(x)):
            loss = example_losses(model, inputs(name, x[j : j + 1]), y[j : j + 1]).sum()
            rows.append(torch.autograd.grad(loss, [live[k] for k in params]))
        return {k: torch.stack([r[i].double().square().sum() for r in rows])
                for i, k in enumerate(params)}  # fmt: skip
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xj: Tensor, yj: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (), inputs(name, xj[None]))
        return F.cross_entropy(out.logits.flatten(0, 1), yj)

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {k: g.double().flatten(1).square().sum(1) for k, g in grads.items()}


MAKERS: dict[str, Callable[[], nn.Module]] = {
    **{m: (lambda m=m: build(m)) for m in MODELS},  # type: ignore[misc]
    "t5": functools.partial(t5, num_layers=1),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_whole_model_exact_and_no_rmsnorm_on_the_fallback(name: str) -> None:
    torch.manual_seed(0)
    model = MAKERS[name]()
    x, y = torch.randint(2, V, (B, T)), torch.randint(2, V, (B, T))
    norms, got, layers = hooked(model, name, x, y)
    assert norms.coverage() == 1.0, norms.left_out
    registered = {norm_class(n) for n in NAMES}
    rms = [s for s in norms.sites.values() if type(s.module) in registered]
    assert len(rms) >= 3 and all(not s.generic for s in rms)
    assert not [s.label for s in norms.sites.values() if s.generic and s.label.endswith("Norm)")]
    truth = exact_sq_norms(model, name, x, y)
    for site in rms:  # each RMSNorm alone
        want = sum(truth[f"{site.name}.{attr}"] for attr in site.params)
        torch.testing.assert_close(layers[site.name].double(), want, rtol=1e-5, atol=0)
    whole = sum(truth.values())
    torch.testing.assert_close(got.double(), whole, rtol=1e-5, atol=0)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_compiled_llama_gives_the_eager_estimate_in_one_graph(tmp_path) -> None:
    """Compiled, the RMSNorms' rules run in the compiled backward (the tap): no graph break
    (the fallback hooks broke it at each RMSNorm), the eager |G|² and tr(Σ); and with
    accumulation ``source="auto"`` takes per-example norms (dedicated rules cover every
    parameter)."""
    import lightning.pytorch as pl
    from helpers import trainer_kwargs
    from torch._dynamo.utils import counters
    from zoo import ZOO, ZooModule

    from lightning_gns import GradientNoiseScale

    found = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model, data, loss = ZOO["llama"]()
        module = ZooModule(model, data, loss, 8)
        if compiled:
            module.model = torch.compile(model)  # type: ignore[assignment]
        gns = GradientNoiseScale(log_every_n_steps=4)
        kw = trainer_kwargs(tmp_path, max_steps=8, accumulate_grad_batches=2)
        pl.Trainer(**kw, callbacks=[gns]).fit(module)
        assert gns.chosen_source == "per_example"
        assert gns.coverage == 1.0 and gns.left_out == {} and gns.values.skipped == 0
        assert gns.values.steps == 7  # the first step is the check's
        breaks = sum(counters["graph_break"].values())
        found[compiled] = (gns.values.grad_norm_sq, gns.values.grad_variance, breaks)
    assert found[True][2] == 0, dict(counters["graph_break"])
    assert found[True][:2] == pytest.approx(found[False][:2], rel=1e-4)


def test_gemma_scaled_embedding_is_measured_exactly() -> None:
    """Gemma's embedding (``GemmaTextScaledWordEmbedding``, an ``nn.Embedding`` whose forward
    multiplies by sqrt(d)) has its own rule (``rules.scaled_embedding``, read from the forward's
    source): the whole model is exact. It inherited the plain Embedding rule before, which
    missed the factor (0.45–0.60 of exact)."""
    torch.manual_seed(0)
    model = build("gemma", unscaled=False)
    x, y = torch.randint(2, V, (B, T)), torch.randint(2, V, (B, T))
    _, got, _ = hooked(model, "gemma", x, y)
    whole = sum(exact_sq_norms(model, "gemma", x, y).values())
    torch.testing.assert_close(got.double(), whole, rtol=1e-5, atol=0)  # type: ignore[arg-type]
