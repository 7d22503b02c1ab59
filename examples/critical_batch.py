"""Does B_simple predict the critical batch size, and does growing the batch pay? (CPU)

For each task (scikit-learn's digits with an MLP; a character-level language model on the
dataset descriptions that ship with scikit-learn; a student MLP trained to near the noise
floor of a random teacher's noisy labels, where B_noise grows 6–13×; ``held-out``: another
teacher; ``digits-relu``, ``charlm-4``, ``teacher-2``: added after the defaults were chosen,
as a check), and each batch size B of a sweep, the
learning rate is tuned on a small grid (Adam) and the optimizer steps S to a fixed training
loss are recorded (E = B·S examples). The paper's Pareto law S/S_min − 1 = (E/E_min − 1)⁻¹,
i.e. S(B) = S_min + E_min/B (McCandlish et al. 2018, eq. 2.11), is fitted to the best run
per B, giving B_crit = E_min/S_min. Every run also carries the callback, which measures the
plain, Adam-preconditioned and normalization-layer noise scales; their averages over the
runs are compared with B_crit. Finally :class:`~lightning_gns.adaptive.AdaptiveBatchSize`
starts at the smallest batch and is compared with every fixed batch: steps, examples and
wall time to the same loss, as are the field's open-loop schedules (a linear ramp, Seesaw).

Quick setting, 3 data orders, the default rule from B = 8 against the fixed batch with the
fewest examples (``--quick --seeds 3 --rules sqrt --tasks
digits,charlm,teacher,held-out,digits-relu,charlm-4,teacher-2``): the goal is met on all but
``digits-relu`` (dominated by a fixed B = 32), and the linear ramp takes fewer steps on the
teacher tasks and ``charlm-4`` (figures: docs/adaptive.md).

    python examples/critical_batch.py            # the three tasks (two: under an hour on 2 cores)
    python examples/critical_batch.py --quick    # a small setting (the test suite runs it)

Writes ``table.md``, ``results.json``, ``pareto.png`` and ``adaptive.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_gns import GradientNoiseScale
from lightning_gns.adaptive import AdaptiveBatchSize
from lightning_gns.adaptive.sampler import ResizableBatchSampler
from lightning_gns.estimator import GNSValues
from lightning_gns.probe import branches

# -- tasks --------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    data: TensorDataset
    model: nn.Module  # initial weights (copied for every run)
    target: float  # training loss to reach
    base_lr: float  # Adam LR at B = 32; the grid is around base_lr·√(B/32)
    max_steps: int
    seeds: int = 1  # data orders per (B, LR): steps to the target are averaged
    branch_loss: float = math.nan  # the branched measurement starts from this loss


def digits_task(quick: bool) -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.Tanh(), nn.Linear(128, 10))
    data = TensorDataset(x, torch.tensor(d.target))
    target, steps, seeds = (0.05, 800, 1) if quick else (0.02, 4000, 3)
    return Task("digits", data, model, target, 3e-3, steps, seeds, branch_loss=0.3)


def charlm_text() -> str:
    """The dataset descriptions shipped with scikit-learn (~80 kB of English text)."""
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    return "\n".join(p.read_text() for p in sorted(descr.glob("*.rst")))


class CharMLP(nn.Module):
    """A Bengio-style character model: the last ``context`` characters → the next one."""

    def __init__(self, vocab: int, context: int = 8, dim: int = 24, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.net = nn.Sequential(
            nn.Linear(context * dim, hidden), nn.LayerNorm(hidden), nn.Tanh(),
            nn.Linear(hidden, vocab),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.embed(x).flatten(1))


def charlm_task(quick: bool, context: int = 8) -> Task:
    text = charlm_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    windows = ids.unfold(0, context + 1, 1)
    torch.manual_seed(0)
    model = CharMLP(len(chars), context)
    data = TensorDataset(windows[:, :-1].contiguous(), windows[:, -1].contiguous())
    target, steps, seeds = (2.2, 800, 1) if quick else (2.3, 8000, 3)
    return Task("charlm", data, model, target, 3e-3, steps, seeds, branch_loss=2.8)


def teacher_task(
    quick: bool, dim: int = 16, classes: int = 8, seed: int = 0, width: int = 64,
    name: str = "teacher",
) -> Task:  # fmt: skip
    """A student MLP learns a random teacher MLP's class probabilities from labels drawn from
    them (label noise: the Bayes loss, the teacher's mean entropy, is the floor). Trained to
    near that floor the mean gradient vanishes while the per-example noise stays, so B_noise
    grows 6–13× over a run (quick setting, B = 32: 12–13× at the rate 3e-3, 6× at 6e-3): the
    regime where growing the batch should pay (McCandlish et al. 2018 §5). ``seed``, ``dim``,
    ``classes``, ``width``: another teacher (:func:`held_out_task`)."""
    gen = torch.Generator().manual_seed(seed)
    n = 8_192 if quick else 32_768
    x = torch.randn(n, dim, generator=gen)
    teacher = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, classes))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / math.sqrt(p.shape[-1])))
        probs = torch.softmax(2.0 * teacher(x), dim=1)
    y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    floor = float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean())
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(dim, 128), nn.LayerNorm(128), nn.Tanh(), nn.Linear(128, classes)
    )
    data = TensorDataset(x, y)
    margin, steps, seeds = (0.08, 1500, 1) if quick else (0.03, 8000, 3)
    task = Task(name, data, model, floor + margin, 3e-3, steps, seeds)
    task.branch_loss = floor + 0.3
    return task


def held_out_task(quick: bool) -> Task:
    """A task of the teacher's kind that no rule was tuned on: another teacher (seed 1, 24
    inputs, 10 classes, 96 hidden units), the same student and margins."""
    return teacher_task(quick, dim=24, classes=10, seed=1, width=96, name="held-out")


def digits_relu_task(quick: bool) -> Task:
    """Held out (added after the defaults were chosen): the digits with another network, two
    ReLU layers of 256 (a LayerNorm after the first, for the norm-layer column)."""
    task = digits_task(quick)
    torch.manual_seed(1)
    task.model = nn.Sequential(
        nn.Linear(64, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip
    task.name = "digits-relu"
    return task


def charlm4_task(quick: bool) -> Task:
    """Held out (added after the defaults were chosen): the character model with 4 characters
    of context, trained to 2.4 nats (quick) or 2.45."""
    task = charlm_task(quick, context=4)
    task.name, task.target = "charlm-4", 2.4 if quick else 2.45
    return task


def teacher2_task(quick: bool) -> Task:
    """Held out (added after the defaults were chosen): a third teacher (seed 2, 32 inputs,
    6 classes, 48 hidden units)."""
    return teacher_task(quick, dim=32, classes=6, seed=2, width=48, name="teacher-2")


TASKS = {"digits": digits_task, "charlm": charlm_task, "teacher": teacher_task,
         "held-out": held_out_task, "digits-relu": digits_relu_task, "charlm-4": charlm4_task,
         "teacher-2": teacher2_task}  # fmt: skip


# -- one training run ---------------------------------------------------------------------


class Net(pl.LightningModule):
    def __init__(
        self, task: Task, lr: float, micro: int, seed: int, resizable: bool = False
    ) -> None:
        super().__init__()
        self.model = copy.deepcopy(task.model)
        self.task, self.lr, self.micro, self.seed = task, lr, micro, seed
        self.resizable = resizable  # draw with a ResizableBatchSampler (the micro-batch grows)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        n = self.micro * 100_000  # with replacement: as many batches as any run needs
        sampler = RandomSampler(self.task.data, replacement=True, num_samples=n, generator=gen)
        if self.resizable:
            batches = ResizableBatchSampler(sampler, self.micro)
            return DataLoader(self.task.data, batch_sampler=batches)
        return DataLoader(self.task.data, batch_size=self.micro, sampler=sampler)


@dataclass
class Run:
    task: str
    batch: int
    lr: float
    steps: float = math.inf  # optimizer steps to the target (inf: not reached)
    examples: float = math.inf
    seconds: float = math.inf
    # (|G|², tr(Σ)) at each read-out until the target: plain, preconditioned, norm layers
    b_simple: list[tuple[float, float]] = field(default_factory=list)
    preconditioned: list[tuple[float, float]] = field(default_factory=list)
    norm: list[tuple[float, float]] = field(default_factory=list)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # step, examples, loss
    adaptive: list[dict[str, Any]] = field(default_factory=list)
    edge: bool = False  # the sweep's best rate for this B is still an end of the rates tried


class ToTarget(pl.Callback):
    """Evaluates the training loss on a fixed subset after every optimizer step up to 50, then
    whenever the examples since the last evaluation reach 1% of those so far (so the crossing
    is placed within 1% of the examples, and of the steps, whatever the batch); stops at the
    target; keeps the noise-scale read-outs (the raw ratio, known or not)."""

    def __init__(self, run: Run, task: Task, gns: list[GradientNoiseScale]) -> None:
        self.run, self.task, self.gns = run, task, gns
        gen = torch.Generator().manual_seed(1)
        n = len(task.data)
        self.idx = torch.randperm(n, generator=gen)[: min(n, 4096)]
        self.examples = self.reads = 0
        self.start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.examples += len(batch[1])
        plain, norm = self.gns
        if plain.reads > self.reads:  # a new read-out of the three noise scales
            self.reads = plain.reads
            self.run.b_simple.append(_moments(plain.values))
            self.run.norm.append(_moments(norm.values))
            if plain.preconditioned:
                self.run.preconditioned.append(_moments(plain.preconditioned_values))
        step = trainer.global_step
        last = self.run.curve[-1] if self.run.curve else (0, 0, math.nan)
        due = step <= 50 or self.examples - last[1] >= 0.01 * self.examples
        if not due or step == 0 or last[0] == step:
            return
        x, y = self.task.data[self.idx]
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(pl_module.model(x), y))
        self.run.curve.append((step, self.examples, loss))
        if loss <= self.task.target:
            self.run.steps, self.run.examples = step, self.examples
            self.run.seconds = time.perf_counter() - self.start
            trainer.should_stop = True


def train(
    task: Task,
    batch: int,
    lr: float,
    seed: int = 0,
    adaptive: AdaptiveBatchSize | None = None,
    max_steps: int | None = None,
    read_every: int = 10,
    resizable: bool = False,
    micro_only: bool = False,
    schedule: OpenLoop | None = None,
) -> Run:
    """One run at batch B (2 micro-batches of B/2, so the preconditioned scale is measured),
    or, with ``adaptive``, from micro-batches of B that grow (``resizable``: the micro-batch
    first, with a ResizableBatchSampler; else by accumulation). ``micro_only``: one
    micro-batch of B per step, no preconditioned scale (wall-time comparisons)."""
    run = Run(task.name, batch, lr)
    single = adaptive is not None or micro_only
    micro, acc = (batch, 1) if single else (batch // 2, 2)
    gns = GradientNoiseScale(log_every_n_steps=read_every, preconditioned=not single)
    norm = GradientNoiseScale(log_every_n_steps=read_every, layers="norm", source="per_example")
    cbs: list[pl.Callback] = [gns, norm, ToTarget(run, task, [gns, norm])]
    if adaptive is not None:
        cbs.append(adaptive)
    if schedule is not None:
        cbs.append(schedule)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps or task.max_steps,
        accumulate_grad_batches=acc, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=cbs,
    )  # fmt: skip
    trainer.fit(Net(task, lr, micro, seed, resizable))
    if adaptive is not None:
        run.adaptive = [asdict(c) for c in adaptive.changes]
    if schedule is not None:
        run.adaptive = schedule.changes
    return run


class OpenLoop(pl.Callback):
    """A batch schedule fixed in advance, measuring nothing: ``at(step)`` gives the batch
    (one micro-batch, drawn by the run's ResizableBatchSampler) and the learning rate of each
    optimizer step. The field's schedules (:func:`linear_ramp`, :func:`seesaw`)."""

    def __init__(self, at: Any) -> None:
        self.at = at
        self.changes: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        batch_size, lr = self.at(step)
        for g in trainer.optimizers[0].param_groups:
            g["lr"] = lr
        sampler = trainer.train_dataloader.batch_sampler
        following = self.at(step + 1)[0]
        if following != sampler.batch_size:  # the next batch is drawn at the next size
            sampler.resize(following, batch_idx + 1)
            self.changes.append({"step": step + 1, "batch_size": following, "lr": lr})


def linear_ramp(b0: int, b_max: int, lr0: float, ramp: float) -> Any:
    """Megatron's ``rampup_batch_size`` (and nanoGNS's ramp): from ``b0`` to ``b_max`` in
    increments of ``b0``, linearly over ``ramp`` examples; Adam's rate lr0·√(B/b0)."""
    seen = [0.0, 0.0]  # (step, examples so far)

    def at(step: int) -> tuple[int, float]:
        frac = min(1.0, seen[1] / ramp) if ramp > 0 else 1.0
        b = min(b_max, b0 * (1 + round(frac * (b_max / b0 - 1))))
        if step > seen[0]:
            seen[0], seen[1] = step, seen[1] + b
        return b, lr0 * math.sqrt(b / b0)

    return at


def seesaw(b0: int, b_max: int, lr0: float, period: int) -> Any:
    """Seesaw (2025): where a step schedule would halve the rate every ``period`` steps, the
    batch doubles and the rate is divided by √2 instead (halved once the batch is b_max)."""

    def at(step: int) -> tuple[int, float]:
        k = step // period
        doublings = min(k, int(math.log2(b_max // b0)))
        return b0 * 2**doublings, lr0 / math.sqrt(2) ** doublings / 2 ** (k - doublings)

    return at


def open_loop_runs(task: Task, name: str, b0: int, lr: float, b_max: int, base: Run) -> dict:
    """An open-loop schedule from ``b0`` at its tuned rate, sized by a fixed run (``base``,
    the smallest batch that reached the target): the ramp reaches ``b_max`` after the
    examples that run needed; Seesaw's period spreads its doublings over that run's steps.
    Over ``task.seeds`` data orders."""
    runs = []
    for seed in range(task.seeds):
        if name == "linear ramp":
            at = linear_ramp(b0, b_max, lr, base.examples)
        else:
            at = seesaw(b0, b_max, lr, max(1, int(base.steps / (1 + math.log2(b_max / b0)))))
        runs.append(train(task, b0, lr, seed, micro_only=True, resizable=True,
                          schedule=OpenLoop(at)))  # fmt: skip
    out = asdict(runs[0])
    for attr in ("steps", "examples", "seconds"):
        out[attr] = statistics.fmean(getattr(r, attr) for r in runs)
        out[f"per_seed_{attr}"] = [getattr(r, attr) for r in runs]
    return out


def branched(
    task: Task, b0: int, lr0: float, ks: list[int], budget: int, tol: float = 0.01, seed: int = 0,
    one_stream: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Merrill et al. 2025's branched measurement (plain PyTorch, Adam): train at ``b0`` to
    ``task.branch_loss``; from that model and optimizer state train at k·b0 with √k·lr0 for
    ``budget`` examples each; B_crit ≈ b0 × the largest k whose loss stays within ``tol``
    (relative) of k = 1's (:func:`lightning_gns.probe.branches.b_crit`; inside a Lightning
    run, :class:`~lightning_gns.CriticalBatchProbe` does the same and restores the run).
    ``seed``: the data order (the trunk's and the branches', one stream). ``one_stream``: every
    branch draws the same examples, as the probe's branches do (else each continues the stream)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = task.data.tensors
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:4096]

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x[idx]), y[idx]))

    def step(model: nn.Module, opt: torch.optim.Optimizer, b: int) -> None:
        i = torch.randint(0, len(x), (b,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()

    model = copy.deepcopy(task.model)
    opt = torch.optim.Adam(model.parameters(), lr=lr0)
    steps = 0
    while loss(model) > task.branch_loss and steps < task.max_steps:
        for _ in range(5):
            step(model, opt, b0)
        steps += 5
    losses, start = {}, gen.get_state()
    for k in ks:
        if one_stream:
            gen.set_state(start)
        branch = copy.deepcopy(model)
        o = torch.optim.Adam(branch.parameters(), lr=lr0)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
        for g in o.param_groups:
            g["lr"] = lr0 * math.sqrt(k)
        for _ in range(max(1, budget // (k * b0))):
            step(branch, o, k * b0)
        losses[k] = loss(branch)
    b_crit = branches.b_crit(losses, b0, tol)  # the decision CriticalBatchProbe makes
    return {
        "b0": b0,
        "branch_step": steps,
        "budget": budget,
        "tol": tol,
        "losses": losses,
        "b_crit": int(b_crit) if math.isfinite(b_crit) else b_crit,
    }


# -- the sweep, the fit, the comparison ---------------------------------------------------


def sweep(
    task: Task, batches: list[int], grid: list[float], log: Any, extend: int = 0
) -> dict[int, Run]:
    """The best run (fewest steps to the target, averaged over ``task.seeds`` data orders)
    per batch size over the LR grid; the first seed's run keeps its curve and read-outs.

    A run is stopped once its steps alone make its configuration's mean worse than the best
    so far for this B (it could not be chosen); the grid is tried from its middle outwards.
    A rate is tuned only when the best one is inside the rates tried: while the best sits at
    an end of them, the next rate beyond it (a factor 2) is tried too, up to ``extend`` more
    per batch."""
    best: dict[int, Run] = {}
    order = sorted(grid, key=lambda g: abs(math.log(g)))
    for b in batches:
        tried: dict[float, float] = {}  # factor -> mean steps (inf: not chosen)
        queue = list(order)
        while queue:
            g = queue.pop(0)
            tried[g] = _try_rate(task, b, g, best, log)
            if queue or len(tried) >= len(grid) + extend:
                continue
            g_best = min(tried, key=lambda k: tried[k])
            if not math.isfinite(tried[g_best]):
                break
            if g_best == min(tried):
                queue.append(g_best / 2)
            elif g_best == max(tried):
                queue.append(g_best * 2)
        best.setdefault(b, Run(task.name, b, math.nan))
        g_best = min(tried, key=lambda k: tried[k])  # best[b]'s factor (the first of ties)
        best[b].edge = math.isfinite(tried[g_best]) and g_best in (min(tried), max(tried))
    return best


def _try_rate(task: Task, b: int, g: float, best: dict[int, Run], log: Any) -> float:
    """Batch ``b`` at ``g`` × the √-scaled base rate over the data orders; ``best[b]`` is
    replaced when it takes fewer steps. Its mean steps (inf: stopped, or never reached)."""
    lr = task.base_lr * g * math.sqrt(b / 32)
    runs: list[Run] = []
    for seed in range(task.seeds):
        budget = task.max_steps
        if b in best and math.isfinite(best[b].steps):
            spent = sum(r.steps for r in runs)
            budget = min(budget, math.floor(task.seeds * best[b].steps - spent))
        if budget < 1:
            runs.append(Run(task.name, b, lr))
            break
        runs.append(train(task, b, lr, seed, max_steps=budget))
        if not math.isfinite(runs[-1].steps):
            break
    log(f"{task.name} B={b:5d} lr={lr:.2e}: steps {[r.steps for r in runs]}")
    if len(runs) < task.seeds:
        return math.inf
    run = runs[0]
    for attr in ("steps", "examples", "seconds"):
        setattr(run, attr, statistics.fmean(getattr(r, attr) for r in runs))
    if b not in best or run.steps < best[b].steps:
        best[b] = run
    return run.steps


RULES = ("lower_bound", "sqrt", "goodput")


def adaptive_runs(
    task: Task, rule: str, b0: int, lr: float, b_max: int, **kwargs: Any
) -> dict[str, Any]:
    """AdaptiveBatchSize from B = b0 at the LR tuned for b0 (Adam: √ scaling) up to b_max
    (micro-batches up to b_max), default arguments otherwise, over ``task.seeds`` data orders:
    the mean steps, examples and seconds; curves and changes of the first."""
    runs = []
    for seed in range(task.seeds):
        ada = AdaptiveBatchSize(b_max // b0, rule=rule, max_micro_batch=b_max, **kwargs)  # type: ignore[arg-type]
        runs.append(train(task, b0, lr, seed, adaptive=ada, resizable=True))
    out = asdict(runs[0])
    for attr in ("steps", "examples", "seconds"):
        out[attr] = statistics.fmean(getattr(r, attr) for r in runs)
        out[f"per_seed_{attr}"] = [getattr(r, attr) for r in runs]
    out["per_seed_changes"] = [r.adaptive for r in runs]
    return out


def fit_pareto(batches: list[int], steps: list[float]) -> tuple[float, float]:
    """S(B) = S_min + E_min/B (eq. 2.11), least squares on log S; returns (S_min, E_min)."""
    from scipy.optimize import least_squares

    b, s = np.asarray(batches, float), np.asarray(steps, float)

    def resid(p: np.ndarray) -> np.ndarray:
        return np.log(np.exp(p[0]) + np.exp(p[1]) / b) - np.log(s)

    start = np.log([max(s.min() / 2, 1.0), max(s.max() * b.min() / 2, 1.0)])
    p = least_squares(resid, start).x
    return float(np.exp(p[0])), float(np.exp(p[1]))


def _moments(v: GNSValues) -> tuple[float, float]:
    return (v.grad_norm_sq, v.grad_variance)


def over_run(reads: list[tuple[float, float]]) -> float:
    """B_simple over a run as the paper averages it: mean tr(Σ) / mean |G|² (App. A)."""
    reads = [(g, t) for g, t in reads if math.isfinite(g) and math.isfinite(t)]
    if not reads:
        return math.nan
    g = statistics.fmean(x for x, _ in reads)
    return statistics.fmean(t for _, t in reads) / g if g > 0 else math.nan


def _gmean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x) and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else math.nan


def summarise(task: Task, best: dict[int, Run]) -> dict[str, Any]:
    reached = {b: r for b, r in best.items() if math.isfinite(r.steps)}
    s_min, e_min = fit_pareto(list(reached), [r.steps for r in reached.values()])
    return {
        "task": task.name,
        "target_loss": task.target,
        "seeds": task.seeds,
        "s_min": s_min,
        "e_min": e_min,
        "b_crit": e_min / s_min,
        # the paper's comparison: B_simple averaged over training (mean tr(Σ)/mean |G|² over
        # each best run's read-outs; geometric mean over the runs), and at the target
        "b_simple": _gmean([over_run(r.b_simple) for r in reached.values()]),
        "b_simple_at_target": _gmean([over_run(r.b_simple[-1:]) for r in reached.values()]),
        "preconditioned": _gmean([over_run(r.preconditioned) for r in reached.values()]),
        "norm": _gmean([over_run(r.norm) for r in reached.values()]),
        # over the smallest batch's run that has read-outs (a run that reached the target
        # first: it ran to near the floor)
        "b_noise_growth": _gmean([growth(r) for r in _growth_run(best)]),
        "runs": {b: asdict(r) for b, r in best.items()},
    }


def _growth_run(best: dict[int, Run]) -> list[Run]:
    ordered = [best[b] for b in sorted(best) if len(best[b].b_simple) >= 6]
    reached = [r for r in ordered if math.isfinite(r.steps)]
    return (reached or ordered)[:1]


def growth(run: Run, reads: int = 3) -> float:
    """How much B_noise grew over a run, as the callback measured it: B_simple of its last
    ``reads`` read-outs over that of its first ``reads`` (:func:`over_run` on each)."""
    if len(run.b_simple) < 2 * reads:
        return math.nan
    return over_run(run.b_simple[-reads:]) / over_run(run.b_simple[:reads])


def run_task(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One task: the fixed-batch sweep (or an earlier one, ``--reuse``), the adaptive rules,
    the branched measurement (one thread)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    batches = [8, 32, 128, 512] if args.quick else [8, 16, 32, 64, 128, 256, 512, 1024]
    grid = [0.5, 2.0] if args.quick else [0.5, 1.0, 2.0]  # × the LR tuned at B = 32, √-scaled

    def log(msg: str) -> None:
        print(msg, flush=True)

    task = TASKS[name](args.quick)
    task.seeds = args.seeds or task.seeds
    reused = {r["task"]: r for r in json.loads(Path(args.reuse).read_text())} if args.reuse else {}
    if name in reused:  # the fixed-batch sweep of an earlier run
        summary = {k: v for k, v in reused[name].items() if k not in ("adaptive",)}
        best = {int(b): Run(**r) for b, r in summary["runs"].items()}
    else:
        best = sweep(task, batches, grid, log, extend=args.extend)
        summary = summarise(task, best)
    b0 = batches[0]
    summary["adaptive"] = {}
    # sized by the smallest fixed batch that reached the target; its rate (√-scaled) stands
    # in for b0's when no rate of the grid took b0 there
    base = next((best[b] for b in batches if b in best and math.isfinite(best[b].steps)), None)
    lr0 = best[b0].lr
    if not math.isfinite(best[b0].steps) and base is not None:
        lr0 = base.lr * math.sqrt(b0 / base.batch)
    for rule in [r for r in args.rules.split(",") if r]:
        asked = {k: getattr(args, k) for k in ("multiple", "probe")}
        kwargs = {k: v for k, v in asked.items() if v is not None}
        key = " ".join([rule, *(f"{k}={v:g}" for k, v in kwargs.items())])
        a = adaptive_runs(task, rule, b0, lr0, batches[-1], **kwargs)
        summary["adaptive"][key] = a
        log(f"{name}: adaptive ({rule}): steps {a['per_seed_steps']}, mean {a['steps']:.0f}, "
            f"examples {a['examples']:.0f}")  # fmt: skip
    if base is not None and not args.no_open_loop:
        for schedule in ("linear ramp", "Seesaw"):
            a = open_loop_runs(task, schedule, b0, lr0, batches[-1], base)
            summary["adaptive"][f"open loop: {schedule}"] = a
            log(f"{name}: {schedule}: steps {a['per_seed_steps']}, examples {a['examples']:.0f}")
    if "branched" not in summary:
        ks = [1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16, 32]
        lr32 = best[32].lr  # B = 32's tuned rate; √-scaled from the smallest reaching batch
        if not math.isfinite(best[32].steps) and base is not None:  # when none took B = 32 there
            lr32 = base.lr * math.sqrt(32 / base.batch)
        summary["branched"] = branched(task, 32, lr32, ks, budget=8 * 32 * ks[-1])
    log(f"{name}: B_crit {summary['b_crit']:.0f} (branched {summary['branched']['b_crit']}),"
        f" B_simple {summary['b_simple']:.0f}, B_noise grows "
        f"{summary.get('b_noise_growth', math.nan):.1f}× over a fixed run")  # fmt: skip
    out = Path(args.out) / f"{name}.json"  # each task on its own too: a later failure keeps it
    out.write_text(json.dumps([summary], indent=1, default=str))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small setting (a minute)")
    parser.add_argument("--out", default="results/critical_batch")
    parser.add_argument("--tasks", default="digits,charlm,teacher",
                        help=f"of {','.join(TASKS)}")  # fmt: skip
    parser.add_argument("--from-json", action="store_true", help="redraw from results.json")
    parser.add_argument("--rules", default=",".join(RULES), help="adaptive rules to run")
    parser.add_argument("--reuse", help="take the fixed-batch sweep from this results.json")
    parser.add_argument("--multiple", type=float, help="AdaptiveBatchSize(multiple=...)")
    parser.add_argument("--probe", type=int, help="AdaptiveBatchSize(probe=...)")
    parser.add_argument("--no-open-loop", action="store_true", help="no open-loop schedules")
    parser.add_argument("--seeds", type=int, help="data orders (default: 3, --quick: 1)")
    parser.add_argument("--extend", type=int, default=0,
                        help="rates tried beyond the grid per batch while the best is at an "
                        "end of it (0: the grid only)")  # fmt: skip
    args = parser.parse_args()
    if args.from_json:
        results = json.loads((Path(args.out) / "results.json").read_text())
        (Path(args.out) / "table.md").write_text(table(results))
        plot(results, Path(args.out))
        print(table(results))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.tasks.split(",")
    if len(names) > 1 and (os.cpu_count() or 1) > 1:  # one process per task, side by side
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(len(names), os.cpu_count() or 1)) as pool:
            results = pool.starmap(run_task, [(name, args) for name in names])
    else:
        results = [run_task(name, args) for name in names]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(table(results))
    plot(results, out)
    print(table(results))


def verdict(r: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    """The issue's test for one adaptive rule: no fixed batch reaches the target with both
    fewer steps and fewer examples (on the Pareto front), and against the fixed batch with the
    fewest examples at least 30% fewer steps with at most 1.15× its examples."""
    fixed = {int(b): v for b, v in r["runs"].items() if math.isfinite(v["steps"])}
    if not fixed or not math.isfinite(a["steps"]):
        return {"dominated_by": [], "frugal": None, "fewer_steps": math.nan,
                "examples_ratio": math.nan, "front": False, "goal": False}  # fmt: skip
    dominated = [
        b for b, v in fixed.items() if v["steps"] < a["steps"] and v["examples"] < a["examples"]
    ]
    frugal = min(fixed, key=lambda b: fixed[b]["examples"])
    fewer = 1 - a["steps"] / fixed[frugal]["steps"]
    ratio = a["examples"] / fixed[frugal]["examples"]
    return {"dominated_by": sorted(dominated), "frugal": frugal, "fewer_steps": fewer,
            "examples_ratio": ratio, "front": not dominated,
            "goal": not dominated and fewer >= 0.30 and ratio <= 1.15}  # fmt: skip


def verdict_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| task | rule | on the Pareto front | dominated by fixed B | fewest-examples fixed B "
        "| steps saved vs it | examples vs it | goal (≥ 30% fewer steps, ≤ 1.15× examples) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for rule, a in r["adaptive"].items():
            v = verdict(r, a)
            lines.append(
                f"| {r['task']} | {rule} | {'yes' if v['front'] else 'no'} | "
                f"{', '.join(map(str, v['dominated_by'])) or '-'} | {v['frugal']} | "
                f"{v['fewer_steps']:.0%} | {v['examples_ratio']:.2f}× | "
                f"{'met' if v['goal'] else 'missed'} |"
            )
    return lines


def table(results: list[dict[str, Any]]) -> str:
    lines = (
        verdict_table(results)
        + [""]
        + [
            "| task | target loss | B_crit (fit) | B_simple (over runs) | at target "
            "| preconditioned | norm layers | B_simple / B_crit | B_crit (branched) "
            "| B_noise growth (fixed run) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    )
    for r in results:
        lines.append(
            f"| {r['task']} | {r['target_loss']} | {r['b_crit']:.0f} | {r['b_simple']:.0f} | "
            f"{r['b_simple_at_target']:.0f} | {r['preconditioned']:.0f} | {r['norm']:.0f} | "
            f"{r['b_simple'] / r['b_crit']:.2f} | {r['branched']['b_crit']} | "
            f"{r.get('b_noise_growth', math.nan):.1f}× |"
        )
    lines += [
        "",
        "| task | branched: batch (lr × √k) | loss after the same examples |",
        "|---|---|---|",
    ]
    for r in results:
        br = r["branched"]
        for k, value in br["losses"].items():
            lines.append(f"| {r['task']} | {br['b0'] * int(k)} | {value:.4f} |")
    lines += [
        "",
        "| task | schedule | steps | examples | seconds | B_simple (run) | preconditioned (run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for b, run in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {r['task']} | fixed B={b} (lr {run['lr']:.1e}"
                f"{', an end of the rates tried' if run.get('edge') else ''}) | "
                f"{run['steps']:.0f} | "
                f"{run['examples']:.0f} | {run['seconds']:.1f} | {over_run(run['b_simple']):.0f} | "
                f"{over_run(run['preconditioned']):.0f} |"
            )
        for rule, a in r["adaptive"].items():
            sizes = [str(int(c["batch_size"])) for c in a["adaptive"]]
            grown = " → ".join(sizes)
            if len(sizes) > 8:  # a ramp: its ends
                grown = f"{sizes[0]} → … → {sizes[-1]}, {len(sizes)} changes"
            lines.append(
                f"| {r['task']} | {'' if rule.startswith('open') else 'adaptive '}({rule}) "
                f"from B={a['batch']} "
                f"({grown or 'no change'}) | {a['steps']:.0f} | {a['examples']:.0f} | "
                f"{a['seconds']:.1f} "
                f"| {over_run(a['b_simple']):.0f} | |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        runs = {int(b): v for b, v in r["runs"].items() if math.isfinite(v["steps"])}
        bs = np.array(sorted(runs))
        ax.loglog(
            [runs[b]["examples"] for b in bs],
            [runs[b]["steps"] for b in bs],
            "o",
            label="best run per B",
        )
        grid = np.geomspace(bs.min() / 2, bs.max() * 2, 100)
        ax.loglog(
            r["e_min"] * (1 + grid / r["b_crit"]),
            r["s_min"] * (1 + r["b_crit"] / grid),
            "-",
            label=f"fit: B_crit = {r['b_crit']:.0f}",
        )
        for (rule, a), mark in zip(r["adaptive"].items(), "*PX", strict=False):
            if math.isfinite(a["steps"]):
                ax.loglog([a["examples"]], [a["steps"]], mark, ms=12, label=f"adaptive ({rule})")
        ax.set(
            xlabel="examples to target",
            ylabel="steps to target",
            title=f"{r['task']}: B_simple ≈ {r['b_simple']:.0f}",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for b, run in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
            c = np.array(run["curve"])
            if len(c):
                ax.semilogx(c[:, 1], c[:, 2], lw=1, alpha=0.7, label=f"B={b}")
        for (rule, a), style in zip(r["adaptive"].items(), ("k-", "k--", "k:"), strict=False):
            c = np.array(a["curve"])
            if len(c):
                ax.semilogx(c[:, 1], c[:, 2], style, lw=2.2, label=f"adaptive ({rule})")
        ax.axhline(r["target_loss"], color="grey", ls=":")
        ax.set(xlabel="examples", ylabel="training loss", title=r["task"])
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "adaptive.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
