"""CriticalBatchProbe under DDP (2 CPU processes, gloo): the same run without and with the
probe, one after the other in the same processes; each rank writes OUT.rank<r> (JSON).

Usage: python tests/probe_ddp_run.py OUT.json
(Lightning's strategy="ddp" relaunches this script, so the test calls it in a subprocess.)
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from helpers import trainer_kwargs  # noqa: E402
from probe_helpers import Noisy, Trace, flat_state, seed_everything  # noqa: E402

from lightning_gns import CriticalBatchProbe  # noqa: E402


def run(out: str, probe: CriticalBatchProbe | None) -> tuple[dict, pl.Trainer]:
    seed_everything(0)
    module, trace = Noisy(batch_size=8), Trace()
    trainer = pl.Trainer(
        **trainer_kwargs(os.path.dirname(out), accelerator="cpu", devices=2, strategy="ddp",
                         max_steps=16),
        callbacks=[trace, probe] if probe else [trace],
    )  # fmt: skip
    trainer.fit(module)
    return flat_state(module, trainer, trace), trainer


def main(out: str) -> None:
    torch.set_num_threads(1)
    plain, _ = run(out, None)
    probe = CriticalBatchProbe(at_steps=[5, 10], factors=(1, 2, 4), examples=128, eval_batches=4)
    probed, trainer = run(out, probe)
    result = {
        "world_size": trainer.world_size,
        "plain": plain,
        "probed": probed,
        "results": [(r.step, r.batch, r.b_crit, r.lower, r.upper, r.losses) for r in probe.results],
    }
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
