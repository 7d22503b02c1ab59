"""Per-example squared gradient norms: this project against its peers, side by side.

    .venv/bin/pip install --no-deps backpack-for-pytorch einops unfoldNd opacus gns-pytorch

Every method does a full training step (forward, backward, SGD step) and produces the
per-example squared gradient norms |∇ℓ_j|² of the batch on the way; the plain step does the same
without the norms. Methods: this project's ``PerExampleNorms`` (all layers and norm layers only),
BackPACK ``BatchL2Grad``, Opacus ``GradSampleModule`` (materialised per-example gradients) and
``GradSampleModuleFastGradientClipping`` (ghost clipping and fast gradient clipping norms; one
backward, no clipping), ``torch.func`` vmap per-example gradients (their mean is the step's
gradient), and gns-pytorch's ``compute_gns`` (per-example ``autograd.grad`` loop; it returns
B_simple only, so its agreement is on B_simple).

* Time: all methods run on their own copy of the same model, interleaved round by round
  one step of each per round (plain, ours, ..., plain, ours, ...); each step is timed on its
  own and the median step time is divided by plain's (medians, because a shared machine has
  bursts of load).
* Peak memory: a fresh subprocess per (workload, method) trains two warm-up steps, then the
  peak during a few more steps above the memory in use before them: on CPU the RSS high-water
  mark (``/proc/self/clear_refs`` reset, glibc's mmap threshold pinned so that freed large
  blocks leave RSS; falls back to ``ru_maxrss`` minus the baseline after model and data
  creation), on CUDA ``torch.cuda.max_memory_allocated``.
* Agreement: on the first batch, each method's norms against float64 ``torch.func`` per-example
  gradients over the same parameters (the max relative difference over examples).

The GPT's positional embedding is called on ``arange(T)``, so its input has no batch dimension:
by default it is frozen for every method (ours leaves such a module out by itself; see
``--train-pos-emb`` for what each method does with it).

    python benchmarks/peers.py                    # CPU, both workloads (a few minutes)
    python benchmarks/peers.py --device cuda
    python benchmarks/peers.py --only GPT --train-pos-emb --agreement-only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from common import (
    describe_device,
    digits,
    markdown_table,
    median,
    mlp,
    quiet,
    set_threads,
    sync,
)
from tiny_gpt import TinyGPT, char_dataset
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns.norms import PerExampleNorms

LossFn = Callable[[Tensor, Tensor], Tensor]  # (model output, targets) -> per-example loss (B,)

METHODS = (
    "plain",
    "ours (all layers)",
    "ours (norm layers)",
    "BackPACK BatchL2Grad",
    "Opacus GradSampleModule",
    "Opacus ghost clipping",
    "Opacus fast gradient clipping",
    "torch.func vmap",
    "gns-pytorch (all params, whole batch)",
    "gns-pytorch (defaults: 1% params, 25% batch)",
)


@dataclass
class Workload:
    """A model (the shared initialisation), fixed batches and the per-example loss."""

    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    loss: LossFn
    steps: int  # timing rounds: one step of every method each


def mlp_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def lm_loss(out: Tensor, y: Tensor) -> Tensor:
    """Mean token cross-entropy of each sequence."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def make_workload(name: str, args: argparse.Namespace) -> Workload:
    """``mlp`` or ``gpt``, on ``args.device``, with four fixed batches."""
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        x, y = digits()
        model: nn.Module = mlp()
        b, loss, steps, label = 128, mlp_loss, args.mlp_rounds, "MLP digits (b=128)"
    else:
        ds, vocab = char_dataset(args.seq_len)
        x, y = ds.tensors
        torch.manual_seed(0)
        model = TinyGPT(vocab, seq_len=args.seq_len)
        if not args.train_pos_emb:
            model.pos_emb.weight.requires_grad_(False)
        b, loss, steps = 16, lm_loss, args.gpt_rounds
        label = f"tiny GPT (b=16, T={args.seq_len})"
    idx = torch.randperm(len(x), generator=gen)[: 4 * b].view(4, b)
    batches = [(x[i].to(args.device), y[i].to(args.device)) for i in idx]
    return Workload(label, model.to(args.device), batches, loss, steps)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Runner:
    """One method on its own copy of the model: ``step(x, y)`` trains one step and returns
    the per-example squared norms (B,) over ``covered`` (or B_simple for gns-pytorch)."""

    def __init__(self, method: str, work: Workload, lr: float = 0.01) -> None:
        self.method = method
        self.loss = work.loss
        self.model = copy.deepcopy(work.model)
        self.params = trainable(self.model)
        self.covered: list[str] | None = list(self.params)
        self.note = ""
        self.net: nn.Module = self.model
        self.opt = torch.optim.SGD(self.params.values(), lr=lr)
        self.step: Callable[[Tensor, Tensor], Tensor | float | None] = self._setup(work)

    def _names(self, params: list[nn.Parameter]) -> list[str]:
        ids = {id(p) for p in params}
        return [n for n, p in self.params.items() if id(p) in ids]

    def _finish(self) -> None:
        self.opt.step()
        self.net.zero_grad(set_to_none=True)

    def _setup(self, work: Workload) -> Callable[[Tensor, Tensor], Tensor | float | None]:
        m = self.method
        if m == "plain":
            return self._plain
        if m.startswith("ours"):
            return self._setup_ours(work, "norm" if "norm" in m else "all")
        if m.startswith("BackPACK"):
            from backpack import extend

            self.net = extend(self.model)
            return self._backpack
        if m == "Opacus GradSampleModule":
            from opacus import GradSampleModule

            self.net = GradSampleModule(self.model, loss_reduction="mean")
            return self._opacus_gsm
        if m.startswith("Opacus"):
            from opacus.grad_sample import GradSampleModuleFastGradientClipping

            self.net = GradSampleModuleFastGradientClipping(
                self.model, loss_reduction="mean", use_ghost_clipping="ghost" in m
            )
            return self._opacus_fgc
        if m.startswith("torch.func"):
            return self._vmap
        if m.startswith("gns-pytorch"):
            self.note = "agreement on B_simple"
            if "defaults" in m:
                self.covered = None
                self.note = "samples params/examples"
            return self._gns
        raise ValueError(m)

    # -- methods ------------------------------------------------------------------------
    def _plain(self, x: Tensor, y: Tensor) -> None:
        self.loss(self.net(x), y).mean().backward()
        self._finish()

    def _setup_ours(self, work: Workload, layers: str) -> Callable[[Tensor, Tensor], Tensor]:
        pe = PerExampleNorms(self.model, layers=layers)
        if not pe.sites:
            raise ValueError(f"no layer to track with layers={layers!r}")
        pe.attach()
        x, y = work.batches[0]  # the one-time structural check, without an optimizer step
        pe.start_micro_batch(x.shape[0])
        pe.start_check()
        self.loss(self.model(x), y).mean().backward()
        pe.close_micro_batch()
        self.model.zero_grad(set_to_none=True)
        self.covered = self._names(pe.params)
        if pe.left_out and layers == "all":
            self.note = "left out: " + ", ".join(sorted(pe.left_out))

        def step(x: Tensor, y: Tensor) -> Tensor:
            b = x.shape[0]
            pe.start_micro_batch(b)
            self.loss(self.model(x), y).mean().backward()
            acc, _, bad = pe.close_micro_batch()
            if bad is not None or acc is None:
                raise RuntimeError(f"PerExampleNorms: {bad}")
            self._finish()
            return acc * (b * b)  # mean-loss gradients carry 1/b

        return step

    def _backpack(self, x: Tensor, y: Tensor) -> Tensor:
        from backpack import backpack
        from backpack.extensions import BatchL2Grad

        b = x.shape[0]
        with backpack(BatchL2Grad()):
            self.loss(self.net(x), y).mean().backward()
        got = self._set_coverage("batch_l2", b, "batch_l2")
        out = torch.stack([self.params[n].batch_l2 for n in got]).sum(0) * (b * b)
        for p in self.params.values():
            p.batch_l2 = None
        self._finish()
        return out

    def _opacus_gsm(self, x: Tensor, y: Tensor) -> Tensor:
        b = x.shape[0]
        self.loss(self.net(x), y).mean().backward()
        got = self._set_coverage("grad_sample", b, "grad_sample")
        out = sum(self.params[n].grad_sample.flatten(1).square().sum(1) for n in got)
        self._finish()
        assert isinstance(out, Tensor)
        return out

    def _opacus_fgc(self, x: Tensor, y: Tensor) -> Tensor:
        self.loss(self.net(x), y).mean().backward()
        out = self.net.get_norm_sample().square()  # type: ignore[operator]
        self._finish()
        return out

    def _vmap(self, x: Tensor, y: Tensor) -> Tensor:
        params = {n: p.detach() for n, p in self.params.items()}

        def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            out = functional_call(self.model, p, (xi.unsqueeze(0),))
            return self.loss(out, yi.unsqueeze(0)).squeeze(0)

        per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        out = sum(g.flatten(1).square().sum(1) for g in per.values())
        for n, p in self.params.items():
            p.grad = per[n].mean(0)
        self._finish()
        assert isinstance(out, Tensor)
        return out

    def _gns(self, x: Tensor, y: Tensor) -> float:
        from gns_pytorch import compute_gns

        # compute_gns differentiates w.r.t. model.parameters(): hand it the trainable ones only
        view = nn.ParameterList(self.params.values())
        per = self.loss(self.net(x), y)
        if "defaults" in self.method:
            val = compute_gns(per, view)
        else:
            val = compute_gns(per, view, param_percentage=1.0, batch_percentage=1.0)
        per.mean().backward()
        self._finish()
        return val

    def _set_coverage(self, attr: str, b: int, what: str) -> list[str]:
        """Parameters whose per-example ``attr`` has batch size b; notes the others once."""
        got, wrong, none = [], [], []
        for n, p in self.params.items():
            t = getattr(p, attr, None)
            (none if t is None else got if t.shape[0] == b else wrong).append(n)
        if self.covered is None or len(got) != len(self.covered):
            self.covered = got
            parts = [f"no {what} for {self._kinds(none)}"] if none else []
            if wrong:
                parts.append(f"{self._kinds(wrong)}: {what} batch size ≠ {b}, dropped here")
            self.note = "; ".join(parts)
        return got

    def _kinds(self, names: list[str]) -> str:
        mods = dict(self.model.named_modules())
        kinds: dict[str, int] = {}
        for name in {n.rsplit(".", 1)[0] for n in names}:
            kind = type(mods[name]).__name__
            kinds[kind] = kinds.get(kind, 0) + 1
        return ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items()))


# -- reference and agreement ----------------------------------------------------------------
def reference_grads(work: Workload) -> dict[str, Tensor]:
    """float64 per-example gradients of the first batch, flattened: name -> (B, numel)."""
    model = copy.deepcopy(work.model).double()
    params = {n: p.detach() for n, p in trainable(model).items()}
    x, y = work.batches[0]
    x = x.double() if x.is_floating_point() else x

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return work.loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))[0]

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return {n: g.flatten(1) for n, g in per.items()}


def b_simple(ref: dict[str, Tensor]) -> float:
    """B_simple from per-example gradients with b_small = 1, b_big = B (as gns-pytorch does)."""
    flat = torch.cat(list(ref.values()), 1)
    n = flat.shape[0]
    small = flat.square().sum(1).mean()
    big = flat.mean(0).square().sum()
    trace = (small - big) / (1 - 1 / n)
    g2 = (n * big - small) / (n - 1)
    return float(trace / g2)


def agreement(runner: Runner, out: Tensor | float | None, ref: dict[str, Tensor]) -> str:
    """Max relative difference to the reference over the runner's covered parameters."""
    if out is None:
        return "—"
    if runner.covered is None:
        return "n/a"
    if not runner.covered:
        return "no params"
    if isinstance(out, float):
        want = b_simple({n: ref[n] for n in runner.covered})
        return f"{abs(out - want) / abs(want):.1e}"
    want = sum(ref[n].square().sum(1) for n in runner.covered)
    assert isinstance(want, Tensor)
    return f"{((out.double() - want).abs() / want).max().item():.1e}"


def coverage(runner: Runner, work: Workload) -> str:
    total = sum(p.numel() for p in trainable(work.model).values())
    if runner.covered is None:
        return "sampled"
    return f"{sum(runner.params[n].numel() for n in runner.covered) / total:.1%}"


# -- memory (child process) -----------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"{field}:\s+(\d+)", f.read())
    return int(m.group(1)) if m else -1


def measure_memory(args: argparse.Namespace) -> None:
    """Child: peak memory (MB) of steady-state steps of one method, printed as JSON."""
    quiet()
    work = make_workload(args.child[0], args)
    cuda = torch.device(args.device).type == "cuda"
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner = Runner(args.child[1], work)
    for i in range(2):
        runner.step(*work.batches[i])
    sync(args.device)
    mode = "rss-hwm"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        mode = "cuda"
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_kb("VmRSS") * 1024
        except OSError:
            before, mode = base_maxrss * 1024, "ru_maxrss"
    for i in range(3):
        runner.step(*work.batches[(i + 2) % len(work.batches)])
    sync(args.device)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    elif mode == "rss-hwm":
        peak = _status_kb("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("MEMORY " + json.dumps({"mb": (peak - before) / 2**20, "mode": mode}))


def child_memory(workload: str, method: str, args: argparse.Namespace) -> tuple[float, str]:
    cmd = [sys.executable, __file__, "--child", workload, method, "--device", args.device]
    cmd += ["--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    if args.train_pos_emb:
        cmd.append("--train-pos-emb")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    for line in res.stdout.splitlines():
        if line.startswith("MEMORY "):
            d = json.loads(line[7:])
            return float(d["mb"]), str(d["mode"])
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"memory child failed: {tail}")


# -- main -----------------------------------------------------------------------------------
MEMORY_MODES: dict[str, str] = {}
MODE_TEXT = {
    "rss-hwm": "RSS high-water mark",
    "ru_maxrss": "ru_maxrss minus the baseline",
    "cuda": "torch.cuda.max_memory_allocated",
}


def short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
    return text[:110] + ("…" if len(text) > 110 else "")


def run_workload(key: str, args: argparse.Namespace) -> list[list[str]]:
    work = make_workload(key, args)
    ref = reference_grads(work)
    runners: dict[str, Runner] = {}
    info: dict[str, dict[str, str]] = {}
    for method in METHODS:
        random.seed(0)
        try:
            r = Runner(method, work)
            out = r.step(*work.batches[0])  # same weights for all: agreement first
            info[method] = {"diff": agreement(r, out, ref), "cov": coverage(r, work)}
            info[method]["note"] = r.note
            runners[method] = r
        except Exception as err:  # noqa: BLE001 - a peer that cannot run is a result
            info[method] = {"diff": "—", "cov": "—", "note": short(err)}
    times: dict[str, list[float]] = {m: [] for m in runners}
    if not args.agreement_only:
        for i in range(2):  # warm-up round
            for r in runners.values():
                r.step(*work.batches[i % len(work.batches)])
        for i in range(work.steps):  # one step of each method per round
            for method, r in runners.items():
                sync(args.device)
                t0 = time.perf_counter()
                r.step(*work.batches[i % len(work.batches)])
                sync(args.device)
                times[method].append(time.perf_counter() - t0)
    mem: dict[str, float] = {}
    if not args.agreement_only and not args.no_memory:
        for method in runners:
            try:
                mem[method], MEMORY_MODES[key] = child_memory(key, method, args)
            except Exception as err:  # noqa: BLE001
                info[method]["note"] = (info[method]["note"] + "; " + short(err)).strip("; ")
    t_plain = median(times["plain"]) if times.get("plain") else float("nan")
    m_plain = mem.get("plain", float("nan"))
    rows = []
    for method in METHODS:
        t = median(times[method]) if times.get(method) else None
        mb = mem.get(method)
        rows.append(
            [
                work.name,
                method,
                f"{1e3 * t:.1f}" if t else "n/a",
                f"{t / t_plain:.2f}" if t else "n/a",
                f"{mb:.1f}" if mb is not None else "n/a",
                f"{mb / m_plain:.2f}" if mb is not None and m_plain > 0 else "n/a",
                info[method]["cov"],
                info[method]["diff"],
                info[method]["note"],
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mlp-rounds", type=int, default=30, help="MLP timing rounds")
    p.add_argument("--gpt-rounds", type=int, default=8, help="GPT timing rounds")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--only", default=None, choices=["MLP", "GPT"])
    p.add_argument("--train-pos-emb", action="store_true", help="keep the GPT's pos. embedding")
    p.add_argument("--agreement-only", action="store_true", help="skip timing and memory")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    set_threads(args.threads or None, args.device)
    if args.child:
        measure_memory(args)
        return
    quiet()
    t0 = time.perf_counter()
    rows: list[list[str]] = []
    for key in ("mlp", "gpt"):
        if args.only is None or args.only.lower() == key:
            rows += run_workload(key, args)
    headers = [
        "workload",
        "method",
        "step (ms)",
        "time vs plain",
        "peak mem (MB)",
        "mem vs plain",
        "params covered",
        "max rel diff",
        "note",
    ]
    print(
        f"\nPer-example squared gradient norms on {describe_device(args.device)}, torch "
        f"{torch.__version__}, median step of {args.mlp_rounds} (MLP) / {args.gpt_rounds} (GPT) "
        "interleaved rounds "
        f"({time.perf_counter() - t0:.0f} s); peak memory: "
        + (", ".join(sorted({MODE_TEXT[m] for m in MEMORY_MODES.values()})) or "not measured")
        + "\n"
    )
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
