"""Per-example squared norms of transformers' stacked experts (``@use_experts_implementation``:
Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS, … 67 classes in transformers 5.24).

One module holds every expert as 3-D parameters: ``gate_up_proj`` (E, 2f, d) (or ``up_proj``
(E, f, d) without a gate; (E, d, 2f) when stored transposed), ``down_proj`` (E, d, f), optional
biases (E, ·); it is called as ``experts(x (N, d), top_k_index (N, k), top_k_weights (N, k))``
on the N = B·T flattened tokens, and out_t = Σ_k w_tk · down[e_tk](gate(up[e_tk] x_t)): the
routing weight multiplies each expert's output. :class:`_Pairs` takes every (token, k) pair's
pre-activation z from the forward (:class:`GateTap`, when the forward calls the gate once:
``grouped_mm``, ``batched_mm``) or recomputes it expert by expert (``F.grouped_mm``, as the
experts' own forward, or a loop over the experts with one host read of their token counts),
and back-propagates c = w·g through down and the module's own gate (``_apply_gate`` /
``act_fn``) to h and dz. A parameter's per-example gradient is then a sum over the example's
pairs routed to each expert: |Σ c hᵀ|² for down, |Σ dz xᵀ|² for up, summed over experts (the
cheapest of three exact forms, :mod:`lightning_gns.norms.moe_forms`).
:func:`stacked_experts_grads` gives the whole gradient from the same pairs, for the
structural check: it equals autograd's only if the rule models the module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from functools import cached_property, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns._compat import saving_through_hooks
from lightning_gns.norms import moe_forms as forms
from lightning_gns.norms.generic import is_replaying
from lightning_gns.norms.tokens import acc_dtype, bincount, reading_host_tensor

Experts = Any
"""A stacked-experts module (:func:`is_stacked_experts`): its attributes are read by name."""
Weights = Mapping[str, Tensor]
"""The tensors the forward used, by attribute, where they are not the registered parameters
(FSDP2 unshards them for the forward and reshards after: copies, ``Seen.live``)."""


def _tensor(module: Experts, name: str, weights: Weights | None) -> Any:
    """The module's tensor ``name`` as its forward used it."""
    if weights is not None and name in weights:
        return weights[name]
    return getattr(module, name, None)


def is_stacked_experts(module: nn.Module) -> bool:
    """An experts module of transformers' ``@use_experts_implementation`` layout."""
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
    if not all(isinstance(getattr(module, f, None), bool) for f in flags):
        return False
    up = "gate_up_proj" if module.has_gate else "up_proj"
    ws = [getattr(module, name, None) for name in (up, "down_proj")]
    return all(isinstance(w, Tensor) and w.dim() == 3 for w in ws)


def stacked_experts_problem(module: Experts) -> str | None:
    """Why the stacked-experts rule cannot cover this module, or None."""
    if module.has_post_expert_norm:
        return "has a norm after each expert (has_post_expert_norm), which no rule models"
    known = {"gate_up_proj", "up_proj", "down_proj"}
    known |= {f"{k}_bias" for k in known}
    other = [k for k, p in module.named_parameters() if p.requires_grad and k not in known]
    if other:
        return f"has parameters the experts rule does not model: {other}"
    return None


def _experts_inputs(module: Experts, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden (N, d), expert indices (N, k), routing weights (N, k)): the forward's first three
    parameters, whatever their names (GPT-OSS: ``router_indices``, ``routing_weights``)."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    got = list(bound.arguments.values())
    return got[0], got[1], got[2]


class _Pairs:
    """Every (token, k) pair of one experts call, sorted by expert (in the forward's own order
    when its rows are taken from a ``grouped_mm`` forward, else stably): its input x,
    pre-activation z, gradient dz, activation h and down-output gradient c = w·g, and its
    expert (E for the sentinels of expert parallelism); ``dz``,
    ``h``, ``c``, ``key`` in pair order (token-major) on demand. z, h and dz are the
    forward's and backward's (:class:`GateCall`) or recomputed expert by expert."""

    def __init__(
        self, module: Experts, args: tuple, kwargs: dict, g: Tensor, call: GateCall | None = None,
        weights: Weights | None = None,
    ) -> None:  # fmt: skip
        x, idx, w = _experts_inputs(module, args, kwargs)
        dt = acc_dtype(g)
        self.n, self.k = idx.shape
        self.num = int(module.down_proj.shape[0])
        e = idx.reshape(-1).long()
        self.key = torch.where((e >= 0) & (e < self.num), e, self.num)
        self.x = x.detach().to(dt)
        self.z_ok: Tensor | None = None  # the forward's z matched x·up (a 0-d bool), or None
        taken = call is not None and call.dz is not None and call.h is not None
        # the forward's own order where it sorted the pairs (grouped_mm): its rows need no
        # gather; else (and to recompute) sorted here, stably, the sentinels last
        forward_order = _forward_order(module, idx) if taken else None
        same = forward_order is not None
        self.order = forward_order if forward_order is not None else _stable_order(self.key)
        self.key_s = self.key[self.order]
        valid = self.key_s < self.num
        self.tok = torch.div(self.order, self.k, rounding_mode="floor")  # of each sorted pair
        self.w_s = w.detach().reshape(-1, 1).to(dt)[self.order] * valid.unsqueeze(1)
        self.g = g.detach().to(dt)  # per token
        self.weights = weights
        up, down = _as_right_factors(module, dt, weights)
        expert = self.key_s.clamp(max=self.num - 1)
        bias = _tensor(module, "gate_up_proj_bias" if module.has_gate else "up_proj_bias", weights)
        bias = bias.detach().to(dt) if module.has_bias and isinstance(bias, Tensor) else None
        if taken:  # backward passed the forward's gate call
            assert call is not None and call.h is not None and call.dz is not None
            rows = None if same else _forward_rows(module, idx)
            if (same or rows is not None) and self._check(module, call, rows, bias, dt):
                h, dz = call.h, call.dz
                if rows is not None:
                    rows = rows[self.order]
                    h, dz = h.index_select(0, rows), dz.index_select(0, rows)
                self.h_s, self.dz_s = h.to(dt), dz.to(dt)
                return
        counts = bincount(self.key, self.num + 1)[: self.num]
        z = _grouped(self.x_s, up, counts, valid)
        z = z if bias is None else z + bias[expert]
        dh = _grouped(self.c_s, down, counts, valid)
        gate = _gate(module) if module.has_gate else module.act_fn
        if _autograd_records():
            with torch.enable_grad():
                zl = z.detach().requires_grad_()
                h = gate(zl)
                (dz,) = torch.autograd.grad(h, zl, dh)
        else:  # inside a custom op (the compiled experts' rule, norms/moe_compiled.py) autograd
            # records nothing: torch.func's vjp does (about 1.5 times as long on a CPU)
            h, vjp = torch.func.vjp(gate, z.detach())[:2]
            (dz,) = vjp(dh)
        self.dz_s, self.h_s = dz, h.detach()

    @cached_property
    def x_s(self) -> Tensor:
        """The input of each sorted pair (its token's row)."""
        return self.x[self.tok]

    @cached_property
    def c_s(self) -> Tensor:
        """The down-output gradient of each sorted pair, w·g (0 for the sentinels)."""
        return self.w_s * self.g[self.tok]

    def example_s(self, batch: int) -> Tensor:
        """The example of each sorted pair."""
        return torch.div(self.order, self.n // batch * self.k, rounding_mode="floor")

    def _check(
        self, module: Experts, call: GateCall, rows: Tensor | None, bias: Tensor | None,
        dt: torch.dtype,
    ) -> bool:  # fmt: skip
        """Sets ``z_ok``: the projection of every row of the forward's z (:func:`probe`)
        (``rows``: the forward's row of each pair in pair order; None:
        the forward's rows are the sorted pairs) against x·(up[e]·v) (+ bias), a check of the
        order that costs d per row and reads nothing back. False if the call cannot tell."""
        zv = call.zv
        if zv is None or zv.shape[0] != self.key.shape[0]:
            return False
        got = zv.to(dt) if rows is None else zv.index_select(0, rows[self.order]).to(dt)
        where, v = probe(_up_width(module), zv.dtype, zv.device)
        v = v.to(dt)
        uv = _up_times(module, where, v, dt, self.weights)
        per = self.x @ uv.T  # (N, E): each token's projection under each expert
        if bias is not None:
            per = per + bias[:, where] @ v
        expert = self.key_s.clamp(max=self.num - 1)
        pred = per[self.tok, expert]
        valid = self.key_s < self.num
        sq = torch.where(valid, pred, 0).square()
        scale = sq.sum() / valid.sum().clamp(min=1)  # each row against its own size and the mean
        self.z_ok = (torch.where(valid, got - pred, 0).square() <= 1e-3 * (sq + scale)).all()
        return True

    def unsorted(self, v: Tensor) -> Tensor:
        """Rows of a sorted tensor back in pair order (a row gather)."""
        if not hasattr(self, "_back"):
            self._back = _inverse(self.order)
        return v.index_select(0, self._back)


def _autograd_records() -> bool:
    """False inside a custom op's implementation, where autograd's dispatch keys are excluded
    (``torch.enable_grad`` records nothing there)."""
    with torch.enable_grad():
        return (torch.ones((), requires_grad=True) * 1).requires_grad


PROBED = 16  # coordinates of z in the order check


def probe(width: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(coordinates, weights): the fixed projection of each row of z, z[coordinates]·weights,
    that checks the rows' order (at most :data:`PROBED` coordinates spread over the width,
    weighted by cosines; each row's projection depends on its token and expert)."""
    m = min(PROBED, width)
    where = torch.div(torch.arange(m, device=device) * width, m, rounding_mode="floor")
    weights = torch.cos(torch.arange(m, device=device, dtype=torch.float32) * 2.39996 + 0.5)
    return where, weights.to(dtype)


class GateCall:
    """One forward's call of the experts' gate, one row per (token, k) pair in the forward's
    order: z (its input, the up projection) projected (:func:`probe`), its output h,
    and z's gradient dz once backward has passed it (None before, or if z needs no gradient);
    ``then(call)`` runs at that moment, once. :meth:`drop` lets go of every tensor."""

    def __init__(self, zv: Tensor | None, h: Tensor | None) -> None:
        self.zv: Tensor | None = zv
        self.h: Tensor | None = h
        self.dz: Tensor | None = None
        self.then: Callable[[GateCall], None] | None = None
        self.dropped = False

    def keep_dz(self, dz: Tensor) -> None:
        if self.dropped:
            return
        self.dz = dz.detach()
        then, self.then = self.then, None
        if then is not None:
            then(self)

    def drop(self) -> None:
        self.zv = self.h = self.dz = self.then = None
        self.dropped = True


class GateTap:
    """A hooked stacked-experts module's ``_apply_gate``: the class's own gate, keeping its
    :class:`GateCall` so that the rule need not recompute the experts' projections. Used when
    the forward calls it once (``grouped_mm``, transformers' default, and ``batched_mm``);
    the eager loop calls it per expert, and the rule recomputes them. Nothing is kept where
    it would outlive the layer's backward (activation checkpointing, offloading), once the
    rule found the forward's rows out of place (``usable``), or in a copy of the model."""

    def __init__(self, module: Experts) -> None:
        self.module: Experts = module
        self.kept: list[GateCall] = []  # this forward's calls
        self.usable = True  # the forward's rows are where the rule expects them
        self.verified = False  # ... which a read has confirmed (the check, or the first step)
        self.active = True  # False in a copy of the model: the class's gate, nothing kept
        self._probe: tuple[Tensor, Tensor] | None = None
        self._width = 0
        # under torch.compile (norms/moe_compiled.py): z through a tap, given this forward's
        # (x, top_k_index, top_k_weights) that the pre-hook keeps; the tap's carrier
        self.compiled: Callable[[Tensor, tuple], tuple[Tensor, Tensor | None]] | None = None
        self.inputs: tuple | None = None
        self.carrier: Tensor | None = None
        self.handle: Any = None

    def before(self, module: nn.Module, args: tuple) -> None:
        """The experts' forward pre-hook: under torch.compile, keep the inputs for the tap."""
        if self.compiled is not None and self.active and torch.compiler.is_compiling():
            self.inputs = args

    def __call__(self, z: Tensor) -> Tensor:
        if self.inputs is not None and torch.compiler.is_compiling():
            inputs, self.inputs = self.inputs, None
            if self.compiled is not None:
                z, self.carrier = self.compiled(z, inputs)
        h = type(self.module)._apply_gate(self.module, z)
        if self.active and self.usable and self._recording(z):
            try:
                where, v = self._probe_for(z)
                call = GateCall(z.detach()[:, where] @ v, h.detach())
            except Exception:  # noqa: BLE001 - never break the user's forward (a DTensor, …)
                call = GateCall(None, None)
                call.drop()
            self.kept.append(call)
            if z.requires_grad and not call.dropped:
                z.register_hook(call.keep_dz)
        return h

    @staticmethod
    def _recording(z: Tensor) -> bool:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or z.dim() != 2:
            return False
        if is_replaying():  # a check's or torch.func's re-run of the forward
            return False
        return not saving_through_hooks()

    def _probe_for(self, z: Tensor) -> tuple[Tensor, Tensor]:
        p, width = self._probe, z.shape[1]
        if p is None or p[1].dtype != z.dtype or p[1].device != z.device or self._width != width:
            p = self._probe = probe(width, z.dtype, z.device)
            self._width = width
        return p

    def take(self) -> GateCall | None:
        """The forward's call since the last take, if it called the gate once; any other is
        dropped."""
        kept, self.kept = self.kept, []
        if len(kept) == 1 and self.usable and not kept[0].dropped:
            return kept[0]
        for call in kept:
            call.drop()
        return None

    def __getstate__(self) -> dict:  # a copy of the model keeps nothing and records nothing
        gone = {"inputs": None, "carrier": None, "compiled": None, "handle": None}
        return {**self.__dict__, "kept": [], "active": False, "_probe": None, **gone}


def tap_gate(module: nn.Module) -> None:
    """Give a gated stacked-experts module a :class:`GateTap` (not if its gate is replaced)."""
    if getattr(module, "has_gate", False) and "_apply_gate" not in module.__dict__:
        tap = module.__dict__["_apply_gate"] = GateTap(module)
        tap.handle = module.register_forward_pre_hook(tap.before)


def untap_gate(module: nn.Module) -> None:
    tap = module.__dict__.get("_apply_gate")
    if isinstance(tap, GateTap):
        if tap.handle is not None:
            tap.handle.remove()
        del module.__dict__["_apply_gate"]


def _gate(module: Experts) -> Callable[[Tensor], Tensor]:
    """The module's gate, not through its :class:`GateTap` (the rule's own calls keep nothing)."""
    gate = module._apply_gate
    return partial(type(module)._apply_gate, module) if isinstance(gate, GateTap) else gate


def gate_call(module: nn.Module) -> GateCall | None:
    """The :class:`GateCall` a :class:`GateTap` kept in this forward (and forget it), or None."""
    tap = module.__dict__.get("_apply_gate")
    return tap.take() if isinstance(tap, GateTap) else None


def _implementation(module: Experts) -> str | None:
    return getattr(getattr(module, "config", None), "_experts_implementation", None)


def _forward_order(module: Experts, idx: Tensor) -> Tensor | None:
    """The pair (token-major index) of each row of the forward's z where the forward sorted the
    pairs (``grouped_mm``: ``torch.sort`` of the expert indices, as here): the rule takes that
    order, and the forward's rows as they are. None for other forwards."""
    if _implementation(module) != "grouped_mm":
        return None
    return torch.sort(idx.reshape(-1))[1]


def _forward_rows(module: Experts, idx: Tensor) -> Tensor | None:
    """The row of the forward's z of each (token, k) pair in pair order: ``batched_mm`` keeps
    the pairs in order; None for other forwards (``grouped_mm``: :func:`_forward_order`)."""
    if _implementation(module) == "batched_mm":
        return torch.arange(idx.numel(), device=idx.device)
    return None


def _stable_order(key: Tensor) -> Tensor:
    """The pairs sorted by expert, within an expert by token (the sentinels, key E, last)."""
    return torch.argsort(key, stable=True)


def _up_width(module: Experts) -> int:
    """The width of z (2f with a gate, f without)."""
    up = module.gate_up_proj if module.has_gate else module.up_proj
    return int(up.shape[2] if module.is_transposed else up.shape[1])


def _up_times(
    module: Experts, where: Tensor, v: Tensor, dt: torch.dtype, weights: Weights | None
) -> Tensor:
    """(E, d): Σ_i v_i up[e][where_i], z's projection (:func:`probe`) as a function of x, from
    the probed rows of the weights as stored (the weights are not read whole)."""
    up = _tensor(module, "gate_up_proj" if module.has_gate else "up_proj", weights)
    if module.is_transposed:  # (E, d, 2f)
        return up.detach()[:, :, where].to(dt) @ v
    return torch.einsum("epd,p->ed", up.detach()[:, where, :].to(dt), v)


def _inverse(perm: Tensor) -> Tensor:
    """The inverse of a permutation: where each element went."""
    out = torch.empty_like(perm)
    out[perm] = torch.arange(perm.numel(), device=perm.device)
    return out


def _as_right_factors(
    module: Experts, dt: torch.dtype, weights: Weights | None
) -> tuple[Tensor, Tensor]:
    """(E, d, 2f) with z = x @ up[e], and (E, d, f) with dh = c @ down[e], whichever way the
    module stores its weights ((E, d_out, d_in), or (E, d_in, d_out) when ``is_transposed``)."""
    up = _tensor(module, "gate_up_proj" if module.has_gate else "up_proj", weights)
    up, down = up.detach().to(dt), _tensor(module, "down_proj", weights).detach().to(dt)
    if module.is_transposed:
        return up, down.mT
    return up.mT, down


def _grouped(x: Tensor, w: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
    """Rows of ``x`` sorted by expert (``counts[e]`` rows each, then the sentinels) times their
    expert's ``w[e]``; sentinel rows 0. ``F.grouped_mm`` where it runs (no host read); else on
    a CPU a loop over the experts' rows (one read of the counts, free there), elsewhere every
    expert on every row, masked (E times the work, nothing read back)."""
    if hasattr(F, "grouped_mm") and x.dtype in (torch.float32, torch.bfloat16):
        try:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            out = F.grouped_mm(x, w.to(x.dtype), offs=offs)
            return torch.where(valid.unsqueeze(1), out, 0)  # rows past the last offset: unset
        except RuntimeError:  # unaligned strides, an older GPU: the loops are as exact
            pass
    out = x.new_zeros(x.shape[0], w.shape[2])
    if x.device.type != "cpu":
        ends = torch.cumsum(counts, 0)
        expert = torch.searchsorted(ends, torch.arange(x.shape[0], device=x.device), right=True)
        for e in range(w.shape[0]):
            out = torch.where((expert == e).unsqueeze(1), x @ w[e], out)
        return out
    with reading_host_tensor(counts):
        sizes = counts.tolist()
    start = 0
    for e, n in enumerate(sizes):
        if n:
            out[start : start + n] = x[start : start + n] @ w[e]
        start += n
    return out


def _pairs_of(
    module: Experts, args: tuple, kwargs: dict, g: Tensor, call: GateCall | None,
    weights: Weights | None,
) -> _Pairs:  # fmt: skip
    """:class:`_Pairs` from the forward's call. At its first use (the structural check, or the
    first step after a resume) the order check is read once: rows out of place, the tap keeps
    nothing more and the pairs are recomputed."""
    pairs = _Pairs(module, args, kwargs, g, call, weights)
    tap = module.__dict__.get("_apply_gate")
    if pairs.z_ok is None or not isinstance(tap, GateTap) or tap.verified:
        return pairs
    with reading_host_tensor(pairs.z_ok):  # declared on a CPU; on a device once per fit
        ok = bool(pairs.z_ok)
    tap.verified = True
    if ok:
        return pairs
    tap.usable = False
    return _Pairs(module, args, kwargs, g, weights=weights)


def stacked_experts_norm(
    module: Experts, args: tuple, kwargs: dict, g: Tensor, batch: int,
    call: GateCall | None = None, weights: Weights | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """Per-example squared norms (B,) of a stacked-experts module's parameters, by name, from
    its forward's inputs (hidden (B·T, d), top_k_index, top_k_weights), output gradient and,
    if kept (:class:`GateTap`), its gate's call: NaN (the step is dropped) if the call's rows
    are not where they were found at the first use. ``weights``: the tensors the forward used
    where they are not the registered parameters (FSDP2)."""
    pairs = _pairs_of(module, args, kwargs, g, call, weights)
    n, k, num = pairs.n, pairs.k, pairs.num
    if n % batch:
        raise ValueError(f"{n} tokens do not split into {batch} examples")
    t = n // batch
    key, example = pairs.key.view(batch, t * k), pairs.example_s(batch)
    up = "gate_up_proj" if module.has_gate else "up_proj"

    buckets: list[forms.Buckets] = []  # the bucketed form's layout, shared by the weights

    def routed(up_weight: bool) -> Tensor:
        """The padded forms straight from the sorted pairs (the bucketed one reading the per-token
        sides' Grams, x's and c's, off token Grams); the others in pair order."""
        d_a = (pairs.x if up_weight else pairs.h_s).shape[1]
        d_g = (pairs.dz_s if up_weight else pairs.g).shape[1]
        form, cap, chunk = forms.choose_form(key, num, t, k, d_a, d_g, up_weight)
        if form == "bucketed":
            if not buckets:
                buckets.append(forms.Buckets(example, pairs.key_s, batch, num))
            lay = buckets[0]
            if up_weight:
                return lay.sq_norm(forms.TokenSide(pairs.x, pairs.tok, t), lay.rows(pairs.dz_s))
            c = forms.TokenSide(pairs.g, pairs.tok, t, pairs.w_s)
            return lay.sq_norm(lay.rows(pairs.h_s), c)
        a_s, g_s = (pairs.x_s, pairs.dz_s) if up_weight else (pairs.h_s, pairs.c_s)
        if form == "padded":
            return forms.padded_sq_norm(a_s, g_s, example, pairs.key_s, batch, num, cap, chunk)
        a = (lambda: pairs.x.view(batch, t, -1)) if up_weight else paired(pairs.h_s)
        g = paired(pairs.dz_s if up_weight else pairs.c_s)
        if form == "grouped":
            return forms.routed_grouped(a(), g(), key, num, t, k)
        return forms.routed_masked_gram(a(), g(), key, num, t, k, chunk)

    def paired(v: Tensor) -> Callable[[], Tensor]:
        return lambda: pairs.unsorted(v).view(batch, t * k, -1)

    out: dict[str, Tensor] = {}
    if getattr(module, up).requires_grad:
        out[up] = routed(True)
    if module.down_proj.requires_grad:
        out["down_proj"] = routed(False)
    for name, v in ((f"{up}_bias", pairs.dz_s), ("down_proj_bias", pairs.c_s)):
        p = getattr(module, name, None)
        if isinstance(p, Tensor) and p.requires_grad:
            out[name] = forms.bias_sq_norm(v, example, pairs.key_s, batch, num)
    if pairs.z_ok is not None:
        out = {k: torch.where(pairs.z_ok, v, torch.nan) for k, v in out.items()}
    return out


def stacked_experts_grads(
    module: Experts, args: tuple, kwargs: dict, g: Tensor, weights: Weights | None = None
) -> dict[str, Tensor]:
    """The module's whole gradient from the rule's own recomputation, for the structural check:
    it equals autograd's only if the rule models the module (gate, layout, routing weight).
    (The check's norms, computed before, have used and dropped the forward's gate call.)"""
    pairs = _Pairs(module, args, kwargs, g, weights=weights)
    num, key = pairs.num, pairs.key_s
    up = "gate_up_proj" if module.has_gate else "up_proj"
    out: dict[str, Tensor] = {}
    for name, a, v in ((up, pairs.x_s, pairs.dz_s), ("down_proj", pairs.h_s, pairs.c_s)):
        w = getattr(module, name)
        per = torch.stack([(v * (key == e).unsqueeze(1)).mT @ a for e in range(num)])
        out[name] = per.mT if module.is_transposed else per  # (E, d_out, d_in) before
        bias = getattr(module, f"{name}_bias", None)
        if isinstance(bias, Tensor):
            out[f"{name}_bias"] = v.new_zeros(num + 1, v.shape[1]).index_add_(0, key, v)[:num]
        assert out[name].shape == w.shape
    return out


TokenRule = Callable[..., dict[str, Tensor]]
"""``rule(module, args, kwargs, grad_output, batch, call, weights) -> {parameter name: (B,)}``,
call the forward's :class:`GateCall` or None, weights as :func:`stacked_experts_norm`'s."""


def token_rule_for(module: nn.Module) -> TokenRule | None:
    """The dedicated rule of a module called on flattened tokens (stacked experts), or None
    (then :func:`~lightning_gns.norms.tokens.token_generic_sq_norms`)."""
    if is_stacked_experts(module) and stacked_experts_problem(module) is None:
        return stacked_experts_norm
    return None
