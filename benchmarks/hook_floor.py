"""What a hook-based per-example design costs at least, beside the package, on the digits MLP.

One micro-batch (forward, backward, the norms' open and close) of the benchmark's MLP
(64 → 256 → 256 → 10, batch 128) is timed in five variants, interleaved iteration by
iteration in one process so that machine load hits all alike (thread CPU time, 10th and 50th
percentiles):

* ``plain``: the model as it is;
* ``forward``: each Linear's forward replaced by a Python function (what routing costs);
* ``hooked``: that, plus a pre-hook on each output's autograd node that does nothing;
* ``minimal``: that, plus the Linear rule |g|²(|a|² + 1) (two row dot products, one
  ``addcmul``) and one sum: the least a per-layer hook design can do;
* ``package``: :class:`~lightning_gns.norms.PerExampleNorms` attached.

    python benchmarks/hook_floor.py              # about a minute
    python benchmarks/hook_floor.py --iters 4000

The differences to ``plain`` are the per-micro-batch costs; ``benchmarks/overhead.py`` adds
the callback's per-step glue and Lightning's dispatch on top.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import digits, mlp
from torch import Tensor, nn

from lightning_gns.norms import PerExampleNorms

Step = tuple[Callable[[], None], Callable[[], object]]  # (open, close) around a micro-batch


def _route(model: nn.Module, hook: Callable[[nn.Linear, Tensor], Callable] | None) -> None:
    """Each Linear's forward as a Python function; ``hook(layer, x)`` gives its pre-hook."""
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            continue

        def forward(x: Tensor, m: nn.Linear = m) -> Tensor:
            y = F.linear(x, m.weight, m.bias)
            if hook is not None and y.grad_fn is not None:
                y.grad_fn.register_prehook(hook(m, x))
            return y

        m.forward = forward  # type: ignore[method-assign, assignment]


def variants() -> dict[str, tuple[nn.Module, Step]]:
    """The five variants, each with its own copy of the model (same weights)."""
    out: dict[str, tuple[nn.Module, Step]] = {}
    nothing: Step = (lambda: None, lambda: None)
    out["plain"] = (mlp(), nothing)
    forward = mlp()
    _route(forward, None)
    out["forward"] = (forward, nothing)
    hooked = mlp()
    _route(hooked, lambda m, x: lambda grads: None)
    out["hooked"] = (hooked, nothing)
    parts: list[Tensor] = []

    def rule(m: nn.Linear, a: Tensor) -> Callable:
        def pre(grads: tuple) -> None:
            g = grads[0]
            g_sq, a_sq = torch.linalg.vecdot(g, g), torch.linalg.vecdot(a, a)
            parts.append(torch.addcmul(g_sq, a_sq, g_sq))

        return pre

    minimal = mlp()
    _route(minimal, rule)
    out["minimal"] = (minimal, (parts.clear, lambda: sum(parts)))
    package = mlp()
    norms = PerExampleNorms(package)
    norms.attach()
    out["package"] = (package, (lambda: norms.start_micro_batch(128), norms.close_micro_batch))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2500)
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = digits()
    x, y = x[:128].contiguous(), y[:128].contiguous()
    runs = variants()
    times: dict[str, list[int]] = {k: [] for k in runs}
    for i in range(args.warmup + args.iters):
        for name, (model, (open_, close)) in runs.items():
            t0 = time.thread_time_ns()
            open_()
            F.cross_entropy(model(x), y).backward()
            close()
            t1 = time.thread_time_ns()
            model.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(t1 - t0)

    def pct(v: list[int], q: float) -> float:
        return sorted(v)[int(len(v) * q)] / 1000

    base10, base50 = pct(times["plain"], 0.1), pct(times["plain"], 0.5)
    print(f"one micro-batch of the digits MLP (batch 128), {args.iters} interleaved iterations")
    head = ("variant", "p10 µs", "p50 µs", "p10 − plain", "p50 − plain")
    print(f"{head[0]:10s} {head[1]:>8s} {head[2]:>8s} {head[3]:>12s} {head[4]:>12s}")
    for name, v in times.items():
        p10, p50 = pct(v, 0.1), pct(v, 0.5)
        print(f"{name:10s} {p10:8.1f} {p50:8.1f} {p10 - base10:12.1f} {p50 - base50:12.1f}")


if __name__ == "__main__":
    main()
