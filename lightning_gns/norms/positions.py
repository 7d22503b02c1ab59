"""Embeddings called on positions shared by the batch, and inputs that are not a batch.

nanoGPT and Hugging Face models look up positional embeddings with a (T,) or (1, T) tensor of
positions that the model broadcasts over the batch. Per example, each example's share of that
embedding's gradient is its own output gradient: the hooks expand the positions (and the
output) to the batch, so the rule sees one row per example; the model computes the same values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gns.norms.sites import Site


def not_a_batch(x: object) -> bool:
    """Inputs whose dim 0 cannot be examples: a parameter, or positions arange(s, s + n) (a
    positional embedding), which would pass the batch-size check when n equals the batch.
    Reads a value back to the host: first step only."""
    if isinstance(x, nn.Parameter):
        return True
    if isinstance(x, Tensor) and x.dim() == 1 and x.numel() > 1 and not x.is_floating_point():
        steps = torch.arange(x.numel(), device=x.device, dtype=x.dtype)
        return bool(torch.equal(x - x[0], steps))
    return False


def expanded_to_batch(x: object, b: int | None) -> bool:
    """``x`` is one row broadcast along dim 0 to the batch (stride 0), as BERT's token-type
    ids (a buffer of zeros expanded to (B, T)): not computed from the batch, yet each example
    gets its own row of the layer's output, so dim 0 does hold examples."""
    if not isinstance(x, Tensor) or b is None or b < 2 or x.dim() == 0:
        return False
    return x.shape[0] == b and x.stride(0) == 0


def expand_positions(site: Site, x: object, output: Tensor, b: int | None) -> tuple | None:
    """An embedding called on positions shared by the batch ((T,) or (1, T)): (positions,
    output) expanded to the batch (None: not such a call), so each example's output gradient
    (before the broadcast sum) reaches the rule. A (T,) input with T = B counts as positions
    only once ``site.positions`` says so (decided on the first such call,
    :func:`broadcast_positions`)."""
    if b is None or b < 2 or not isinstance(site.module, nn.Embedding):
        return None
    if not isinstance(x, Tensor) or x.is_floating_point() or x.dim() not in (1, 2):
        return None
    if x.dim() == 1 and (x.shape[0] != b or site.positions):
        return x.unsqueeze(0).expand(b, -1), output.unsqueeze(0).expand(b, *output.shape)
    if x.dim() == 2 and x.shape[0] == 1:
        return x.expand(b, -1), output.expand(b, *output.shape[1:])
    return None


def undecided_positions(site: Site, x: object, b: int | None) -> bool:
    """A (B,) integer input to an embedding: positions or a batch, not decided yet."""
    return (
        isinstance(site.module, nn.Embedding)
        and isinstance(x, Tensor)
        and x.dim() == 1
        and x.shape[0] == b
        and site.positions is None
    )


def broadcast_positions(
    site: Site, x: object, output: Tensor, b: int | None, from_batch: bool | None = None
) -> Tensor | None:
    """:func:`expand_positions` in eager mode: decides ``site.positions`` once (from the
    structural check's provenance, else from the values: a host read) and makes the expanded
    positions the site's activation; the expanded output, or None."""
    if undecided_positions(site, x, b):
        site.positions = not from_batch if from_batch is not None else not_a_batch(x)
    expanded = expand_positions(site, x, output, b)
    if expanded is None:
        return None
    site.seen.activation = expanded[0]
    return expanded[1]


def positions_problem(site: Site, x: object, b: int | None, token_batch: int | None) -> str | None:
    """Positions are expanded to the batch size announced, which the model then adds to its
    token embeddings; if an earlier embedding saw token ids (B', T) with another B', the
    expansion would break the user's forward: the reason to leave the site out (shapes only)."""
    if not isinstance(site.module, nn.Embedding) or not isinstance(x, Tensor):
        return None
    if token_batch is None or b is None or token_batch == b or x.is_floating_point():
        return None
    if x.dim() not in (1, 2) or (x.dim() == 2 and x.shape[0] > 1):
        return None
    if x.dim() == 1 and x.shape[0] == b and site.positions is False:
        return None  # a batch of single tokens, decided before
    return (
        f"is called on positions shared by the batch, but the batch size was taken as {b} "
        f"and an earlier embedding sees {token_batch} examples; if {token_batch} is right, pass "
        "GradientNoiseScale(batch_size_fn=...)"
    )


def token_batch_of(site: Site, x: object) -> int | None:
    """dim 0 of an embedding's 2-D token ids (B, T) with B > 1: the model's own batch."""
    if isinstance(site.module, nn.Embedding) and isinstance(x, Tensor):
        if x.dim() == 2 and x.shape[0] > 1 and not x.is_floating_point():
            return int(x.shape[0])
    return None
