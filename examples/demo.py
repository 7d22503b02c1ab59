"""`make demo`: train a small model on the bundled digits with GradientNoiseScale, log to runs/."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_gns import GradientNoiseScale  # noqa: E402


def tool(name: str) -> str:
    """The command for a console script: the venv's copy (relative path) when run from one."""
    path = Path(sys.executable).parent / name
    return os.path.relpath(path) if path.exists() else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="runs", help="where logs go (default: runs/)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    gns = GradientNoiseScale()  # adaptive window, auto source
    name = f"digits_b{args.batch_size}x{args.accumulate}"
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        callbacks=[gns],
        logger=TensorBoardLogger(args.root, name=name),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule(batch_size=args.batch_size))

    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    print()
    v = gns.values
    if v.known:
        interval = f"95% interval {v.b_simple_lower:.1f} to {v.b_simple_upper:.1f}"
        print(f"final B_simple      : {v.b_simple:.1f} ({interval}, {v.window:.0f}-step window)")
    else:
        print(f"final B_simple      : not yet known; at least {v.b_simple_lower:.1f} (95%)")
        if gns.batch_size < v.b_simple_lower:
            print(
                f"advice              : batch size {gns.batch_size:.0f} is below that bound; a "
                "larger batch would need fewer steps at little extra compute"
            )
    print(f"|G|² (smoothed)     : {gns.grad_norm_sq:.4g}")
    print(f"tr(Σ) (smoothed)    : {gns.grad_variance:.4g}")
    print(f"batch size used     : {gns.batch_size:.0f}")
    if math.isfinite(metrics.get("gns/optimal_batch_size", math.nan)):
        print(f"recommended batch   : {metrics['gns/optimal_batch_size']:.0f}")
        print(f"efficiency now      : {metrics['gns/efficiency']:.0%}")
    print(f"validation accuracy : {metrics.get('val/acc', math.nan):.3f}")
    print(f"\nView the curves:  {tool('tensorboard')} --logdir {args.root}")
    print(f"Report:           {tool('lightning-gns')} report {args.root}")


if __name__ == "__main__":
    main()
