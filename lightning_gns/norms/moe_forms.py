"""Exact forms of the stacked experts' per-example squared norms (:mod:`lightning_gns.norms.moe`):

    |∂ℓ_b/∂W|² = Σ_e |Σ_{pairs s of example b routed to e} g_s a_sᵀ|²

for a weight W of the experts, a_s its input and g_s its output gradient at (token, k) pair s.
Three forms, the cheapest by its count of multiply-adds (:func:`choose_form`, as the dense
Linear rule chooses between Gram and materialised): a Gram over each example's pairs masked
to equal experts; each (example, expert) group's pairs padded to a common length C, then Gram
or materialised per group; each group's gradient materialised by one grouped product (not on
a CPU, whose ``grouped_mm`` is slow). On a CPU, C is the largest group (a host read, free
there); elsewhere C = T (a token sends each expert at most one pair; nothing read back).
Only the forms whose buffers for one example fit in ``_HELD`` elements compete (if none
does, the one with the smallest buffers runs), over as many examples at once as fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gns.norms.tokens import rank_in_group, reading_host_tensor

_HELD = 1 << 25  # elements a form's buffers hold at once, at most (but one example's)


def _group_sizes(key: Tensor, num: int) -> Tensor:
    """(B, E + 1): how many pairs each example sends each expert (the last: the sentinels)."""
    counts = torch.zeros(key.shape[0], num + 1, dtype=torch.long, device=key.device)
    return counts.scatter_add_(1, key, torch.ones_like(key))


def choose_form(
    key: Tensor, num: int, t: int, k: int, d_a: int, d_g: int, a_per_token: bool
) -> tuple[str, int, int]:
    """("grouped" | "masked" | "padded" | "bucketed", C, examples at once) for pairs with
    experts ``key`` (B, T·k) (``num``: none, a sentinel of expert parallelism): the fewest
    multiply-adds among the forms whose buffers for one example fit in ``_HELD`` elements
    (else the smallest buffers), as many examples at once as fit (the bucketed form, on a
    CPU, takes all examples at once: its buffers are counted for the whole batch)."""
    cpu = key.device.type == "cpu"
    tk = t * k
    work = {"masked": (t * t if a_per_token else tk * tk) * d_a + tk * tk * (d_g + 3)}
    held = {"masked": 3 * tk * tk}
    if cpu:  # the group sizes, read back (free there)
        sizes = _group_sizes(key, num)[:, :num]
        with reading_host_tensor(sizes):
            cap = _slots(max(1, int(sizes.max())))
            work["bucketed"], held["bucketed"] = _bucketed_cost(sizes, d_a, d_g)
    else:
        cap = t
    gram = cap * (d_a + d_g) < d_a * d_g
    work["padded"] = num * cap * (min(cap * (d_a + d_g), d_a * d_g) + d_a + d_g)
    held["padded"] = num * cap * (d_a + d_g) + (2 * num * cap * cap if gram else num * d_a * d_g)
    if not cpu:  # (a CPU's grouped product is slow)
        work["grouped"] = tk * d_a * d_g + (num + 1) * d_a * d_g + tk * (d_a + d_g)
        held["grouped"] = (num + 1) * d_a * d_g + tk * (d_a + d_g)
    fits = [f for f in work if held[f] <= _HELD]
    form = min(fits, key=work.__getitem__) if fits else min(held, key=held.__getitem__)
    return form, cap, max(1, _HELD // held[form])


def _bucketed_cost(sizes: Tensor, d_a: int, d_g: int) -> tuple[int, int]:
    """(multiply-adds per example, elements held for the whole batch) of
    :func:`bucketed_sq_norm` for (B, E) group sizes (read back: a CPU tensor)."""
    slots = torch.div(sizes + 7, 8, rounding_mode="floor") * 8
    gram = slots * (d_a + d_g) < d_a * d_g
    per = torch.where(gram, slots * (d_a + d_g), d_a * d_g)
    work = int((slots * (per + d_a + d_g)).sum()) // sizes.shape[0]
    materialised = int((~gram & (slots > 0)).sum())
    held = int(slots.sum()) * (d_a + d_g) + int(torch.where(gram, 2 * slots * slots, 0).sum())
    held += min(materialised, max(1, _HELD // (d_a * d_g))) * d_a * d_g if materialised else 0
    return work, held


def largest_group(key: Tensor, num: int) -> int:
    """The most pairs one example sends one expert (a host read)."""
    counts = _group_sizes(key, num)
    with reading_host_tensor(counts):
        return max(1, int(counts[:, :num].max()))


def _slots(cap: int) -> int:
    """Slots for groups of at most ``cap`` pairs: rounded up to a multiple of 8, whose
    batched products run faster than the exact size (a CPU's matmul kernels tile by 8)."""
    return -(-cap // 8) * 8


def padded_sq_norm(
    a: Tensor,
    g: Tensor,
    example: Tensor,
    expert: Tensor,
    batch: int,
    num: int,
    cap: int,
    chunk: int | None = None,
) -> Tensor:
    """The padded form from rows in any order: a (S, d_a), g (S, d_g), the example and expert
    (``num``: none) of each row; each (example, expert) group's rows in ``cap`` ≥ its size
    slots (zeros after its own), then per group the Gram or the materialised form, the
    cheaper: cost B·E·cap·min(cap·(d_a + d_g), d_a·d_g); ``chunk`` examples at once."""
    d_a, d_g = a.shape[1], g.shape[1]
    # the sentinels: a group of their own per example
    pos, _ = rank_in_group(example * (num + 1) + expert, batch * (num + 1))
    real = expert < num
    chunk = batch if chunk is None else chunk
    parts = []
    for b0 in range(0, batch, chunk):
        m = min(chunk, batch - b0)
        mine = real & (example >= b0) & (example < b0 + m)
        # a dump slot past the end takes every other row (no boolean indexing: no host read)
        local = ((example - b0) * num + expert.clamp(max=num - 1)) * cap + pos
        slot = torch.where(mine, local, m * num * cap)
        pa = a.new_zeros(m * num * cap + 1, d_a).index_copy_(0, slot, a)
        pg = g.new_zeros(m * num * cap + 1, d_g).index_copy_(0, slot, g)
        pa, pg = pa[:-1].view(m * num, cap, d_a), pg[:-1].view(m * num, cap, d_g)
        if cap * (d_a + d_g) < d_a * d_g:
            sq = (torch.bmm(pa, pa.mT) * torch.bmm(pg, pg.mT)).sum((1, 2))
        else:
            sq = torch.linalg.vector_norm(torch.bmm(pg.mT, pa), dim=(1, 2)).square()
        parts.append(sq.view(m, num).sum(1))
    return torch.cat(parts)


def bucketed_sq_norm(
    a: Tensor, g: Tensor, example: Tensor, expert: Tensor, batch: int, num: int
) -> Tensor:
    """The padded form with little padding, on a CPU (one host read of the group sizes, free
    there): each (example, expert) group's rows in its size rounded up to a multiple of 8
    slots, the groups of equal slots side by side in one buffer, then per such bucket the Gram
    or the materialised form, the cheaper (materialised groups in chunks of at most
    ``_HELD`` elements). Rows in any order; ``expert`` ``num``: none."""
    d_a, d_g = a.shape[1], g.shape[1]
    groups = batch * num
    real = expert < num
    gid = torch.where(real, example * num + expert.clamp(max=num - 1), groups)
    pos, sizes = rank_in_group(gid, groups + 1)
    slots = torch.div(sizes[:groups] + 7, 8, rounding_mode="floor") * 8
    by_slots = torch.argsort(slots, stable=True)  # groups of equal slots side by side
    ends = torch.cumsum(slots[by_slots], 0)
    start = torch.empty_like(ends)
    start[by_slots] = ends - slots[by_slots]
    with reading_host_tensor(slots):
        buckets = torch.unique_consecutive(slots[by_slots], return_counts=True)
        caps, counts = buckets[0].tolist(), buckets[1].tolist()
        total = int(ends[-1]) if groups else 0
    # one copy of the rows into their slots; the sentinels' rows go to a dump slot at the end
    slot = torch.where(real, start[gid.clamp(max=groups - 1)] + pos, total)
    pa = a.new_zeros(total + 1, d_a).index_copy_(0, slot, a)
    pg = g.new_zeros(total + 1, d_g).index_copy_(0, slot, g)
    per_group = []
    row = 0
    for cap, n in zip(caps, counts, strict=True):
        if cap == 0:
            per_group.append(a.new_zeros(n))
            continue
        ba = pa[row : row + n * cap].view(n, cap, d_a)
        bg = pg[row : row + n * cap].view(n, cap, d_g)
        row += n * cap
        if cap * (d_a + d_g) < d_a * d_g:
            per_group.append((torch.bmm(ba, ba.mT) * torch.bmm(bg, bg.mT)).sum((1, 2)))
            continue
        step = max(1, _HELD // (d_a * d_g))
        for i in range(0, n, step):
            per = torch.bmm(bg[i : i + step].mT, ba[i : i + step])
            per_group.append(torch.linalg.vector_norm(per, dim=(1, 2)).square())
    sq = torch.cat(per_group) if per_group else a.new_zeros(0)
    owner = torch.div(by_slots, num, rounding_mode="floor")  # the example of each group
    return a.new_zeros(batch).index_add_(0, owner, sq)


def _per_pair(a: Tensor, t: int, k: int) -> Tensor:
    """(B, T·k, D) rows per pair from (B, T, D) per token or already per pair."""
    return a.repeat_interleave(k, dim=1) if a.shape[1] == t and k > 1 else a


def routed_padded(
    a: Tensor, g: Tensor, key: Tensor, num: int, t: int, k: int, cap: int | None = None
) -> Tensor:
    """The padded form on (B, T, D) per token or (B, T·k, D) per pair, ``key`` (B, T·k);
    ``cap`` None: the largest group (read back)."""
    b, tk = key.shape
    cap = largest_group(key, num) if cap is None else cap
    example = torch.arange(b, device=key.device).repeat_interleave(tk)
    rows_a, rows_g = _per_pair(a, t, k).reshape(b * tk, -1), g.reshape(b * tk, -1)
    return padded_sq_norm(rows_a, rows_g, example, key.reshape(-1), b, num, cap)


def routed_grouped(a: Tensor, g: Tensor, key: Tensor, num: int, t: int, k: int) -> Tensor:
    """The grouped form: each example's pairs sorted by expert, then one grouped product over
    the (example, expert) groups (``F.grouped_mm``, no host read; else on a CPU a loop over the
    groups, elsewhere :func:`routed_padded` with T slots). Cost B·T·k·d_a·d_g, the weight
    gradient's own; examples in chunks of at most ``_HELD`` elements (or one)."""
    b, d_a, d_g = a.shape[0], a.shape[-1], g.shape[-1]
    order = torch.argsort(key, dim=1, stable=True)  # (B, T·k): by expert within each example
    src = torch.div(order, k, rounding_mode="floor") if a.shape[1] == t else order
    sa = torch.gather(a, 1, src.unsqueeze(-1).expand(-1, -1, d_a))
    sg = torch.gather(g, 1, order.unsqueeze(-1).expand(-1, -1, d_g))
    counts = _group_sizes(key, num)
    chunk = max(1, _HELD // ((num + 1) * d_a * d_g))
    parts = []
    for b0 in range(0, b, chunk):
        b1 = min(b, b0 + chunk)
        n = counts[b0:b1].reshape(-1)
        per = _grouped_outer(sg[b0:b1].reshape(-1, d_g), sa[b0:b1].reshape(-1, d_a), n)
        if per is None:  # no grouped product off the CPU: padded groups, as exact
            return routed_padded(a, g, key, num, t, k, t)
        per = per.view(b1 - b0, num + 1, -1)[:, :num]  # the sentinels' group: no gradient
        parts.append(
            torch.where(n.view(b1 - b0, num + 1, 1)[:, :num] > 0, per, 0).pow(2).sum((1, 2))
        )
    return torch.cat(parts)


def _grouped_outer(g: Tensor, a: Tensor, counts: Tensor) -> Tensor | None:
    """Σ g_r a_rᵀ over each group of consecutive rows (``counts[i]`` rows): (G, d_g, d_a).
    ``F.grouped_mm``, else on a CPU a loop over the groups (a read of the counts, free there);
    None elsewhere (a loop would wait for the device)."""
    if hasattr(F, "grouped_mm") and g.dtype in (torch.float32, torch.bfloat16):
        try:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            return F.grouped_mm(g.mT, a, offs=offs)
        except RuntimeError:  # unaligned strides, an older GPU: the loop is as exact
            pass
    if g.device.type != "cpu":
        return None
    out = g.new_zeros(counts.shape[0], g.shape[1], a.shape[1])
    with reading_host_tensor(counts):
        sizes = counts.tolist()
    start = 0
    for i, n in enumerate(sizes):
        if n:
            out[i] = g[start : start + n].mT @ a[start : start + n]
        start += n
    return out


def _gram(v: Tensor, t: int, k: int) -> Tensor:
    """Pairwise dot products (B, T·k, T·k) of v: (B, T, D) per token, or (B, T·k, D) per pair."""
    b = v.shape[0]
    gram = torch.bmm(v, v.mT)
    if v.shape[1] == t and k > 1:
        gram = gram[:, :, None, :, None].expand(b, t, k, t, k).reshape(b, t * k, t * k)
    return gram


def routed_masked_gram(
    a: Tensor, g: Tensor, key: Tensor, num: int, t: int, k: int, chunk: int | None = None
) -> Tensor:
    """The masked Gram form, Σ_{s,s'} [e_s = e_s'] (a_s·a_s')(g_s·g_s') over each example's
    pairs: cost B·(T·k)²·(d_a + d_g), whatever the number of experts; ``chunk`` examples at
    once."""
    chunk = key.shape[0] if chunk is None else chunk
    parts = []
    for b0 in range(0, key.shape[0], chunk):
        kb = key[b0 : b0 + chunk]
        same = (kb[:, :, None] == kb[:, None, :]) & (kb < num).unsqueeze(2)
        grams = _gram(a[b0 : b0 + chunk], t, k) * _gram(g[b0 : b0 + chunk], t, k)
        parts.append((grams * same).sum((1, 2)))
    return torch.cat(parts)


def bias_sq_norm(v: Tensor, example: Tensor, expert: Tensor, batch: int, num: int) -> Tensor:
    """Σ_e |Σ_{rows of example b routed to e} v|² per example; rows of v (S, D) in any order."""
    slot = example * (num + 1) + expert
    sums = v.new_zeros(batch * (num + 1), v.shape[1]).index_add_(0, slot, v)
    return sums.view(batch, num + 1, -1)[:, :num].pow(2).sum((1, 2))
