"""The user's loop through a change of micro-batch (issue 26, item 6): the docs' example
resumes exactly, validation keeps its schedule, limit_train_batches / max_steps / max_epochs
keep their meaning, a batch sampler that cannot grow is named."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from adaptive_helpers import LoudNoise, Small, params
from helpers import digits, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from lightning_gns.adaptive import AdaptiveBatchSize
from lightning_gns.adaptive.loop import UserLoop
from lightning_gns.adaptive.sampler import ResizableBatchSampler


class DocsModule(Small):
    """docs/adaptive.md's DataLoader: ``ResizableBatchSampler(RandomSampler(data), 8)``, no
    generator (the global RNG orders every epoch); ``weighted``: a WeightedRandomSampler."""

    def __init__(
        self, weighted: bool = False, workers: int = 0, drop_last: bool = False, **kw
    ) -> None:
        super().__init__(**kw)
        self.weighted, self.workers, self.drop_last = weighted, workers, drop_last
        self.validated: list[tuple[int, int]] = []  # (epoch, global step) of each validation
        self.examples: dict[int, int] = {}  # examples trained on, by epoch
        self.steps: list[tuple[int, int]] = []  # (epoch, global step) before each batch

    def training_step(self, batch, batch_idx):
        epoch = self.trainer.current_epoch
        self.examples[epoch] = self.examples.get(epoch, 0) + len(batch[0])
        self.steps.append((epoch, self.trainer.global_step))
        return super().training_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        x, y = digits()
        data = TensorDataset(x[: self.n], y[: self.n])
        if self.weighted:
            inner = WeightedRandomSampler(torch.linspace(1, 2, self.n), self.n)
        else:
            inner = RandomSampler(data)
        sampler = ResizableBatchSampler(inner, self.batch_size, drop_last=self.drop_last)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.workers)

    def validation_step(self, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.validated.append((self.trainer.current_epoch, self.trainer.global_step))

    def val_dataloader(self) -> DataLoader:
        x, y = digits()
        return DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)


def run(root, adaptive: bool = True, ckpt=None, callbacks=(), module_kw=None, **trainer_kw):
    """256 examples in batches of 8; LoudNoise read every 3 steps: the micro-batch grows to 16
    after step 3 and to 32 after step 6, in epoch 0."""
    torch.manual_seed(0)
    module = DocsModule(**{"n": 256, "batch_size": 8, **(module_kw or {})})
    ada = AdaptiveBatchSize(max_accumulate=1, max_micro_batch=32, rule="lower_bound",
                            check_every_n_steps=3, probe=0)  # fmt: skip
    kw = {"max_epochs": 3, "num_sanity_val_steps": 0, **trainer_kw}
    kw = trainer_kwargs(root, enable_checkpointing=bool(callbacks), **kw)
    cbs = [LoudNoise(), ada] if adaptive else []
    trainer = pl.Trainer(**kw, callbacks=[*cbs, *callbacks])
    torch.manual_seed(1)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer, ada, module


def per_epoch(rows: list[tuple[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for epoch, _ in rows:
        out[epoch] = out.get(epoch, 0) + 1
    return out


@pytest.mark.parametrize(
    ("weighted", "workers"), [(False, 2), (True, 0)], ids=["docs-example", "weighted"]
)
def test_the_docs_example_resumes_exactly_mid_epoch(tmp_path, weighted, workers) -> None:
    """docs/adaptive.md's DataLoader (``ResizableBatchSampler(RandomSampler(data), 8)``, two
    workers), and a WeightedRandomSampler: global-RNG inner samplers. A checkpoint after 5
    steps (epoch 0, the micro-batch grown to 16), resumed in a process whose global RNG is
    elsewhere, ends with the parameters of the uninterrupted run."""
    kw = {"module_kw": {"weighted": weighted, "workers": workers}}
    _, full, full_module = run(tmp_path / "full", **kw)
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1)
    run(tmp_path / "a", callbacks=[saver], max_steps=5, **kw)
    torch.manual_seed(12345)  # another global RNG state than the uninterrupted run's
    _, resumed, module = run(tmp_path / "b", ckpt=str(tmp_path / "ck" / "epoch=0-step=5.ckpt"),
                             **kw)  # fmt: skip
    assert [c.new_micro for c in full.changes] == [16, 32]
    assert resumed.changes == full.changes
    torch.testing.assert_close(params(module), params(full_module), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw",
    [{}, {"val_check_interval": 0.5}, {"val_check_interval": 10},
     {"check_val_every_n_epoch": 2}, {"val_check_interval": 10, "check_val_every_n_epoch": None}],
    ids=["float-1.0", "float-0.5", "int-10", "every-2-epochs", "int-10-across-epochs"],
)  # fmt: skip
def test_validation_keeps_its_schedule_through_a_grown_micro_batch(tmp_path, kw) -> None:
    """Validations per epoch with the micro-batch grown mid-epoch 0 (8 -> 16 -> 32) are the
    user's: as many as Lightning runs at the micro-batch of 8, at the same share of each epoch."""
    trainer, ada, module = run(tmp_path / "grown", **kw)
    _, _, fixed = run(tmp_path / "fixed", adaptive=False, **kw)
    assert [c.new_micro for c in ada.changes] == [16, 32] and ada.changes[-1].step < 12
    assert per_epoch(module.validated) == per_epoch(fixed.validated)
    assert len(module.validated) == len(fixed.validated) > 0
    # each validation of a whole epoch at 32 (epochs 1, 2) comes with the batch of 32 that
    # reaches the user's point (Lightning's validation after w batches of 8)
    start = {e: min(s for f, s in module.steps if f == e) for e in (1, 2)}
    for (e, s), (f, w) in zip(module.validated, fixed.validated, strict=True):
        if e in start:
            reached = 32 * (s - start[e])  # examples of epoch e trained on
            assert (w - 32 * f) * 8 <= reached < (w - 32 * f) * 8 + 32


@pytest.mark.parametrize("kw", [{}, {"val_check_interval": 0.5}], ids=["float-1.0", "float-0.5"])
def test_validation_at_the_epochs_end_with_drop_last(tmp_path, kw) -> None:
    """250 examples, drop_last: 31 batches of 8 (248 examples), then 7 of 32 (224): the
    epoch's end still validates, though the grown epoch ends before the 248th example."""
    small = {"n": 250, "drop_last": True}
    trainer, ada, module = run(tmp_path / "grown", module_kw=small, **kw)
    _, _, fixed = run(tmp_path / "fixed", adaptive=False, module_kw=small, **kw)
    assert [c.new_micro for c in ada.changes] == [16, 32]
    assert module.examples[1] == 224 and fixed.examples[1] == 248
    assert (
        per_epoch(module.validated)
        == per_epoch(fixed.validated)
        == {e: 2 if kw else 1 for e in range(3)}
    )


@pytest.mark.parametrize("limit", [10, 0.5])
def test_limit_train_batches_keeps_the_examples_of_an_epoch(tmp_path, limit) -> None:
    """limit_train_batches counts the user's batches: a grown epoch trains on as many examples
    (to a whole batch) as Lightning's limited epoch at the micro-batch of 8."""
    _, ada, module = run(tmp_path / "grown", limit_train_batches=limit)
    _, _, fixed = run(tmp_path / "fixed", adaptive=False, limit_train_batches=limit)
    assert ada.changes and set(module.examples) == set(fixed.examples) == {0, 1, 2}
    for epoch, want in fixed.examples.items():
        assert want <= module.examples[epoch] < want + 32


def test_max_epochs_and_max_steps_keep_their_meaning(tmp_path) -> None:
    """max_epochs: whole passes over the data (every example once an epoch); max_steps:
    optimizer steps, whatever the batch."""
    trainer, ada, module = run(tmp_path / "epochs")
    assert ada.changes and trainer.current_epoch == 3 and module.examples == {0: 256, 1: 256,
                                                                             2: 256}  # fmt: skip
    first = max(s for e, s in module.steps if e == 0) + 1  # steps of epoch 0
    trainer, ada, module = run(tmp_path / "steps", max_steps=first + 3)
    assert trainer.global_step == first + 3 and ada.changes
    assert module.examples == {0: 256, 1: 3 * 32}


class OwnBatchSampler(BatchSampler):
    """A user's own batch sampler: it cannot grow."""


def test_a_batch_sampler_that_cannot_grow_is_named_with_the_fix(tmp_path) -> None:
    class Own(Small):
        def train_dataloader(self) -> DataLoader:
            x, y = digits()
            data = TensorDataset(x[:64], y[:64])
            return DataLoader(data, batch_sampler=OwnBatchSampler(RandomSampler(data), 8, False))

    ada = AdaptiveBatchSize(max_accumulate=4, max_micro_batch=64, rule="lower_bound",
                            check_every_n_steps=2, probe=0)  # fmt: skip
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[LoudNoise(), ada])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Own())
    said = [str(w.message) for w in caught if "cannot grow" in str(w.message)]
    assert len(said) == 1, said
    assert "OwnBatchSampler" in said[0] and "ResizableBatchSampler(sampler, batch_size)" in said[0]
    assert ada.changes and all(c.new_micro is None for c in ada.changes)  # accumulation only


def test_the_users_schedule_in_examples() -> None:
    loop = UserLoop(base_micro=8, examples=100, limit=13, val_every=5)
    assert loop.budget == 100 and loop.position(100) == 13.0
    assert loop.validates(32, 48, epoch=0) and not loop.validates(0, 32, epoch=0)
    across = UserLoop(base_micro=8, examples=100, limit=13, val_every=5, across_epochs=True)
    assert [across.validates(a, a + 16, 1) for a in (0, 16, 32, 48)] == [True, False, False, True]


@pytest.mark.parametrize("at", [5, 16])  # epoch 0 (mid), epoch 1 (mid, whole epochs at 32)
def test_a_resumed_run_validates_where_the_uninterrupted_one_does(tmp_path, at) -> None:
    kw = {"val_check_interval": 0.5}
    _, _, full = run(tmp_path / "full", **kw)
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=at, save_top_k=-1)
    run(tmp_path / "a", callbacks=[saver], max_steps=at, **kw)
    (ckpt,) = (tmp_path / "ck").glob(f"*step={at}.ckpt")
    _, _, module = run(tmp_path / "b", ckpt=str(ckpt), **kw)
    assert module.validated == [v for v in full.validated if v[1] > at]
    assert len(full.validated) == 6


def test_a_loader_without_a_batch_sampler_is_named_so() -> None:
    """``DataLoader(batch_size=None)`` (the dataset yields batches) has no batch sampler: the
    warning says so, not "NoneType"."""
    from types import SimpleNamespace

    from lightning_gns.adaptive.loop import cannot_grow

    x, y = digits()
    trainer = SimpleNamespace(train_dataloader=DataLoader(TensorDataset(x, y), batch_size=None))
    message = cannot_grow(trainer, 64)
    assert message is not None and "draws with no batch sampler" in message
