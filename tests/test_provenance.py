"""A length that equals the batch size is never taken as the batch (issue 20, part 2)."""

from __future__ import annotations

import pytest
import torch
from helpers import checked_step
from test_hooks import per_example_sq_norms
from torch import Tensor, nn

from lightning_gns.norms import PerExampleNorms
from lightning_gns.norms.provenance import BatchProvenance


def test_results_computed_from_the_batch_are_marked_and_others_not() -> None:
    ids, x = torch.randint(0, 5, (4, 4)), torch.randn(4, 3)
    w = nn.Parameter(torch.randn(4, 3))
    with BatchProvenance((ids, {"x": x})) as seen:
        h = torch.tanh(x * 2)[:, :2]
        pos = torch.arange(4)
        buckets = (pos[None, :] - pos[:, None]).clamp(-1, 1)
        feats = w * 2
        mask = (ids > 0).long().cumsum(-1)  # positions from an attention mask: per example
    assert seen.from_batch(h) and seen.from_batch(mask) and seen.from_batch(ids)
    assert not seen.from_batch(pos) and not seen.from_batch(buckets)
    assert not seen.from_batch(feats) and not seen.from_batch(w)


class RelativeBias(nn.Module):
    """Token embeddings, attention with a relative-position bias looked up on a (T, T) bucket
    matrix (as T5 does), and learned position features through a Linear: with T = B both the
    bias and the Linear see inputs whose dim 0 has the batch's size but holds positions."""

    def __init__(self, vocab: int = 11, d: int = 8, t: int = 6, buckets: int = 5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.bias = nn.Embedding(buckets, 1)
        self.pos_feat = nn.Parameter(torch.randn(t, d))
        self.pos_mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)
        buckets = (pos[None, :] - pos[:, None]).clamp(-2, 2) + 2  # (T, T), no batch dim
        h = self.tok(ids) + self.pos_mlp(self.pos_feat * 1.0)  # (T, d) broadcast over B
        scores = h @ h.transpose(1, 2) / 8 + self.bias(buckets).squeeze(-1)
        return self.head((scores.softmax(-1) @ h).mean(1))


@pytest.mark.parametrize("batch", [6, 4])  # T = 6 = B, and T ≠ B
def test_inputs_with_a_batch_sized_dim_0_that_holds_positions_are_left_out(batch) -> None:
    torch.manual_seed(0)
    model = RelativeBias()
    idx = torch.randint(0, 11, (batch, 6))
    norms = PerExampleNorms(model)
    acc, _, bad = checked_step(model, idx, norms, batch=idx)
    assert bad is None
    assert set(norms.left_out) == {"bias", "pos_mlp"}, norms.left_out
    if batch == 6:  # the shapes alone would have passed: the reason is where the input came from
        assert all("not computed from the batch" in r for r in norms.left_out.values())
    assert set(norms.sites) == {"", "tok", "head"}  # the root's own pos_feat: torch.func, whole
    names = ["pos_feat", "tok.weight", "head.weight", "head.bias"]
    ref = per_example_sq_norms(model, idx, names)
    torch.testing.assert_close(acc, ref.float(), rtol=1e-4, atol=1e-6)


def test_a_rule_less_layer_gets_inputs_not_from_the_batch_whole() -> None:
    """The torch.func fallback: an input not computed from the batch is shared by all examples,
    even where its dim 0 equals the batch size."""

    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

        def forward(self, x: Tensor, table: Tensor) -> Tensor:
            return x * self.gain + table.sum(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix, self.head = Mix(), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            table = torch.linspace(0, 1, 16).view(4, 4)  # (4, 4): dim 0 = 4 = B
            return self.head(self.mix(x, table))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 4)
    norms = PerExampleNorms(model)
    acc, _, bad = checked_step(model, x, norms, batch=x)
    assert bad is None and norms.left_out == {} and norms.sites["mix"].shared_inputs == {1}
    ref = per_example_sq_norms(model, x, [k for k, _ in model.named_parameters()])
    torch.testing.assert_close(acc, ref.float(), rtol=1e-4, atol=1e-6)
