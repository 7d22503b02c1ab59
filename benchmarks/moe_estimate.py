"""Mixture-of-experts models through the callback: coverage and B_simple against exact.

Tiny Mixtral, Qwen2-MoE (with its shared expert), OLMoE (top 4 of 8) and a ModuleList-experts
model (tests/moe_zoo.py), random weights, each after 150 Adam steps (so that the experts
matter), then frozen; exact B_simple over the 256 examples from per-example gradients (one
backward each), for the whole model, its MoE parameters, the rest, and each router and
experts module; the callback's estimate with default settings (``per_layer=True``) after
``--steps`` steps of batch ``--batch`` drawn with replacement.

    python benchmarks/moe_estimate.py [--steps 1000] [--batch 16] [--only mixtral]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import trainer_kwargs  # noqa: E402
from moe_zoo import MOE_MODELS, moe_parameters, trained  # noqa: E402
from zoo import ZooModule, per_example_grads  # noqa: E402

from lightning_gns import GradientNoiseScale  # noqa: E402


def exact(per: torch.Tensor, cols: torch.Tensor) -> tuple[float, float]:
    """(B_simple, |G|²) over these columns of the per-example gradients."""
    g = per[:, cols].mean(0)
    g2 = g.square().sum()
    return float((per[:, cols] - g).square().sum(1).mean() / g2), float(g2)


def row(name: str, steps: int, batch: int) -> str:
    """The table's row for one model."""
    model, data, loss = trained(name)
    per = per_example_grads(model, data, loss)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ends = torch.cumsum(torch.tensor([p.numel() for p in model.parameters()]), 0).tolist()
    spans = dict(zip(names, zip([0, *ends[:-1]], ends, strict=True), strict=True))
    moe = set(moe_parameters(model))

    def cols(pick) -> torch.Tensor:  # noqa: ANN001
        return torch.cat([torch.arange(*spans[n]) for n in names if pick(n)])

    whole, g2 = exact(per, torch.arange(per.shape[1]))
    b_moe, g2_moe = exact(per, cols(lambda n: n in moe))
    b_rest, _ = exact(per, cols(lambda n: n not in moe))
    layers = sorted({n.rsplit(".", 1)[0] for n in moe if ".gate." in n or ".experts." in n})
    if name == "toy_modulelist":  # its experts are Linears of their own: the routers only
        layers = sorted({n.rsplit(".", 1)[0] for n in moe if ".gate." in n})
    cb = GradientNoiseScale(per_layer=True)
    kw = trainer_kwargs(tempfile.mkdtemp(), max_steps=steps, log_every_n_steps=100)
    pl.Trainer(**kw, callbacks=[cb]).fit(ZooModule(model, data, loss, batch, epoch=batch * steps))
    per_layer = []
    for layer in layers:
        truth, _ = exact(per, cols(lambda n, m=layer: n.rsplit(".", 1)[0] == m))
        short = layer.replace("model.layers.", "L").replace(".mlp", "")
        per_layer.append(f"{short} {cb.layer_values[f'model.{layer}'].b_simple / truth:.2f}")
    return (
        f"| {name} | {cb.coverage:.1%} | {g2_moe / g2:.1%} | {whole:.1f} ({b_moe:.1f} / "
        f"{b_rest:.1f}) | {cb.b_simple / whole:.3f} | {', '.join(per_layer)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--only", default="mixtral,qwen2_moe,olmoe,toy_modulelist")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(
        "| model | coverage | MoE share of |G|² | exact B_simple (MoE / rest) | estimate / exact "
        "| routers, experts: estimate / exact per layer |"
    )
    print("|---|---|---|---|---|---|")
    t0 = time.time()
    for name in args.only.split(","):
        assert name in MOE_MODELS, name
        print(row(name, args.steps, args.batch), flush=True)
    print(f"\n{args.steps} steps of batch {args.batch} per model; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
