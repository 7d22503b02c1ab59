"""ResizableBatchSampler on its own, and the micro-batch AdaptiveBatchSize grows with it:
epochs, workers, resume mid-epoch (DDP: tests/test_ddp.py)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from adaptive_helpers import LoudNoise, Small, params
from helpers import trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

from lightning_gns.adaptive import AdaptiveBatchSize
from lightning_gns.adaptive.sampler import ResizableBatchSampler

DATA = TensorDataset(torch.arange(100))


def seeded(seed: int = 3) -> RandomSampler:
    return RandomSampler(DATA, generator=torch.Generator().manual_seed(seed))


def test_draws_what_shuffle_true_draws() -> None:
    """Same global seed, the same first epoch as DataLoader(batch_size=8, shuffle=True):
    swapping it in changes nothing there; later epochs are a permutation each, seeded from the
    first (so that a resumed process draws them too), the same for the same global seed."""
    torch.manual_seed(0)
    plain = [b[0].tolist() for b in DataLoader(DATA, batch_size=8, shuffle=True)]

    def epochs() -> list[list[list[int]]]:
        torch.manual_seed(0)
        loader = DataLoader(DATA, batch_sampler=ResizableBatchSampler(RandomSampler(DATA), 8))
        return [[b[0].tolist() for b in loader] for _ in range(3)]

    first, *later = epochs()
    assert first == plain
    for epoch in later:
        assert sorted(i for b in epoch for i in b) == list(range(100)) and epoch != first
    assert epochs()[1:] == later


@pytest.mark.parametrize("weighted", [False, True])
def test_a_global_rng_sampler_resumes_its_later_epochs_too(weighted) -> None:
    """RandomSampler / WeightedRandomSampler without a generator: a sampler resumed from the
    state after 5 batches, in a process whose global RNG is elsewhere, draws the rest of the
    epoch and the next epochs as the uninterrupted one."""

    def inner():
        if weighted:
            return WeightedRandomSampler(torch.linspace(1, 3, 100), 100)
        return RandomSampler(DATA)

    torch.manual_seed(0)
    full = ResizableBatchSampler(inner(), 8)
    it = iter(full)
    done = [next(it) for _ in range(5)]
    state = full.state_dict(5)
    reference = list(it) + list(full) + list(full)
    torch.manual_seed(777)  # the resumed process
    resumed = ResizableBatchSampler(inner(), 8)
    resumed.load_state_dict(state)
    assert done and list(resumed) + list(resumed) + list(resumed) == reference


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_resize_starts_at_the_batch_it_names_and_every_example_comes_once(drop_last) -> None:
    sampler = ResizableBatchSampler(seeded(), 8, drop_last=drop_last)
    it = iter(sampler)
    batches = [next(it) for _ in range(3)]
    assert len(sampler) == 13 - drop_last and sampler.drawn == 3
    with pytest.raises(ValueError, match="drawn already"):
        sampler.resize(16, 2)
    assert sampler.resize(16, 4) == (0, 4)  # batch 3 keeps 8, then 16s
    assert len(sampler) == (9 if not drop_last else 8)
    batches += list(it)
    sizes = [len(b) for b in batches]
    assert sizes == [8] * 4 + [16] * 4 + ([4] if not drop_last else [])
    seen = sorted(i for b in batches for i in b)
    assert len(set(seen)) == len(seen) == 100 - 4 * drop_last
    assert sampler.resize(32, 50) == (1, 0)  # past this epoch's end: from the next one
    assert [len(b) for b in sampler] == [32, 32, 32] + ([4] if not drop_last else [])


@pytest.mark.parametrize("consumed", [5, 9])  # mid-epoch, and the epoch's end
def test_resumes_the_same_order_after_the_batches_consumed(consumed) -> None:
    """The state after ``consumed`` batches of an epoch with a resize: a new sampler (another
    generator seed) continues with exactly the batches the uninterrupted one draws next."""

    def epoch(sampler, n=None):
        it = iter(sampler)
        out = [next(it) for _ in range(2)]
        sampler.resize(16, 4)
        out += list(it) if n is None else [next(it) for _ in range(n - 2)]
        return out

    full = ResizableBatchSampler(seeded(), 8)
    reference = epoch(full) + list(full) + list(full)
    part = ResizableBatchSampler(seeded(), 8)
    done = epoch(part, consumed)
    resumed = ResizableBatchSampler(seeded(99), 8)
    resumed.load_state_dict(part.state_dict(consumed))
    stream = done + list(resumed) + list(resumed) + list(resumed)
    assert stream[: len(reference)] == reference


def grown_run(root, workers: int = 0, epochs: int = 2, ckpt=None, callbacks=(), steps=None):
    """Batches of 8 from 100 examples, LoudNoise read every 3 steps: the micro-batch grows to
    32 (max_micro_batch), then accumulation to 2."""
    gns = LoudNoise()
    ada = AdaptiveBatchSize(
        max_accumulate=2, max_micro_batch=32, rule="lower_bound", check_every_n_steps=3
    )
    sizes = Sizes()
    module = Small(n=100, batch_size=8, seed=0, sampler=ResizableBatchSampler, workers=workers)
    kw = trainer_kwargs(
        root, max_epochs=epochs, enable_checkpointing=ckpt is not None or bool(callbacks)
    )
    if steps is not None:
        kw["max_steps"] = steps
    trainer = pl.Trainer(**kw, callbacks=[gns, ada, sizes, *callbacks])
    trainer.fit(module, ckpt_path=ckpt)
    return trainer, gns, ada, sizes, module


class Sizes(pl.Callback):
    """Each batch's (epoch, size, accumulation, whether it ended a step) and gns/batch_size."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int]] = []
        self.monitor: list[float] = []
        self.stepped = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.rows.append((trainer.current_epoch, len(batch[0]), trainer.accumulate_grad_batches))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.stepped = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        gns = next(c for c in trainer.callbacks if isinstance(c, LoudNoise))
        self.monitor.append(gns.batch_size)
        self.rows[-1] = (*self.rows[-1], self.stepped)
        self.stepped = False


def test_the_micro_batch_grows_first_then_accumulation(tmp_path) -> None:
    trainer, gns, ada, sizes, _ = grown_run(tmp_path)
    assert [(c.new_micro, c.new) for c in ada.changes] == [(16, 1), (32, 1), (32, 2)]
    for epoch in (0, 1):  # every example once per epoch, in the sizes scheduled
        assert sum(r[1] for r in sizes.rows if r[0] == epoch) == 100
    # the epoch's last batch steps the optimizer, a change starts a whole window
    last = [r for r in sizes.rows if r[0] == 0][-1]
    assert last[3]
    # the monitor's batch size follows each change at once (the epoch's short last batch aside)
    full = [(r, m) for r, m in zip(sizes.rows, sizes.monitor, strict=True) if r[1] % 8 == 0]
    assert [m for _, m in full] == [r[1] * r[2] for r, _ in full]
    assert gns.batch_size == 64
    assert trainer.callback_metrics["gns/micro_batch"] == 32


def test_with_workers_a_change_waits_for_the_batches_they_drew(tmp_path) -> None:
    """Two workers draw prefetch_factor × 2 = 4 batches ahead: a resize starts after those,
    at a step boundary; every example still comes once per epoch."""
    _, _, ada, sizes, _ = grown_run(tmp_path, workers=2)
    zero = grown_run(tmp_path / "zero")[2]
    assert [(c.new_micro, c.new) for c in ada.changes] == [
        (c.new_micro, c.new) for c in zero.changes
    ]
    assert zero.changes[0].step == 3 and ada.changes[0].step == 3 + 4  # decided after step 3
    for epoch in (0, 1):
        assert sum(r[1] for r in sizes.rows if r[0] == epoch) == 100


def test_resume_mid_epoch_continues_as_the_uninterrupted_run(tmp_path) -> None:
    """A checkpoint after 6 steps (mid-epoch: the micro-batch grew to 16, the change to 32 is
    decided, not yet applied): the resumed run draws the same batches, makes the same changes
    at the same steps and ends with the same parameters."""
    _, _, full, full_sizes, full_module = grown_run(tmp_path / "full", epochs=3)
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
    grown_run(tmp_path / "a", epochs=3, callbacks=[saver], steps=6)
    _, _, resumed, sizes, module = grown_run(
        tmp_path / "b", epochs=3, ckpt=str(tmp_path / "ck" / "epoch=0-step=6.ckpt")
    )
    assert resumed.changes == full.changes
    assert sizes.rows == full_sizes.rows[-len(sizes.rows) :]
    torch.testing.assert_close(params(module), params(full_module), rtol=0, atol=0)
