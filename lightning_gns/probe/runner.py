"""The branches themselves: batches drawn with a private generator, training, evaluation.

The user's DataLoader is never touched: the branches draw indices of its (map-style) dataset
with their own ``torch.Generator`` and collate them with its ``collate_fn``. The held-back
evaluation batches are drawn once and left out of every branch's draws. Under DDP each rank
draws its own examples; the branches average the gradients with one all-reduce per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gns.probe.restore import Snapshot


class Draws:
    """Indices of ``size`` examples: ``held`` for evaluation, in batches of ``eval_micro``
    (fixed with them, so a micro-batch grown later keeps the count of evaluation batches the
    bootstrap resamples), the rest (``pool``) to train on.

    Examples:
        >>> d = Draws(size=100, held=20, seed=0)
        >>> len(d.held), len(d.pool), sorted(set(d.held.tolist()) & set(d.pool.tolist()))
        (20, 80, [])
        >>> bool(torch.equal(d.stream(step=5, rank=0, n=8), d.stream(step=5, rank=0, n=8)))
        True
    """

    def __init__(self, size: int, held: int, seed: int, eval_micro: int = 1) -> None:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        self.seed, self.eval_micro = seed, eval_micro
        self.held, self.pool = order[:held], order[held:]

    def stream(self, step: int, rank: int, n: int, repeat: int = 0) -> Tensor:
        """``n`` training indices, drawn with replacement: one data order per ``repeat``, the
        same for every branch of a probe."""
        gen = torch.Generator().manual_seed(hash((self.seed, step, rank, repeat)) % 2**62)
        return self.pool[torch.randint(len(self.pool), (n,), generator=gen)]


def loss_of(out: Any) -> Tensor:
    """The loss ``training_step`` returned (a tensor, or a dict with ``"loss"``)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("loss"), Tensor):
        return out["loss"]
    raise RuntimeError("training_step returned no loss (None or no 'loss' key): nothing to train")


class Runner:
    """Trains and scores branches of the user's LightningModule inside ``trainer``."""

    def __init__(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        dataset: Any,
        collate: Callable[[list[Any]], Any],
    ) -> None:
        self.trainer, self.module = trainer, module
        self.dataset, self.collate = dataset, collate
        self.rank, self.world = trainer.global_rank, trainer.world_size

    def batch(self, indices: Tensor) -> Any:
        raw = self.collate([self.dataset[int(i)] for i in indices])
        return self.trainer.strategy.batch_to_device(raw)

    def _loss(self, indices: Tensor) -> Tensor:
        with self.trainer.precision_plugin.train_step_context():
            return loss_of(self.module.training_step(self.batch(indices), 0))

    def train(
        self, optimizer: torch.optim.Optimizer, stream: Tensor, micro: int, per_step: int,
        lr_scale: float,
    ) -> None:  # fmt: skip
        """Steps of ``per_step`` micro-batches of ``micro`` examples of ``stream`` each, at the
        optimizer's rates × ``lr_scale`` (gradients averaged over the ranks)."""
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * lr_scale
        params = [p for p in self.module.parameters() if p.requires_grad]
        chunks = stream.split(micro)
        self.module.train()
        for start in range(0, len(chunks) - per_step + 1, per_step):
            for p in params:
                p.grad = None
            for chunk in chunks[start : start + per_step]:
                (self._loss(chunk) / per_step).backward()
            if self.world > 1:
                self._average(params)
            self._clip(params)
            optimizer.step()

    def _average(self, params: list[torch.nn.Parameter]) -> None:
        """DDP's mean gradient; a gradient missing on some ranks only (a layer one rank did
        not use) counts as zeros there, so every rank issues the same all-reduces."""
        device = self.trainer.strategy.root_device
        present = torch.tensor([int(p.grad is not None) for p in params], device=device)
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX)
        for p, used in zip(params, present.tolist(), strict=True):
            if not used:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(self.world)

    def _clip(self, params: list[torch.nn.Parameter]) -> None:
        value = self.trainer.gradient_clip_val
        if not value:
            return
        if self.trainer.gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, float(value))
        else:
            torch.nn.utils.clip_grad_norm_(params, float(value))

    def evaluate(self, held: Tensor, micro: int) -> list[float]:
        """The mean loss on each held-back batch of ``micro`` examples (eval mode, no grad);
        the ranks share the batches and all-reduce the losses."""
        batches = held.split(micro)
        losses = torch.zeros(len(batches), dtype=torch.float64)
        self.module.eval()
        with torch.no_grad():
            for j in range(self.rank, len(batches), self.world):
                losses[j] = float(self._loss(batches[j]).detach().double())
        if self.world > 1:
            device = self.trainer.strategy.root_device
            pooled = losses.to(device)
            torch.distributed.all_reduce(pooled)
            losses = pooled.cpu()
        return [float(v) for v in losses]


def run_branches(
    runner: Runner,
    snapshot: Snapshot,
    draws: Draws,
    step: int,
    factors: Sequence[int],
    micro: int,
    accumulate: int,
    examples: int,
    scales: dict[int, float],
    repeats: int = 1,
) -> dict[int, list[list[float]]]:
    """Every branch from ``snapshot`` (restored before each one and after the last): in each
    of ``repeats`` data orders, branch k trains on the same ``examples`` examples (all ranks)
    at k·B, then is scored per held-back batch. Returns ``{k: [[loss per evaluation batch]
    per data order]}``."""
    per_rank = examples // runner.world
    out: dict[int, list[list[float]]] = {k: [] for k in factors}
    try:
        for repeat in range(repeats):
            stream = draws.stream(step, runner.rank, per_rank, repeat)
            for k in factors:
                runner.train(snapshot.optimizer, stream, micro, k * accumulate, scales[k])
                out[k].append(runner.evaluate(draws.held, draws.eval_micro))
                snapshot.restore()
    finally:
        snapshot.restore()
    return out
