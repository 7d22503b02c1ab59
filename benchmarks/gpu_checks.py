"""Checks that only a GPU shows: CUDA AMP (fp16 GradScaler) and "no host sync per step".

    python benchmarks/gpu_checks.py            # needs a CUDA device
    python benchmarks/gpu_checks.py --cpu      # dry run of the same code on a CPU (bf16-mixed,
                                               # recorder only, fewer steps): catches script bugs

1. A frozen MLP (learning rate 0) on the digits under precision="16-mixed": the callback's
   B_simple against the exact value from per-example gradients (fp32, torch.func).
2. ``lightning_gns.forbid_host_sync()`` around every fit: on non-logging steps every piece of
   the package's per-step code (the callback's hooks, the parameter hooks, the per-example
   module hooks forward and backward, the routed Linear, the taps) runs under
   torch.cuda.set_sync_debug_mode("error") and a host-read recorder; the check fails if
   anything was found (on a CPU only the recorder runs).
3. The simultaneous route (norms/simultaneous.py) under 16-mixed: a frozen nanoGPT with a long
   context (every Linear routed) against its exact B_simple, under the same sync check.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from helpers import Classifier, digits, exact_gns, mlp, trainer_kwargs  # noqa: E402
from zoo import ZOO, ZooModule, exact  # noqa: E402

from lightning_gns import GradientNoiseScale, forbid_host_sync  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="dry run on a CPU (host-read recorder only)")
    cpu = p.parse_args().cpu
    assert cpu or torch.cuda.is_available(), "needs a CUDA device (or --cpu for a dry run)"
    device = "cpu" if cpu else "gpu"
    precision = "bf16-mixed" if cpu else "16-mixed"  # (fp16 autocast is CUDA's)
    run = functools.partial(
        trainer_kwargs, os.getcwd(), accelerator=device, precision=precision
    )  # the tests' quiet Trainer settings on this device
    x, y = digits()
    truth = exact_gns(mlp(), x, y)
    name = "CPU dry run" if cpu else torch.cuda.get_device_name()
    results = {"device": name, "truth_b_simple": truth["b_simple"]}
    for source, acc in (("micro_batch", 4), ("per_example", 1), ("per_example", 4)):
        cb = GradientNoiseScale(ema_decay=0.98, source=source, log_every_n_steps=50)
        epochs = 2 if cpu else 8
        trainer = pl.Trainer(**run(max_epochs=epochs, accumulate_grad_batches=acc, callbacks=[cb]))
        with forbid_host_sync() as found:
            trainer.fit(Classifier(mlp(), batch_size=16 if acc > 1 else 64))
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # (none with bf16)
        key = f"{source}_acc{acc}"
        results[key] = {
            "b_simple": cb.b_simple,
            "b_simple_se": cb.values.b_simple_se,
            "rel_error": cb.b_simple / truth["b_simple"] - 1,
            "grad_norm_sq_rel_error": cb.grad_norm_sq / truth["grad_norm_sq"] - 1,
            "steps": cb.values.steps,
            "skipped": cb.values.skipped,
            "loss_scale": float(scaler.get_scale()) if scaler is not None else None,
            "host_reads_found": len(found),
            "sync_check": "recorder only (CPU)" if cpu else "set_sync_debug_mode('error')",
        }
        print(key, results[key], flush=True)
    model, data, loss = ZOO["nanogpt_long_context"]()
    truth_lm = exact(model, data, loss)
    cb = GradientNoiseScale(source="per_example", log_every_n_steps=100)
    trainer = pl.Trainer(**run(max_steps=60 if cpu else 1000, callbacks=[cb]))
    with forbid_host_sync() as found:
        trainer.fit(ZooModule(model, data, loss, 16))
    results["nanogpt_long_context_per_example"] = {
        "b_simple": cb.b_simple,
        "truth_b_simple": truth_lm["b_simple"],
        "rel_error": cb.b_simple / truth_lm["b_simple"] - 1,
        "coverage": cb.coverage,
        "steps": cb.values.steps,
        "skipped": cb.values.skipped,
        "host_reads_found": len(found),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
