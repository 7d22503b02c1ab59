"""A small sweep for the report and the screenshots: real fits on the bundled digits.

Every run logs to TensorBoard and CSV at once (Lightning's default layout puts the two in
``<name>/version_0`` and ``<name>/version_1``). Runs: batch 16 and batch 128 (per-example
norms), 4 micro-batches of 8 (micro-batch norms), a frozen, well-trained model at batch 4 whose
B_simple stays unknown (only its lower bound is logged), and a BatchNorm model that the
callback refuses at fit start (per-example norms do not exist for it), so the run logs nothing
but the error.

    python examples/sweep.py --root sweep && lightning-gns report sweep
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from torch import nn  # noqa: E402

from lightning_gns import GradientNoiseScale  # noqa: E402

# name -> what the run shows in the report
RUNS = {
    "b16": "batch below B_simple: advice to grow",
    "b128": "batch above B_simple: advice to shrink",
    "b8x4": "micro-batch source (accumulation 4)",
    "frozen_b4": "only a lower bound: B_simple not yet known",
    "batchnorm": "refused at fit start: listed with its error",
}


class BatchNormClassifier(DigitsClassifier):
    """The digits MLP with BatchNorm: examples of a batch interact (no per-example gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
        )


def _trained(steps: int = 60) -> DigitsClassifier:
    """The digits MLP trained to a low loss on the whole data set, then frozen (lr 0): its
    B_simple is large, so at batch 4 the interval stays open for a short run."""
    data = DigitsDataModule()
    data.setup()
    x, y = (torch.stack(t) for t in zip(*data.train_set, strict=True))
    model = DigitsClassifier(lr=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _fit(root: Path, name: str, model: pl.LightningModule, batch: int, steps: int, **kw) -> None:
    gns_kw = kw.pop("gns", {})
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[GradientNoiseScale(**gns_kw)],
        logger=[TensorBoardLogger(root, name=name), CSVLogger(root, name=name)],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kw,
    )
    trainer.fit(model, DigitsDataModule(batch_size=batch))


def make_sweep(root: str | os.PathLike[str], steps: int = 150) -> dict[str, str]:
    """Run the sweep into ``root``; returns :data:`RUNS`. ``steps``: optimizer steps per run."""
    out = Path(root)
    pl.seed_everything(0, verbose=False)
    _fit(out, "b16", DigitsClassifier(), 16, steps)
    _fit(out, "b128", DigitsClassifier(), 128, steps)
    _fit(
        out,
        "b8x4",
        DigitsClassifier(),
        8,
        steps,
        accumulate_grad_batches=4,
        gns={"source": "micro_batch"},
    )
    _fit(out, "frozen_b4", _trained(), 4, max(40, steps // 3))
    try:
        _fit(out, "batchnorm", BatchNormClassifier(), 16, steps, gns={"source": "per_example"})
    except RuntimeError as err:  # the refusal this run is here to show
        if "BatchNorm" not in str(err):
            raise
    return RUNS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="sweep", help="where logs go (default: sweep/)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    args = parser.parse_args()
    for name, what in make_sweep(args.root, args.steps).items():
        print(f"{name:10s} {what}")
    print(f"\nReport: lightning-gns report {args.root}")


if __name__ == "__main__":
    main()
