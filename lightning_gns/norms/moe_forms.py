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


class Buckets:
    """The layout of the bucketed form (on a CPU; one host read of the group sizes, free
    there): each (example, expert) group's rows in its size rounded up to a multiple of 8
    slots, the groups of equal slots side by side in one buffer; per such bucket the Gram or
    the materialised form, the cheaper (materialised groups in chunks of at most ``_HELD``
    elements). Rows in any order, ``expert`` ``num`` for none; one layout serves every
    weight of the same pairs."""

    def __init__(self, example: Tensor, expert: Tensor, batch: int, num: int) -> None:
        self.batch, self.num, self.n = batch, num, example.shape[0]
        groups = batch * num
        real = expert < num
        gid = torch.where(real, example * num + expert.clamp(max=num - 1), groups)
        pos, sizes = rank_in_group(gid, groups + 1)
        slots = torch.div(sizes[:groups] + 7, 8, rounding_mode="floor") * 8
        self.by_slots = torch.argsort(slots, stable=True)  # groups of equal slots side by side
        ends = torch.cumsum(slots[self.by_slots], 0)
        start = torch.empty_like(ends)
        start[self.by_slots] = ends - slots[self.by_slots]
        with reading_host_tensor(slots):
            buckets = torch.unique_consecutive(slots[self.by_slots], return_counts=True)
            self.caps, self.counts = buckets[0].tolist(), buckets[1].tolist()
            self.total = int(ends[-1])
        # each row's slot; the sentinels' rows go to a dump slot at the end
        self.slot = torch.where(real, start[gid.clamp(max=groups - 1)] + pos, self.total)
        src = torch.full((self.total + 1,), self.n, dtype=torch.long, device=example.device)
        src.index_copy_(0, self.slot, torch.arange(self.n, device=example.device))
        self.src = src.index_fill_(0, torch.tensor([self.total], device=src.device), self.n)

    def rows(self, v: Tensor) -> Tensor:
        """(slots + 1, D): row r of ``v`` in row r's slot, zeros elsewhere."""
        return v.new_zeros(self.total + 1, v.shape[1]).index_copy_(0, self.slot, v)

    def sq_norm(self, a: Side, g: Side) -> Tensor:
        """Σ_e |Σ_{rows of example b routed to e} g aᵀ|² (B,), each side a :meth:`rows`
        buffer or a :class:`TokenSide` (its Gram read off the examples' token Grams)."""
        d_a, d_g = _width(a), _width(g)
        per_group = []
        row = 0
        for cap, n in zip(self.caps, self.counts, strict=True):
            span = slice(row, row + n * cap)
            row += n * cap
            if cap == 0:
                per_group.append(torch.zeros(n, dtype=a.dtype, device=a.device))
            elif cap * (d_a + d_g) < d_a * d_g:
                grams = _gram_of(a, self, span, n, cap) * _gram_of(g, self, span, n, cap)
                per_group.append(grams.sum((1, 2)))
            else:
                ba, bg = _rows_of(a, self, span, n, cap), _rows_of(g, self, span, n, cap)
                step = max(1, _HELD // (d_a * d_g))
                for i in range(0, n, step):
                    per = torch.bmm(bg[i : i + step].mT, ba[i : i + step])
                    per_group.append(torch.linalg.vector_norm(per, dim=(1, 2)).square())
        sq = torch.cat(per_group) if per_group else torch.zeros(0, dtype=a.dtype, device=a.device)
        owner = torch.div(self.by_slots, self.num, rounding_mode="floor")  # each group's example
        return sq.new_zeros(self.batch).index_add_(0, owner, sq)


class TokenSide:
    """One side of the bucketed form whose rows are per token: row r is ``scale[r]`` times
    ``v[tok[r]]`` (x for the up weight; g and the routing weight for down, c = w·g). Its Gram
    within a group is read off each example's token Gram v vᵀ (T × T, computed once), scaled:
    no rows are gathered, and B·T²·D multiply-adds replace Σ_groups C²·D."""

    def __init__(self, v: Tensor, tok: Tensor, t: int, scale: Tensor | None = None) -> None:
        self.v, self.tok, self.t = v, tok, t
        self.scale = None if scale is None else scale.reshape(-1)
        self.width, self.dtype, self.device = v.shape[1], v.dtype, v.device
        self._grams: Tensor | None = None

    def grams(self) -> Tensor:
        """Every example's token Gram, flattened, and a 0 at the end (for empty slots)."""
        if self._grams is None:
            ex = self.v.view(-1, self.t, self.width)
            flat = torch.bmm(ex, ex.mT).reshape(-1)
            self._grams = torch.cat([flat, flat.new_zeros(1)])
        return self._grams


Side = Tensor | TokenSide


def _width(side: Side) -> int:
    return side.shape[1] if isinstance(side, Tensor) else side.width


def _slot_pairs(lay: Buckets, span: slice, n: int, cap: int) -> Tensor:
    """(n, cap): the row in each slot of a bucket (``lay.n``: empty)."""
    return lay.src[span].view(n, cap)


def _gram_of(side: Side, lay: Buckets, span: slice, n: int, cap: int) -> Tensor:
    """(n, cap, cap): the Gram of each group of a bucket, zeros at empty slots."""
    if isinstance(side, Tensor):
        b = side[span].view(n, cap, side.shape[1])
        return torch.bmm(b, b.mT)
    pairs = _slot_pairs(lay, span, n, cap)
    full = pairs < lay.n
    tok = side.tok[pairs.clamp(max=lay.n - 1)]
    t = side.t
    idx = tok[:, :, None] * t + torch.remainder(tok, t)[:, None, :]  # the same example's
    both = full[:, :, None] & full[:, None, :]
    gram = side.grams()[torch.where(both, idx, side.grams().shape[0] - 1)]
    if side.scale is not None:
        w = torch.where(full, side.scale[pairs.clamp(max=lay.n - 1)], 0)
        gram = gram * (w[:, :, None] * w[:, None, :])
    return gram


def _rows_of(side: Side, lay: Buckets, span: slice, n: int, cap: int) -> Tensor:
    """(n, cap, D): the rows of each group of a bucket, zeros at empty slots."""
    if isinstance(side, Tensor):
        return side[span].view(n, cap, side.shape[1])
    pairs = _slot_pairs(lay, span, n, cap)
    full = pairs < lay.n
    rows = side.v[side.tok[pairs.clamp(max=lay.n - 1)]]
    w = full.to(rows.dtype)
    if side.scale is not None:
        w = w * side.scale[pairs.clamp(max=lay.n - 1)]
    return rows * w.unsqueeze(2)


def bucketed_sq_norm(
    a: Tensor, g: Tensor, example: Tensor, expert: Tensor, batch: int, num: int
) -> Tensor:
    """The bucketed form (:class:`Buckets`) from rows a (S, d_a), g (S, d_g) in any order."""
    lay = Buckets(example, expert, batch, num)
    return lay.sq_norm(lay.rows(a), lay.rows(g))


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
