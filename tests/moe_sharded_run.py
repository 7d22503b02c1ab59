"""Mixture-of-experts models per example under FSDP2 and DDP on 2 CPU processes (gloo): one
rank.

Usage (every rank launched by tests/test_moe_sharded.py through sharded_setup.launch):
    python tests/moe_sharded_run.py OUT.json CONFIG ...
  CONFIG  KIND:MODEL:IMPL   KIND ddp | fsdp2 (fully_shard per decoder layer, then the root);
                           MODEL mixtral | qwen2_moe (tests/moe_zoo.py, random weights);
                           IMPL the experts' implementation: grouped_mm (transformers'
                           default: the rule takes the forward's gate call) | eager (the rule
                           recomputes the experts' projections)
Each config: a few frozen steps of GradientNoiseScale(source="per_example", per_layer=True)
on the first examples of the text data; written: the whole model's values and those of each
MoE layer (routers, experts, shared experts), coverage, what was left out, and the examples
each micro-batch held (for the test's float64 replay).
Each rank writes OUT.json.rank<global rank>.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from moe_zoo import MOE_MODELS  # noqa: E402
from sharded_setup import run  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gns import GNSValues, GradientNoiseScale  # noqa: E402

BATCH = 4  # examples per micro-batch per rank
STEPS = 6


def built(name: str, impl: str) -> tuple[torch.nn.Module, TensorDataset, Callable]:
    """The model (seeded) and the examples the fit draws from (every rank builds the same)."""
    torch.manual_seed(0)
    model, data, loss = MOE_MODELS[name](impl=impl)
    n = BATCH * STEPS * 2
    return model, TensorDataset(*(t[:n] for t in data.tensors)), loss


def layers_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.model.layers)


class MoEModule(pl.LightningModule):
    """A tiny transformers MoE model (random weights, seeded), frozen (SGD, learning rate 0),
    on the first examples of its data in order, with each example's index."""

    def __init__(self, kind: str, name: str, impl: str) -> None:
        super().__init__()
        self.kind = kind
        self.model, data, self.loss = built(name, impl)
        self.data = TensorDataset(*data.tensors, torch.arange(len(data)))
        self.seen: list[list[int]] = []

    def configure_model(self) -> None:
        if self.kind != "fsdp2":
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in layers_of(self.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        return self.loss(self.model, x, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH, shuffle=False)


def values(v: GNSValues) -> dict:
    return {"grad_norm_sq": v.grad_norm_sq, "grad_variance": v.grad_variance, "steps": v.steps}


def fit(root: str, kind: str, name: str, impl: str) -> dict:
    cb = GradientNoiseScale(
        ema_decay=0.9, source="per_example", per_layer=True, log_every_n_steps=2
    )
    module = MoEModule(kind, name, impl)
    run(root, kind, [cb], module=module, max_steps=STEPS)
    v = cb.values
    return {
        **values(v),
        "layers": {k: values(lv) for k, lv in cb.layer_values.items() if ".mlp." in k},
        "skipped": v.skipped,
        "chosen_source": cb.chosen_source,
        "coverage": cb.coverage,
        "left_out": {k: str(r) for k, r in cb.left_out.items()},
        "seen": module.seen,
    }


def main(out: str, configs: list[str]) -> None:
    rank = int(os.environ["GNS_TEST_RANK"])
    root = os.path.dirname(os.path.abspath(out))
    results: dict[str, dict] = {}
    for config in configs:
        start = time.perf_counter()
        kind, name, impl = config.split(":")
        results[config] = fit(f"{root}/{config.replace(':', '_')}", kind, name, impl)
        results[config]["seconds"] = time.perf_counter() - start
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
