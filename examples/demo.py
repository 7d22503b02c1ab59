"""`make demo`: train a small model on the bundled digits with GradientNoiseScale, log to runs/."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_gns import GradientNoiseScale  # noqa: E402
from lightning_gns.advice import number  # noqa: E402
from lightning_gns.estimator import GNSValues  # noqa: E402
from lightning_gns.publish import decide  # noqa: E402


def tool(name: str) -> str:
    """The command for a console script: the venv's copy (relative path) when run from one."""
    path = Path(sys.executable).parent / name
    return os.path.relpath(path) if path.exists() else name


def _value(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else "not yet measured"


def closing_lines(
    v: GNSValues, batch_size: float, multiple: int | None, val_acc: float = math.nan
) -> list[str]:
    """The demo's closing lines: the callback's own headline and advice
    (:func:`lightning_gns.advice.decide`), then the values behind them; never a NaN."""
    a = decide(v, batch_size, multiple)
    window = f", {v.window:.0f}-step window" if a.known and math.isfinite(v.window) else ""
    lines = [
        f"final               : {a.headline()}{window}",
        f"advice              : {a.sentence()}",
        f"|G|² (smoothed)     : {_value(v.grad_norm_sq)}",
        f"tr(Σ) (smoothed)    : {_value(v.grad_variance)}",
        f"batch size used     : {number(batch_size) if math.isfinite(batch_size) else 'unknown'}",
    ]
    if a.recommended is not None:
        lines.append(f"recommended batch   : {a.recommended}")
    if math.isfinite(a.efficiency):
        lines.append(f"efficiency now      : {a.efficiency:.0%}")
    if math.isfinite(val_acc):
        lines.append(f"validation accuracy : {val_acc:.3f}")
    return lines


def main() -> None:
    from digits import DigitsClassifier, DigitsDataModule

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

    acc = trainer.callback_metrics.get("val/acc")
    print()
    for line in closing_lines(
        gns.values, gns.batch_size, gns.batch_size_multiple, math.nan if acc is None else acc.item()
    ):
        print(line)
    print(f"\nView the curves:  {tool('tensorboard')} --logdir {args.root}")
    print(f"Report:           {tool('lightning-gns')} report {args.root}")


if __name__ == "__main__":
    main()
