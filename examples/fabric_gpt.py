"""A litgpt-style Lightning Fabric loop measuring the gradient noise scale as it trains.

A small GPT (examples/tiny_gpt.py) learns characters of the interpreter's own standard
library source; ``GradientNoiseMeter`` reads B_simple every ``--log-every`` optimizer steps and
``fabric.log_dict`` writes the ``gns/*`` values to TensorBoard.

    python examples/fabric_gpt.py --steps 300 --logdir runs/fabric_gpt
    tensorboard --logdir runs/fabric_gpt      # or: lightning-gns report runs/fabric_gpt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_gpt import TinyGPT, char_dataset  # noqa: E402

from lightning_gns import GradientNoiseMeter  # noqa: E402
from lightning_gns.publish import tensorboard_layout  # noqa: E402


def main(argv: list[str] | None = None) -> GradientNoiseMeter:
    """Train, log, and return the meter (its latest read-out)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=25, help="optimizer steps per read-out")
    p.add_argument("--logdir", default="runs/fabric_gpt")
    p.add_argument("--devices", type=int, default=1)
    args = p.parse_args(argv)

    logger = TensorBoardLogger(args.logdir, name="")
    fabric = Fabric(accelerator="auto", devices=args.devices, precision="32-true", loggers=logger)
    fabric.launch()
    if fabric.is_global_zero:  # B_simple with its interval, one chart on Custom Scalars
        logger.experiment.add_custom_scalars(tensorboard_layout())
    fabric.seed_everything(0)
    data, vocab = char_dataset(args.seq_len, max_chars=200_000)
    loader = DataLoader(data, batch_size=args.micro_batch, shuffle=True, drop_last=True)
    model = TinyGPT(vocab, args.seq_len, args.width, args.layers, n_heads=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)

    # The meter: made after fabric.setup, stepped after the backward, before optimizer.step().
    meter = GradientNoiseMeter(model, accumulate=args.accumulate, log_every_n_steps=args.log_every)

    step, batches = 0, iter(loader)
    while step < args.steps:
        for micro in range(args.accumulate):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            with fabric.no_backward_sync(model, enabled=micro < args.accumulate - 1):
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                fabric.backward(loss / args.accumulate)
        read_out = meter.step()
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if read_out:
            fabric.log_dict({"train/loss": loss.item(), **meter.metrics()}, step=step)
            lo, hi = meter.b_simple_lower, meter.b_simple_upper
            fabric.print(
                f"step {step}: loss {loss.item():.3f}, B_simple {meter.b_simple:.4g} "
                f"(95% {lo:.4g} to {hi:.4g})"
            )
    logger.finalize("success")
    fabric.print(meter.summary_text())
    return meter


if __name__ == "__main__":
    main()
