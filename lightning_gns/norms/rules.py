"""Per-layer rules for per-example gradient norms and per-example gradients.

Every rule has the signature ``rule(module, a, g)`` where ``a`` is the module's input activation
(saved in forward) and ``g`` is the gradient of the loss w.r.t. the module's output (seen in
backward). Dim 0 is always the batch dimension. Rules compute in float32 regardless of the input
dtype and return a dict keyed by the module's own parameter attribute names ("weight", "bias"),
containing only parameters that exist and require grad.

* Norm rules return per-example squared Frobenius norms of shape ``(B,)``.
* Grad-sample rules return per-example gradients of shape ``(B, *param.shape)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns._compat import RMS_NORM, conv_padding

# rule(module, a, g): the module is typed Any here so each rule can name its own layer class
NormRule = Callable[[Any, Tensor, Tensor], dict[str, Tensor]]
GradSampleRule = Callable[[Any, Tensor, Tensor], dict[str, Tensor]]

NORM_RULES: dict[type[nn.Module], NormRule] = {}
GRAD_SAMPLE_RULES: dict[type[nn.Module], GradSampleRule] = {}


def register_norm(*module_types: type[nn.Module]) -> Callable[[NormRule], NormRule]:
    """Decorator registering a norm rule for these module types (and their subclasses)."""

    def deco(rule: NormRule) -> NormRule:
        for t in module_types:
            NORM_RULES[t] = rule
        return rule

    return deco


def register_grad_sample(
    *module_types: type[nn.Module],
) -> Callable[[GradSampleRule], GradSampleRule]:
    """Decorator registering a per-example-gradient rule for these types (and subclasses)."""

    def deco(rule: GradSampleRule) -> GradSampleRule:
        for t in module_types:
            GRAD_SAMPLE_RULES[t] = rule
        return rule

    return deco


def _unsupported(module: nn.Module) -> bool:
    """True for module configurations whose gradients the rules do not model."""
    if isinstance(module, nn.Embedding):
        return bool(module.scale_grad_by_freq or module.sparse)
    return False


def _lookup(
    table: dict[type[nn.Module], NormRule], by_name: dict[str, NormRule], module: nn.Module
) -> NormRule | None:
    """The rule of the nearest registered class in the module's MRO, if the module computes
    what that class does: a subclass that keeps its forward inherits the rule; one that
    overrides it (Gemma's embedding scaled by √d, a quantized Linear) has no rule and goes
    through the torch.func fallback, which is exact for any forward. Third-party classes are
    registered by qualified name."""
    forward = type(module).forward
    for cls in type(module).__mro__:
        rule = table.get(cls) or by_name.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            if forward is not getattr(cls, "forward", None) or _unsupported(module):
                return None
            return rule
    return None


def norm_rule_for(module: nn.Module) -> NormRule | None:
    """Norm rule for the module: its class's, or its nearest registered ancestor's."""
    if scaled_embedding(type(module)):
        return None if _unsupported(module) else scaled_embedding_norm
    return _lookup(NORM_RULES, NORM_RULES_BY_NAME, module)


def grad_sample_rule_for(module: nn.Module) -> GradSampleRule | None:
    """Grad-sample rule for the module: its class's, or its nearest registered ancestor's."""
    if scaled_embedding(type(module)):
        return None if _unsupported(module) else scaled_embedding_grad_sample
    return _lookup(GRAD_SAMPLE_RULES, GRAD_SAMPLE_RULES_BY_NAME, module)


SCALED_FORWARDS = (  # the whole body of transformers' ``...ScaledWordEmbedding.forward``
    "return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)",
    "return super().forward(input_ids) * self.embed_scale",
)


def scaled_embedding(cls: type) -> bool:
    """An ``nn.Embedding`` of transformers (Gemma, BART, M2M100, … 24 classes in 5.24) whose
    forward is exactly the embedding times ``embed_scale``, read from its source once."""
    if not (issubclass(cls, nn.Embedding) and cls.__module__.startswith("transformers.")):
        return False
    return _scaled_forward(cls.forward)


@functools.cache
def _scaled_forward(forward: Callable) -> bool:
    try:
        lines = inspect.getsource(forward).splitlines()
    except (OSError, TypeError):
        return False
    body = [line.strip() for line in lines[1:] if line.strip()]
    return len(body) == 1 and body[0] in SCALED_FORWARDS


def _embed_scale(module: Any, g: Tensor) -> Tensor | float:
    """The module's scale as its forward applies it (a buffer cast to the weight's dtype, or
    a number), without reading a device value back."""
    scale = module.embed_scale
    if isinstance(scale, Tensor):
        return scale.to(module.weight.dtype).to(g.device, torch.float32)
    return float(scale)


def scaled_embedding_norm(module: Any, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: the embedding rule on the scaled output gradient, s·g (out = s·E[x])."""
    return embedding_norm(module, a, g.float() * _embed_scale(module, g))


def scaled_embedding_grad_sample(module: Any, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: the embedding's per-example gradient of s·g."""
    return embedding_grad_sample(module, a, g.float() * _embed_scale(module, g))


def apply_rules(
    rule: NormRule,
    grad_sample_rule: GradSampleRule | None,
    module: nn.Module,
    tied: frozenset[str],
    a: Tensor,
    g: Tensor,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """A module's per-example squared norms over its own parameters by its (resolved) ``rule``
    (None: it has none but ``tied`` ones), and the per-example gradients of its ``tied``
    parameters (weights shared with other modules, whose per-example gradients are summed over
    those before squaring) by its ``grad_sample_rule``."""
    total: Tensor | None = None
    for attr, n in rule(module, a, g).items():
        if attr not in tied:
            total = n if total is None else total + n
    samples: dict[str, Tensor] = {}
    if tied:
        assert grad_sample_rule is not None
        every = grad_sample_rule(module, a, g)
        samples = {attr: every[attr] for attr in tied if attr in every}
    return total, samples


# --------------------------------------------------------------------------------------------
# helpers


def _wants(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)  # (the usual case, without nn.Module.__getattr__)
    if p is None:
        p = getattr(module, name, None)
    return isinstance(p, Tensor) and p.requires_grad


def _use_gram(t: int, d_in: int, d_out: int) -> bool:
    """Gram form costs ~T^2 (d_in + d_out) per example, materializing costs ~T d_in d_out."""
    return t * (d_in + d_out) < d_in * d_out


def _seq_weight_sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """|sum_t g_t a_t^T|_F^2 for a (N, T, d_in), g (N, T, d_out) -> (N,), cheaper form chosen."""
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    if _use_gram(t, d_in, d_out):
        return _gram_sq_norm(a, g)
    return _materialized_sq_norm(a, g)


def _gram_sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """sum_{t,t'} (a_t . a_t') (g_t . g_t')."""
    return (torch.bmm(a, a.mT) * torch.bmm(g, g.mT)).sum((1, 2))


def _materialized_sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """|G_n|_F^2 with G_n = g_n^T a_n materialized, shape (d_out, d_in)."""
    return torch.linalg.vector_norm(torch.bmm(g.mT, a), dim=(1, 2)).square()


def _as_seq(x: Tensor) -> Tensor:
    """(B, ..., d) -> (B, T, d) float32."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).float()


def _unfold_nd(x: Tensor, conv: Any) -> Tensor:
    """im2col for padded x (B, C, *S) -> (B, C, *L, *K) using the conv's kernel/stride/dilation."""
    nd = x.dim() - 2
    for i in range(nd):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        # the new window dim is appended last, so spatial dim i stays at position 2 + i
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    return x


# --------------------------------------------------------------------------------------------
# norm rules


@register_norm(nn.Linear)
def linear_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: |sum_t g_t a_t^T|_F^2 (Gram or materialized, cheaper); bias: |sum_t g_t|^2."""
    out: dict[str, Tensor] = {}
    if a.dim() == 2:  # one position per example: |g|²|a|² and |g|²
        g_sq = g.float().pow(2).sum(1)
        if _wants(module, "weight"):
            out["weight"] = a.float().pow(2).sum(1) * g_sq
        if _wants(module, "bias"):
            out["bias"] = g_sq
        return out
    a, g = _as_seq(a), _as_seq(g)
    if _wants(module, "weight"):
        out["weight"] = _seq_weight_sq_norm(a, g)
    if _wants(module, "bias"):
        out["bias"] = g.sum(1).pow(2).sum(1)
    return out


def linear_wants(module: nn.Module) -> tuple[bool, bool]:
    """Whether a Linear's (weight, bias) are trainable."""
    return _wants(module, "weight"), _wants(module, "bias")


def linear_flat_total(module: nn.Module, a: Tensor, g: Tensor) -> Tensor | None:
    """The sum of :func:`linear_norm`'s values for a 2-D input, in the fewest ops:
    |g|²(|a|² + 1) (weight and bias), |g|²|a|² or |g|²; None: no trainable parameter."""
    w, b = linear_wants(module)
    if not (w or b):
        return None
    g_sq = _row_sq(g)
    if not w:
        return g_sq
    a_sq = _row_sq(a)
    return torch.addcmul(g_sq, a_sq, g_sq) if b else a_sq.mul_(g_sq)


def _row_sq(x: Tensor) -> Tensor:
    """Squared norm of each row of a 2-D tensor, in float32 (one op for float32 rows)."""
    if x.dtype == torch.float32:
        return torch.linalg.vecdot(x, x)
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).square_()


@register_norm(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_norm(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: per group, Linear rule on im2col patches (B, L, C_in/G*K); bias: |sum_l g_l|^2."""
    g = g.float()
    b, c_out = g.shape[0], g.shape[1]
    out: dict[str, Tensor] = {}
    if _wants(module, "weight"):
        # explicit pre-padding covers int/tuple/'same'/'valid' padding and every padding_mode
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(a.float(), conv_padding(module), mode=mode)
        x = _unfold_nd(x, module)  # (B, C_in, *L, *K)
        nd, grp = g.dim() - 2, module.groups
        x = x.reshape(b, grp, -1, *x.shape[2:])  # (B, G, Cg, *L, *K)
        perm = (0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
        x = x.permute(perm).reshape(b * grp, g[0, 0].numel(), -1)  # (B*G, L, Cg*K)
        gg = g.reshape(b * grp, c_out // grp, -1).mT  # (B*G, L, C_out/G)
        out["weight"] = _seq_weight_sq_norm(x, gg).view(b, grp).sum(1)
    if _wants(module, "bias"):
        out["bias"] = g.reshape(b, c_out, -1).sum(2).pow(2).sum(1)
    return out


@register_norm(nn.Embedding)
def embedding_norm(module: nn.Embedding, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: sum_{t,t'} [x_t == x_t' != padding_idx] (g_t . g_t'), via per-row segment sums.

    Rows are grouped by sorting (example, token id) keys and summing each run into a buffer of
    fixed size B·T: no data-dependent shape, so no host sync (``torch.unique`` would need one).
    """
    if not _wants(module, "weight"):
        return {}
    keys, gs = _embedding_keys(module, a, g)
    n, d = gs.shape
    sorted_keys, order = torch.sort(keys)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    segment = torch.cumsum(starts, 0) - 1  # the run of equal keys each sorted row belongs to
    sums = gs.new_zeros(n, d).index_add_(0, segment, gs[order])
    example = torch.div(sorted_keys, module.num_embeddings, rounding_mode="floor")
    seg_example = torch.zeros_like(segment).scatter_(0, segment, example)  # unused runs: 0, sum 0
    sq = torch.zeros(a.shape[0], dtype=torch.float32, device=g.device)
    return {"weight": sq.index_add_(0, seg_example, sums.pow(2).sum(1))}


def _embedding_keys(module: nn.Embedding, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Flat keys b·V + id (B·T,) and output grads (B·T, d), padding rows zeroed."""
    b, v = a.shape[0], module.num_embeddings
    x = a.long().reshape(b, -1)
    gs = g.float().reshape(b, x.shape[1], -1)
    if module.padding_idx is not None:
        gs = gs * (x != module.padding_idx).unsqueeze(-1)
    keys = x + v * torch.arange(b, device=x.device).unsqueeze(1)
    return keys.reshape(-1), gs.reshape(-1, gs.shape[-1])


def _affine_norm(
    module: nn.Module, xhat: Tensor, g: Tensor, n_param_dims: int
) -> dict[str, Tensor]:
    """Shared tail of the normalization rules; param dims are the last ``n_param_dims`` of g."""
    b, p = g.shape[0], g.shape[g.dim() - n_param_dims :].numel()
    out: dict[str, Tensor] = {}
    for name, src in (("weight", g * xhat), ("bias", g)):
        if _wants(module, name):
            # (B, *other, *param): sum over 'other', then square-sum over 'param'
            out[name] = src.reshape(b, -1, p).sum(1).pow(2).sum(1)
    return out


@register_norm(nn.LayerNorm)
def layer_norm_norm(module: nn.LayerNorm, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: |sum_t g_t * xhat_t|^2 with xhat = LN(a) un-affine; bias: |sum_t g_t|^2."""
    a, g = a.float(), g.float()
    xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
    return _affine_norm(module, xhat, g, len(module.normalized_shape))


@register_norm(nn.GroupNorm)
def group_norm_norm(module: nn.GroupNorm, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: sum_c (sum_s g_cs xhat_cs)^2, xhat = GN(a) un-affine; bias: sum_c (sum_s g_cs)^2."""
    a, g = a.float(), g.float()
    xhat = F.group_norm(a, module.num_groups, eps=module.eps)
    b, c = g.shape[0], g.shape[1]
    # channels are dim 1: put them last so the shared reduction applies
    return _affine_norm(module, xhat.reshape(b, c, -1).mT, g.reshape(b, c, -1).mT, 1)


@register_norm(*RMS_NORM)
def rms_norm_norm(module: Any, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: |sum_t g_t * a_t / sqrt(mean(a_t^2) + eps)|^2 (eps None -> float32 eps)."""
    a, g = a.float(), g.float()
    eps = torch.finfo(torch.float32).eps if module.eps is None else module.eps
    dims = tuple(range(-len(module.normalized_shape), 0))
    xhat = a * torch.rsqrt(a.pow(2).mean(dims, keepdim=True) + eps)
    return _affine_norm(module, xhat, g, len(dims))


# --------------------------------------------------------------------------------------------
# grad-sample rules


@register_grad_sample(nn.Linear)
def linear_grad_sample(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: G_b = sum_t g_t a_t^T, shape (B, d_out, d_in); bias: sum_t g_t."""
    a, g = _as_seq(a), _as_seq(g)
    out: dict[str, Tensor] = {}
    if _wants(module, "weight"):
        out["weight"] = torch.bmm(g.mT, a)
    if _wants(module, "bias"):
        out["bias"] = g.sum(1)
    return out


@register_grad_sample(nn.Embedding)
def embedding_grad_sample(module: nn.Embedding, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """weight: G_b[v] = sum_t [x_t == v != padding_idx] g_t, shape (B, V, d)."""
    if not _wants(module, "weight"):
        return {}
    keys, gs = _embedding_keys(module, a, g)
    b, (v, d) = a.shape[0], module.weight.shape
    return {"weight": gs.new_zeros(b * v, d).index_add_(0, keys, gs).view(b, v, d)}


# --------------------------------------------------------------------------------------------
# third-party layers, matched by qualified class name (their libraries are never imported here)

NORM_RULES_BY_NAME: dict[str, NormRule] = {}
GRAD_SAMPLE_RULES_BY_NAME: dict[str, GradSampleRule] = {}


def _transposed(rule: GradSampleRule) -> GradSampleRule:
    """A Linear grad-sample rule for a layer storing its weight as (d_in, d_out)."""

    def wrapped(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        out = rule(module, a, g)
        if "weight" in out:
            out["weight"] = out["weight"].transpose(1, 2)
        return out

    return wrapped


# Hugging Face's GPT-2 Conv1D is a Linear with a transposed weight: y = x W + b, W (d_in, d_out).
# The Frobenius norm of the per-example weight gradient is the Linear one's.
NORM_RULES_BY_NAME["transformers.pytorch_utils.Conv1D"] = linear_norm
GRAD_SAMPLE_RULES_BY_NAME["transformers.pytorch_utils.Conv1D"] = _transposed(linear_grad_sample)


# Hugging Face's RMSNorm classes: y = w ∘ x̂ (Gemma: (1 + w) ∘ x̂, the same gradient w.r.t. w),
# x̂ = x / sqrt(mean(x², -1) + eps) over the last dim; weight: |Σ_t g_t ∘ x̂_t|², with x̂ rounded
# as each forward rounds it (the rule is registered only for classes whose forward was read).


def _hf_rms(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x², -1) + eps), the mean square in float32 (x's dtype promoted)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def hf_rms_norm_cast_first(module: Any, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Llama's form, w ∘ x̂.to(input dtype): x̂ in float32, rounded to the input's dtype."""
    xhat = _hf_rms(a.float(), module.variance_epsilon).to(a.dtype)
    return _affine_norm(module, xhat.float(), g.float(), 1)


def hf_rms_norm_float32(module: Any, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Gemma's (x̂ ∘ (1 + w)).type_as(x) and OLMo 2's (w ∘ x̂).to(input dtype): x̂ in float32,
    the product rounded after the weight (eps: ``eps``, else ``variance_epsilon``)."""
    eps = module.eps if hasattr(module, "eps") else module.variance_epsilon
    return _affine_norm(module, _hf_rms(a.float(), eps), g.float(), 1)


def t5_layer_norm(module: Any, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """T5's w ∘ x̂: x̂ = x · rsqrt(float32 mean square), in x's dtype promoted to float32, rounded
    to the weight's dtype where that is float16 or bfloat16."""
    xhat = _hf_rms(a, module.variance_epsilon)
    if module.weight.dtype in (torch.float16, torch.bfloat16):
        xhat = xhat.to(module.weight.dtype)
    return _affine_norm(module, xhat.float(), g.float(), 1)


_HF_RMS_NORMS: dict[NormRule, tuple[str, ...]] = {
    hf_rms_norm_cast_first: (
        "llama.modeling_llama.LlamaRMSNorm",
        "mistral.modeling_mistral.MistralRMSNorm",
        "mixtral.modeling_mixtral.MixtralRMSNorm",
        "qwen2.modeling_qwen2.Qwen2RMSNorm",
        "qwen2_moe.modeling_qwen2_moe.Qwen2MoeRMSNorm",
        "qwen3.modeling_qwen3.Qwen3RMSNorm",
        "qwen3_moe.modeling_qwen3_moe.Qwen3MoeRMSNorm",
        "olmoe.modeling_olmoe.OlmoeRMSNorm",
        "phi3.modeling_phi3.Phi3RMSNorm",
        "granite.modeling_granite.GraniteRMSNorm",
        "smollm3.modeling_smollm3.SmolLM3RMSNorm",
    ),
    hf_rms_norm_float32: (
        "gemma.modeling_gemma.GemmaRMSNorm",
        "gemma2.modeling_gemma2.Gemma2RMSNorm",
        "gemma3.modeling_gemma3.Gemma3RMSNorm",
        "olmo2.modeling_olmo2.Olmo2RMSNorm",
    ),
    t5_layer_norm: ("t5.modeling_t5.T5LayerNorm",),
}
for _rule, _names in _HF_RMS_NORMS.items():
    for _name in _names:
        NORM_RULES_BY_NAME[f"transformers.models.{_name}"] = _rule
