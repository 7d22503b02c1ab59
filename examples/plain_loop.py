"""A plain PyTorch loop (nanoGPT style, no Lightning in it) measuring the gradient noise scale.

A small GPT (examples/tiny_gpt.py) on characters of the interpreter's standard library source,
with gradient accumulation and AdamW; ``GradientNoiseMeter`` reads B_simple every
``--log-every`` optimizer steps and a ``SummaryWriter`` writes the ``gns/*`` values.

    python examples/plain_loop.py --steps 300 --logdir runs/plain_loop
    tensorboard --logdir runs/plain_loop      # or: lightning-gns report runs/plain_loop
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

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
    p.add_argument("--logdir", default="runs/plain_loop")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data, vocab = char_dataset(args.seq_len, max_chars=200_000)
    loader = DataLoader(data, batch_size=args.micro_batch, shuffle=True, drop_last=True)
    model = TinyGPT(vocab, args.seq_len, args.width, args.layers, n_heads=4).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    writer = SummaryWriter(args.logdir)
    writer.add_custom_scalars(tensorboard_layout())  # B_simple with its interval, one chart

    # The meter counts the micro-batches of each step (the loss is divided by their number).
    meter = GradientNoiseMeter(model, log_every_n_steps=args.log_every)

    step, batches = 0, iter(loader)
    while step < args.steps:
        for _ in range(args.accumulate):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            (loss / args.accumulate).backward()
        read_out = meter.step()  # after the backward, before clipping and optimizer.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if read_out:
            writer.add_scalar("train/loss", loss.item(), step)
            for key, value in meter.metrics().items():
                writer.add_scalar(key, value, step)
            lo, hi = meter.b_simple_lower, meter.b_simple_upper
            print(
                f"step {step}: loss {loss.item():.3f}, B_simple {meter.b_simple:.4g} "
                f"(95% {lo:.4g} to {hi:.4g})"
            )
    writer.close()
    print(meter.summary_text())
    return meter


if __name__ == "__main__":
    main()
