"""The optimizer's preconditioner P = diag(1/(√v̂ + ε)), read from its state (never changed).

For Adam-family optimizers the step is the gradient divided elementwise by √v̂ + ε, so the
noise scale that governs their steps is measured on P·g with P = diag(1/(√v̂ + ε)):
B_precond = tr(P Σ P)/|P G|² (the same two-batch estimator on weighted norms). The weights are
read from the optimizer's state as it is (never changed): whichever second-moment estimate it
keeps, not its class name. The norms of P·g come from
:class:`~lightning_gns.norms.micro_batch.WeightedMicroBatchNorms`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

# State keys of a second-moment estimate: Adam/AdamW/NAdam/RAdam, RMSprop, Adagrad.
SECOND_MOMENTS = ("exp_avg_sq", "square_avg", "sum")


def _denominator(state: dict, group: dict) -> Tensor | None:
    """√v̂ + ε for one parameter, as its optimizer would divide by; None if it keeps no v."""
    eps = float(group.get("eps", 1e-8))
    if "exp_avg_sq" in state:  # Adam family: bias-corrected v̂ = v/(1 − β₂ᵗ)
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state["exp_avg_sq"]
        if v is None:
            return None
        beta2 = float(group["betas"][1]) if "betas" in group else 0.999
        step = state.get("step", 1.0)
        if isinstance(step, Tensor) and step.device.type != "cpu":  # capturable/fused: no sync
            return (v / (1.0 - torch.pow(beta2, step.to(v.dtype)))).sqrt().add_(eps)
        step = float(step)  # a CPU tensor or a number
        return (v / (1.0 - beta2**step)).sqrt().add_(eps) if step > 0 else None
    if "square_avg" in state:  # RMSprop (centered: minus the squared mean)
        v = state["square_avg"]
        if "grad_avg" in state:
            v = v - state["grad_avg"].square()
        return v.clamp(min=0).sqrt().add_(eps)
    if "sum" in state:  # Adagrad
        return state["sum"].sqrt().add_(eps)
    return None


def inverse_preconditioner(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]
) -> list[Tensor] | None:
    """1/(√v̂ + ε) per parameter from ``optimizer``'s state (float32), or None while some
    parameter has no second-moment state (before the first step, or an optimizer without)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        state, group = optimizer.state.get(p), group_of.get(id(p))
        d = _denominator(state, group) if state and group is not None else None
        if d is None:
            return None
        out.append(d.float().reciprocal_())
    return out


# A running scale of the gradient its step divides by: the second moments above, Adamax's
# infinity norm, Adafactor's factored second moment (√ learning-rate scaling applies).
GRADIENT_SCALES = (*SECOND_MOMENTS, "exp_inf", "row_var", "col_var", "variance")


def keeps_second_moment(
    optimizer: torch.optim.Optimizer, keys: tuple[str, ...] = SECOND_MOMENTS
) -> bool | None:
    """True/False once the optimizer has state; None before its first step. ``keys``:
    :data:`GRADIENT_SCALES` for any scale its step divides by."""
    states = [s for s in optimizer.state.values() if s]
    if not states:
        return None
    return any(k in s for s in states for k in keys)
