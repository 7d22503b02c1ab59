"""Step-time overhead of the ``GradientNoiseScale`` callback, measured side by side.

Each setting is trained with and without the callback in short ``Trainer.fit`` runs that are
interleaved (baseline, setting 1, setting 2, ..., then rotated: setting 1, setting 2, ...,
baseline, ...) so that drifts in
machine load hit both alike. A timing callback records ``time.perf_counter()`` (``--clock cpu``:
the training thread's CPU time, for a shared machine) at the first
``on_train_batch_start`` and the last ``on_train_batch_end`` of each optimizer step (it is the
first callback at batch start and the last at batch end, so the GNS callback's own hooks are
inside the window; on CUDA it synchronizes first). Warm-up steps, which include the
per-example source's one-time structural check, are dropped. The table reports the median
per-optimizer-step time without and with the callback and their ratio, plus the spread of the
ratio between repeats.

    python benchmarks/overhead.py                     # CPU, defaults (a few minutes)
    python benchmarks/overhead.py --device cuda --precision 16-mixed
    python benchmarks/overhead.py --compile           # torch.compile'd model, with and without
    python benchmarks/overhead.py --device cuda --preset realistic   # GPT-2 small, ViT-B/16

On CUDA the table also gives each setting's peak memory (``torch.cuda.max_memory_allocated``
over a fit, median over repeats) as a ratio to the baseline's.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import (
    describe_device,
    digits,
    markdown_table,
    median,
    mlp,
    quiet,
    set_threads,
    sync,
)
from lightning.pytorch.callbacks import Callback
from tiny_gpt import GPTModule, char_dataset
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from lightning_gns import GradientNoiseScale

CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # this thread's CPU time: a process sharing the cores does not count (one thread, CPU)
    "cpu": time.thread_time,
}


class StepTimes:
    """Per-optimizer-step times, from two callbacks placed first and last in the list."""

    def __init__(self, accumulate: int, device: str, clock: str = "wall") -> None:
        self.accumulate = accumulate
        self.device = device
        self.clock = CLOCKS[clock]
        self.times: list[float] = []
        self._t0 = 0.0

    def callbacks(self) -> tuple[Callback, Callback]:
        """(start, end): put ``start`` first and ``end`` last in ``Trainer(callbacks=...)``."""
        owner = self

        class Start(Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                if args[-1] % owner.accumulate == 0:
                    sync(owner.device)
                    owner._t0 = owner.clock()

        class End(Callback):
            def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
                if (args[-1] + 1) % owner.accumulate == 0:
                    sync(owner.device)
                    owner.times.append(owner.clock() - owner._t0)

        return Start(), End()


class Classifier(pl.LightningModule):
    """Cross-entropy classifier around a plain model, SGD with momentum."""

    def __init__(self, model: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.model(x)
        return F.cross_entropy(getattr(out, "logits", out), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


@dataclass
class Workload:
    """A model factory, its data and batch size, and how many steps to time per fit."""

    name: str
    make_module: Callable[[], pl.LightningModule]
    data: Dataset
    batch_size: int
    steps: int
    norm_mode: bool = False  # also time layers="norm"


@dataclass
class Setting:
    """One row: the callback's arguments (None: baseline) and the accumulation."""

    label: str
    accumulate: int
    gns: dict[str, Any] | None
    times: list[float] = field(default_factory=list)
    repeat_medians: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)  # CUDA peak memory per fit (bytes)


def fit_once(
    work: Workload, setting: Setting, args: argparse.Namespace, seed: int, timed: bool = True
) -> tuple[list[float], float]:
    """One short fit; returns the per-optimizer-step times after warm-up and, on CUDA, the
    fit's peak allocated memory (NaN on CPU).

    Every fit back-propagates the same number of micro-batches: ``steps × accumulate`` (the
    ``--accumulate`` flag), so an accumulation-1 fit runs ``accumulate`` times more steps.
    """
    torch.manual_seed(seed)
    module = work.make_module()
    if args.compile:  # dynamo does not guard on hooks: drop graphs of the previous fit
        torch._dynamo.reset()
        module.model = torch.compile(module.model)
    per_step = args.accumulate // setting.accumulate
    steps = args.warmup + (work.steps * per_step if timed else 0)
    n = steps * setting.accumulate * work.batch_size
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        work.data,
        batch_size=work.batch_size,
        sampler=RandomSampler(work.data, replacement=True, num_samples=n, generator=gen),
        drop_last=True,
    )
    timer = StepTimes(setting.accumulate, args.device, args.clock)
    start, end = timer.callbacks()
    mid = [GradientNoiseScale(**setting.gns)] if setting.gns is not None else []
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=steps,
        accumulate_grad_batches=setting.accumulate,
        callbacks=[start, *mid, end],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, loader)
    peak = float(torch.cuda.max_memory_allocated()) if cuda else float("nan")
    if len(timer.times) != steps:
        raise RuntimeError(f"expected {steps} timed steps, got {len(timer.times)}")
    return timer.times[args.warmup :], peak


def settings_for(work: Workload, accumulate: int, sample: int | None) -> list[list[Setting]]:
    """Groups that share a baseline: accumulation k (micro-batch, per-example, norm, sampled
    per-example) and 1."""
    k = accumulate
    group_k = [
        Setting(f"baseline, acc {k}", k, None),
        Setting(f"micro_batch, acc {k}", k, {"source": "micro_batch"}),
        Setting(f"per_example, acc {k}", k, {"source": "per_example"}),
    ]
    if work.norm_mode:
        group_k.append(
            Setting(
                f"per_example layers=norm, acc {k}", k, {"source": "per_example", "layers": "norm"}
            )
        )
    if sample:
        group_k.append(
            Setting(
                f"per_example examples_per_batch={sample}, acc {k}",
                k,
                {"source": "per_example", "examples_per_batch": sample},
            )
        )
    group_1 = [
        Setting("baseline, acc 1", 1, None),
        Setting("per_example, acc 1", 1, {"source": "per_example"}),
    ]
    return [group_k, group_1]


def run_workload(work: Workload, args: argparse.Namespace) -> list[list[str]]:
    """Interleaved repeats of every group; returns the table rows for this workload."""
    rows: list[list[str]] = []
    for group in settings_for(work, args.accumulate, args.examples_per_batch):
        for setting in group:  # warm the process up (first-call costs), untimed
            fit_once(work, setting, args, seed=0, timed=False)
        for rep in range(args.repeats):
            shift = rep % len(group)  # rotate the order: no setting always runs right after another
            for setting in group[shift:] + group[:shift]:
                times, peak = fit_once(work, setting, args, seed=rep)
                setting.times += times
                setting.repeat_medians.append(median(times))
                setting.peaks.append(peak)
        base = group[0]
        t_base = median(base.times)
        for setting in group[1:]:
            t = median(setting.times)
            per_rep = [
                s / b for s, b in zip(setting.repeat_medians, base.repeat_medians, strict=True)
            ]
            mem = median(setting.peaks) / median(base.peaks)
            rows.append(
                [
                    work.name,
                    setting.label,
                    f"{1e3 * t_base:.2f}",
                    f"{1e3 * t:.2f}",
                    f"{t / t_base:.3f}",
                    f"{min(per_rep):.3f}–{max(per_rep):.3f}",
                    "—" if math.isnan(mem) else f"{mem:.3f}",
                ]
            )
    return rows


class ImageClassifier(Classifier):
    """A vision transformer: AdamW, as such models are trained."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def vit(args: argparse.Namespace) -> Workload | None:
    """Hugging Face ViT with random weights on random images (None without transformers)."""
    try:
        from transformers import ViTConfig, ViTForImageClassification
    except ImportError:
        return None
    size, patch, width, layers = args.vit_image, args.vit_patch, args.vit_width, args.vit_layers
    cfg = ViTConfig(
        image_size=size, patch_size=patch, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64), intermediate_size=4 * width, num_labels=100,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    n = 4 * args.vit_batch
    images = torch.randn(n, 3, size, size, generator=gen)
    labels = torch.randint(0, 100, (n,), generator=gen)
    tokens = (size // patch) ** 2 + 1
    return Workload(
        f"ViT (b={args.vit_batch}, {size}px/{patch}, T={tokens}, d={width}, L={layers})",
        lambda: ImageClassifier(ViTForImageClassification(cfg)),
        TensorDataset(images, labels),
        args.vit_batch,
        args.gpt_steps,
        norm_mode=True,
    )


def workloads(args: argparse.Namespace) -> list[Workload]:
    """The digits MLP, the tiny GPT and a ViT."""
    x, y = digits()
    ds, vocab = char_dataset(args.seq_len)
    out = [
        Workload(
            "MLP digits (b=128)",
            lambda: Classifier(mlp()),
            TensorDataset(x, y),
            128,
            args.mlp_steps,
        ),
        Workload(
            f"GPT (b={args.gpt_batch}, T={args.seq_len}, d={args.gpt_width}, L={args.gpt_layers})",
            lambda: GPTModule(
                vocab,
                seq_len=args.seq_len,
                width=args.gpt_width,
                n_layers=args.gpt_layers,
                n_heads=max(1, args.gpt_width // 32),
            ),
            ds,
            args.gpt_batch,
            args.gpt_steps,
            norm_mode=True,
        ),
    ]
    if (vision := vit(args)) is not None:
        out.append(vision)
    wanted = args.only.split("|") if args.only else None
    return [w for w in out if wanted is None or any(o in w.name for o in wanted)]


# GPT-2 small and ViT-B/16 at batches that keep a large GPU busy, in bf16; for a GPU run
PRESETS: dict[str, dict[str, Any]] = {
    "realistic": {
        "gpt_width": 768, "gpt_layers": 12, "seq_len": 1024, "gpt_batch": 16,
        "vit_image": 224, "vit_patch": 16, "vit_width": 768, "vit_layers": 12, "vit_batch": 128,
        "precision": "bf16-mixed", "gpt_steps": 5, "repeats": 3, "warmup": 3, "only": "GPT|ViT",
    },
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true", help="Trainer precision, e.g. 16-mixed")
    p.add_argument("--accumulate", type=int, default=4, help="accumulate_grad_batches (>1)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved fits per setting")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps dropped per fit")
    p.add_argument("--mlp-steps", type=int, default=40, help="timed optimizer steps per MLP fit")
    p.add_argument("--gpt-steps", type=int, default=5, help="timed optimizer steps per GPT fit")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gpt-width", type=int, default=128, help="GPT width (heads: width/32)")
    p.add_argument("--gpt-layers", type=int, default=4)
    p.add_argument("--gpt-batch", type=int, default=16)
    p.add_argument("--vit-image", type=int, default=32, help="ViT image size (pixels)")
    p.add_argument("--vit-patch", type=int, default=4)
    p.add_argument("--vit-width", type=int, default=128, help="ViT width (heads: width/64)")
    p.add_argument("--vit-layers", type=int, default=4)
    p.add_argument("--vit-batch", type=int, default=32)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="realistic: GPT-2 small (768 wide, 12 layers, T=1024) and ViT-B/16 in bf16-mixed, "
        "for a GPU (flags given explicitly still win)",
    )
    p.add_argument("--only", default=None, help="only workloads whose name contains this (or A|B)")
    p.add_argument(
        "--examples-per-batch",
        type=int,
        default=4,
        help="also time per_example with this examples_per_batch (0: skip)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: perf_counter; cpu: the training thread's CPU time (CPU, --threads 1 only), "
        "which time slices given to other processes on a shared machine do not inflate",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model in every fit (with and without the callback)",
    )
    args = p.parse_args()
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args()
    if args.accumulate < 2:
        p.error("--accumulate must be at least 2 (the micro_batch source needs two)")
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock cpu times one CPU thread: use it with --device cpu --threads 1")
    quiet()
    set_threads(args.threads or None, args.device)
    rows: list[list[str]] = []
    t0 = time.perf_counter()
    for work in workloads(args):
        rows += run_workload(work, args)
    headers = [
        "workload",
        "setting",
        "without (ms)",
        "with (ms)",
        "ratio",
        "ratio per repeat",
        "peak memory ratio",
    ]
    print(
        f"\nGradientNoiseScale overhead on {describe_device(args.device)}, precision "
        f"{args.precision}{', compiled' if args.compile else ''}, torch {torch.__version__}, "
        f"{'thread CPU time, ' if args.clock == 'cpu' else ''}"
        f"median of {args.repeats} interleaved "
        f"fits per setting ({time.perf_counter() - t0:.0f} s)\n"
    )
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
