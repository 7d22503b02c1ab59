"""Coverage and accuracy on models nobody here wrote, with default settings and no model edits.

The zoo of ``tests/zoo.py`` (Hugging Face GPT-2, Llama, ViT; a nanoGPT-style model; LSTM
classifiers), built from configurations with random weights, frozen. Per model: the
fraction of trainable parameters covered, the layers covered by the torch.func fallback,
the exact B_simple over the whole data set and the callback's estimate after 1,000 steps
(batches of 16 drawn with replacement).

    python benchmarks/zoo.py          # about a minute on 2 CPU cores
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import trainer_kwargs  # noqa: E402
from zoo import ZOO, ZooModule, exact  # noqa: E402

from lightning_gns import GradientNoiseScale  # noqa: E402


def main(steps: int = 1000, batch: int = 16) -> None:
    warnings.filterwarnings("ignore")
    print(
        "| model | coverage | layers without a rule (torch.func fallback) | exact B_simple "
        "| estimate (95% interval) | estimate / exact |"
    )
    print("|---|---|---|---|---|---|")
    t0 = time.time()
    for name, make in sorted(ZOO.items()):
        torch.manual_seed(0)
        model, data, loss = make()
        truth = exact(model, data, loss)["b_simple"]
        cb = GradientNoiseScale()
        kw = trainer_kwargs(tempfile.mkdtemp(), max_steps=steps, log_every_n_steps=100)
        pl.Trainer(**kw, callbacks=[cb]).fit(ZooModule(model, data, loss, batch))
        sites = cb.sites.values()
        generic = sorted({type(s.module).__name__ for s in sites if s.generic})
        v = cb.values
        print(
            f"| {name} | {cb.coverage:.1%} | {', '.join(generic) or '—'} | {truth:.2f} | "
            f"{cb.b_simple:.2f} ({v.b_simple_lower:.2f}–{v.b_simple_upper:.2f}) | "
            f"{cb.b_simple / truth:.3f} |",
            flush=True,
        )
    print(f"\n{steps} steps of batch {batch} per model; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
