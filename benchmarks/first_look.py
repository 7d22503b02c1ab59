"""How a run reads at first look: logged points with a number, before and after issue 19.

A small GPT-2 (random weights, 2 layers, width 32, T = 16) trains with Adam on the bundled
character data at batch 16 for 300 steps, logging every 10, as the new user of issue 19 did.
For every logged point it counts which keys hold a number:

* ``gns/b_simple`` as logged now (a point estimate whenever its 95% interval is bounded);
* the rule before (a value only when the interval spanned at most 1.5×, else NaN);
* ``gns/optimal_batch_size`` (the batch size the data support; NaN before when imprecise).

    python benchmarks/first_look.py            # about 2 minutes on a laptop CPU
"""

from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from helpers import trainer_kwargs  # noqa: E402
from zoo import ZooModule, gpt2  # noqa: E402

from lightning_gns import GradientNoiseScale, keys  # noqa: E402


class Trained(ZooModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Points(pl.Callback):
    """What trainer.callback_metrics holds after each read-out."""

    def __init__(self, gns: GradientNoiseScale) -> None:
        self.gns, self.rows, self.reads = gns, [], 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if self.gns.reads > self.reads:
            self.reads = self.gns.reads
            m = trainer.callback_metrics
            v = self.gns.values
            self.rows.append(
                (
                    float(m[keys.B_SIMPLE]),
                    v.b_simple if v.precise else math.nan,  # the rule before issue 19
                    float(m[keys.OPTIMAL_BATCH_SIZE]),
                    v.b_simple_lower,
                    v.b_simple_upper,
                )
            )


def main() -> None:
    t0 = time.time()
    torch.manual_seed(0)
    model, data, loss = gpt2()
    gns = GradientNoiseScale()
    points = Points(gns)
    trainer = pl.Trainer(
        **trainer_kwargs("/tmp/first_look", max_steps=300, log_every_n_steps=10),
        callbacks=[gns, points],
    )
    trainer.fit(Trained(model, data, loss, 16))
    rows = points.rows
    n = len(rows)
    now = sum(math.isfinite(r[0]) for r in rows)
    before = sum(math.isfinite(r[1]) for r in rows)
    advice = sum(math.isfinite(r[2]) for r in rows)
    print(f"GPT-2 (2 layers, width 32, T=16), batch 16, Adam 1e-3, 300 steps: {n} read-outs")
    print(f"  gns/b_simple with a number: {now}/{n} now, {before}/{n} with the rule before")
    print(f"  gns/optimal_batch_size with a number: {advice}/{n}")
    last = rows[-1]
    print(f"  last: B_simple {last[0]:.4g}, interval {last[3]:.4g} to {last[4]:.4g}")
    print(f"  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
