"""T5-style relative position bias: an embedding looked up on a bucket matrix shared by the batch.

T5 (and the models copied from it: mT5, LongT5, UMT5) computes ``relative_attention_bias`` on a
(q, k) matrix of position buckets in ``compute_bias``, which returns the values as a
(1, H, q, k) tensor that every layer's attention scores (B, H, q, k) add by broadcasting.
Per example, the bias's gradient is that example's slice of the broadcast: while the hooks are
attached, the owner's ``compute_bias`` returns its values expanded to (B, H, q, k) (a view, the
model computes the same), so autograd keeps each example's share, summed over every layer that
uses it. A hook on the expanded tensor gives the embedding's rule that gradient as
(B, q, k, H) with the bucket ids expanded to (B, q, k): the exact per-example gradient.
Eager only: a compiled model leaves it out (as before), and under activation checkpointing it
is left out; a step where it cannot be measured is dropped, never guessed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_gns._compat import in_backward_pass, saving_through_hooks
from lightning_gns.host_sync import on_step_path
from lightning_gns.norms.site_hooks import Norms, on_output_grad
from lightning_gns.norms.sites import Site

NAME = "relative_attention_bias"


def bias_owner(model: nn.Module, name: str, module: nn.Module) -> nn.Module | None:
    """The module whose ``compute_bias`` looks up the embedding ``name`` (None: no such, or the
    model holds a ``torch.compile``d module, whose graphs these Python hooks would break)."""
    parent_name, _, attr = name.rpartition(".")
    if attr != NAME or not isinstance(module, nn.Embedding) or compiled(model):
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    own = parent.__dict__.get("compute_bias")
    if own is not None and not isinstance(own, BiasCall):
        return None  # someone else replaced it
    return parent if callable(getattr(type(parent), "compute_bias", None)) else None


def compiled(model: nn.Module) -> bool:
    """The model is or holds a ``torch.compile``d module."""
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())


class BiasCall:
    """The owner's ``compute_bias`` while attached. A copy (``copy.deepcopy``, pickle) has no
    site and computes the plain values."""

    def __init__(
        self, owner: nn.Module, norms: Norms | None = None, site: Site | None = None
    ) -> None:
        self.owner, self.norms, self.site = owner, norms, site

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = getattr(type(self.owner), "compute_bias")(self.owner, *args, **kwargs)  # noqa: B009
        if self.norms is None or self.site is None:
            return values
        return expanded(self.norms, self.site, values)

    def __reduce__(self) -> tuple:
        return (BiasCall, (self.owner,))


def attach(owner: nn.Module, norms: Norms, site: Site) -> None:
    owner.__dict__["compute_bias"] = BiasCall(owner, norms, site)  # an instance attribute


def detach(owner: nn.Module) -> None:
    if isinstance(owner.__dict__.get("compute_bias"), BiasCall):
        del owner.__dict__["compute_bias"]


def expanded(norms: Norms, site: Site, values: object) -> object:
    """(1, H, q, k) ``values`` expanded to the batch, with the hook that measures the
    embedding per example; ``values`` itself where there is nothing to measure."""
    ids, b = site.seen.activation, norms.record.batch_size
    if not isinstance(values, Tensor) or not values.requires_grad or b is None:
        return values
    if torch.compiler.is_compiling() or not site.active or not torch.is_grad_enabled():
        return values
    if in_backward_pass():  # a checkpoint's recomputation: the shapes must stay the model's
        return values
    if saving_through_hooks():
        norms.fail(site, "its relative position bias is not measured under checkpointing")
        return values
    if ids is None or values.dim() != 4 or values.shape[0] != 1 or ids.shape != values.shape[2:]:
        norms.fail(site, "its relative position bias is not laid out as T5's (1, H, q, k)")
        return values
    out = values.expand(b, *values.shape[1:])
    site.seen.activation = ids.expand(b, *ids.shape)  # each example's bucket ids (B, q, k)

    def on_grad(g: Tensor) -> None:
        on_output_grad(norms, site, g.permute(0, 2, 3, 1))  # as the embedding's (B, q, k, H)

    out.register_hook(on_step_path(on_grad))
    return out
