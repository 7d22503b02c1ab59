"""Cost of the mixture-of-experts rules against the MoE block's own forward and backward.

Each block alone (random weights, float32, CPU), a batch of B examples of T tokens: the plain
forward + backward of the block is timed, then the rules of ``lightning_gns.norms.moe`` /
``tokens`` on the inputs and output gradients saved from that step (hooked by hand as in
tests/moe_zoo.py), interleaved, median of repeats. The table gives both and their ratio, per
layout, with the router's and the experts' shares (and, where the experts' forward gives the
rule its gate's input, output and gradient, the experts' share had the rule recomputed them);
the dense rows are a SwiGLU MLP
of Linears with the same active width (k experts' worth) under the dense Linear rule.

    python benchmarks/moe.py [--repeats 15] [--batch 8] [--seq 128] [--width 256]
    python benchmarks/moe.py --graphs   # compiled: graphs and breaks, dense beside MoE
    python benchmarks/moe.py --compiled [--repeats 15]   # compiled blocks: the norms' cost

``--graphs``: the tiny models of tests/moe_zoo.py (Mixtral, Qwen2-MoE, grouped_mm) and a dense
Mistral of the same sizes, compiled, 12 steps of the callback per example: coverage, skipped
steps, the compiled estimate against eager, dynamo's graphs and graph breaks by reason.

``--compiled``: each ``grouped_mm`` block compiled, its forward + backward alone against the
same with the per-example norms (``PerExampleNorms``: the structural check on an eager step,
then the compiled taps of ``lightning_gns.norms.moe_compiled``), and again with the experts'
rule recomputing z (the gate tap's rows not verified), interleaved, median of repeats.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import markdown_table, median, set_threads
from moe_zoo import HandHooks, ToyMoE
from torch import Tensor, nn

from lightning_gns.norms.rules import norm_rule_for


class Holder(nn.Module):
    """A block under a name, as in a model (the hand hooks look for MoE blocks by class)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out


class DenseMLP(nn.Module):
    """SwiGLU of three Linears (the dense comparison: the active width of k experts)."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def hf_block(kind: str, d: int, impl: str) -> nn.Module:
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(
            hidden_size=d, intermediate_size=7 * d // 2, num_local_experts=8,
            num_experts_per_tok=2, experts_implementation=impl,
        )  # fmt: skip
        cfg._experts_implementation = impl
        return MixtralSparseMoeBlock(cfg)
    if kind == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = Qwen2MoeConfig(
            hidden_size=d, moe_intermediate_size=d // 2, shared_expert_intermediate_size=2 * d,
            num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
            experts_implementation=impl,
        )  # fmt: skip
        cfg._experts_implementation = impl
        return Qwen2MoeSparseMoeBlock(cfg)
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = OlmoeConfig(
        hidden_size=d, intermediate_size=d // 2, num_experts=64, num_experts_per_tok=8,
        experts_implementation=impl,
    )  # fmt: skip
    cfg._experts_implementation = impl
    return OlmoeSparseMoeBlock(cfg)


def _init(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def plain_step(model: nn.Module, x: Tensor, r: Tensor) -> float:
    t = time.perf_counter()
    (model(x) * r).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def rule_times(hooks: HandHooks) -> dict[str, float]:
    """Seconds of the rules, by the module class they cover; "recomputed": the stacked experts'
    rule again without the forward's gate call (as under the eager loop or checkpointing)."""
    out: dict[str, float] = {}
    names = list(hooks.modules)
    every = dict(hooks.modules)
    for name in names:
        hooks.modules = {name: every[name]}
        t = time.perf_counter()
        hooks.norms()
        kind = type(every[name]).__name__
        out[kind] = out.get(kind, 0.0) + time.perf_counter() - t
        kept = hooks.calls[name].get("gate")
        if kept is not None:
            hooks.calls[name]["gate"] = None
            t = time.perf_counter()
            hooks.norms()
            out["recomputed"] = out.get("recomputed", 0.0) + time.perf_counter() - t
            hooks.calls[name]["gate"] = kept
    hooks.modules = every
    return out


def dense_rule_time(model: DenseMLP, x: Tensor, r: Tensor) -> float:
    saved: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for name, lin in model.named_children():

        def fwd(m: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
            a = args[0]
            out.register_hook(lambda g: saved.__setitem__(name, (a, g)))

        handles.append(lin.register_forward_hook(fwd))
    (model(x) * r).sum().backward()
    model.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    t = time.perf_counter()
    for name, lin in model.named_children():
        a, g = saved[name]
        norm_rule_for(lin)(lin, a, g)
    return time.perf_counter() - t


def measure(make: Callable[[], nn.Module], b: int, t: int, d: int, repeats: int) -> dict:
    model = _init(Holder(make()))
    torch.manual_seed(1)
    x = torch.randn(b, t, d, requires_grad=True)
    r = torch.randn(b, t, d)
    plain, rules = [], []
    shares: dict[str, list[float]] = {}
    for i in range(repeats + 2):
        p = plain_step(model, x, r)
        hooks = HandHooks(model, b, tap=True)
        (model(x) * r).sum().backward()
        model.zero_grad(set_to_none=True)
        hooks.remove()
        times = rule_times(hooks)
        if i >= 2:  # warm-up
            plain.append(p)
            rules.append(sum(v for k, v in times.items() if k != "recomputed"))
            for k, v in times.items():
                shares.setdefault(k, []).append(v)
    return {
        "plain": median(plain),
        "rules": median(rules),
        "shares": {k: median(v) for k, v in shares.items()},
    }


def measure_dense(d: int, f: int, b: int, t: int, repeats: int) -> dict:
    model = _init(DenseMLP(d, f))
    x, r = torch.randn(b, t, d, requires_grad=True), torch.randn(b, t, d)
    plain, rules = [], []
    for i in range(repeats + 2):
        p = plain_step(model, x, r)
        q = dense_rule_time(model, x, r)
        if i >= 2:
            plain.append(p)
            rules.append(q)
    return {"plain": median(plain), "rules": median(rules), "shares": {}}


def graphs() -> None:
    """Per-example norms of compiled MoE models and a dense one: graphs and breaks."""
    import lightning.pytorch as pl
    from common import quiet
    from helpers import trainer_kwargs
    from moe_zoo import MOE_MODELS, _common
    from torch._dynamo.utils import counters
    from transformers import MistralConfig, MistralForCausalLM
    from zoo import ZooModule, hf_logits, lm_loss, text_data

    from lightning_gns import GradientNoiseScale

    quiet()

    def mistral(impl: str) -> tuple:
        data, vocab = text_data()
        cfg = MistralConfig(**_common(vocab), intermediate_size=96)
        return MistralForCausalLM(cfg), data, lm_loss(hf_logits)

    rows = []
    for name, make in (("dense Mistral", mistral), ("Mixtral", MOE_MODELS["mixtral"]),
                       ("Qwen2-MoE", MOE_MODELS["qwen2_moe"])):  # fmt: skip
        got = {}
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            torch.manual_seed(0)
            model, data, loss = make(impl="grouped_mm")
            module = ZooModule(model, data, loss, 8)
            if compiled:
                module.model = torch.compile(model)
            gns = GradientNoiseScale(source="per_example", log_every_n_steps=4)
            kw = trainer_kwargs("/tmp/gns-moe-graphs", max_steps=12, enable_progress_bar=False)
            pl.Trainer(**kw, callbacks=[gns]).fit(module)
            breaks = {k.split("\n")[0]: v for k, v in counters["graph_break"].items()}
            got[compiled] = (gns, counters["stats"]["unique_graphs"], breaks)
        (eager, _, _), (comp, n_graphs, breaks) = got[False], got[True]
        ratio = comp.values.b_simple / eager.values.b_simple
        rows.append([name, f"{comp.coverage:.1%}", str(comp.values.skipped), f"{ratio:.6f}",
                     str(n_graphs), str(sum(breaks.values())),
                     ", ".join(f"{k} {v}" for k, v in breaks.items())])  # fmt: skip
    header = ["model", "coverage", "skipped", "B_simple compiled / eager", "graphs", "breaks",
              "by reason"]  # fmt: skip
    print(markdown_table(header, rows))


def compiled_costs(b: int, t: int, d: int, repeats: int) -> None:
    """The per-example norms' cost in compiled MoE blocks: taken (the forward's z and dz) and
    recomputed, against the compiled block alone."""
    import copy

    from lightning_gns.norms import moe
    from lightning_gns.norms.per_example import PerExampleNorms

    rows = []
    for kind, label in (("mixtral", "Mixtral-style: E=8, k=2, f=3.5d"),
                        ("qwen2_moe", "Qwen2-MoE-style: E=32, k=4, f=d/2, shared expert 2d"),
                        ("olmoe", "OLMoE-style: E=64, k=8, f=d/2")):  # fmt: skip
        torch._dynamo.reset()
        base = _init(Holder(hf_block(kind, d, "grouped_mm")))
        torch.manual_seed(1)
        x = torch.randn(b, t, d, requires_grad=True)
        r = torch.randn(b, t, d)
        runs: dict[str, Callable[[], float]] = {"plain": _compiled_plain(copy.deepcopy(base), x, r)}
        for mode in ("taken", "recomputed"):
            model = copy.deepcopy(base)
            norms = PerExampleNorms(model)
            norms.attach()
            norms.start_micro_batch(b)
            norms.start_check()
            (model(x) * r).sum().backward()  # the structural check, eagerly
            norms.close_micro_batch()
            model.zero_grad(set_to_none=True)
            if mode == "recomputed":
                for m in model.modules():
                    if isinstance(m.__dict__.get("_apply_gate"), moe.GateTap):
                        m.__dict__["_apply_gate"].verified = False
            runs[mode] = _compiled_step(model, norms, x, r, b)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(repeats + 2):
            for k, run in runs.items():
                got = run()
                if i >= 2:  # warm-up (the compilations)
                    times[k].append(got)
        plain = median(times["plain"])
        taken, again = median(times["taken"]), median(times["recomputed"])
        extra = [f"{(v - plain) / plain:.2f}" for v in (taken, again)]
        rows.append([f"{label}, grouped_mm, compiled", f"{plain * 1e3:.1f}", *extra])
    header = ["block", "compiled fwd+bwd (ms)", "norms: z, dz taken", "norms: z recomputed"]
    print(markdown_table(header, rows))
    print(f"\nB={b}, T={t}, width {d}, float32; extra time of the step over the compiled block "
          f"alone; median of {repeats} interleaved repeats")  # fmt: skip


def _compiled_plain(model: nn.Module, x: Tensor, r: Tensor) -> Callable[[], float]:
    compiled = torch.compile(model)
    return lambda: plain_step(compiled, x, r)


def _compiled_step(
    model: nn.Module, norms: Any, x: Tensor, r: Tensor, b: int
) -> Callable[[], float]:
    compiled = torch.compile(model)

    def step() -> float:
        t0 = time.perf_counter()
        norms.start_micro_batch(b)
        (compiled(x) * r).sum().backward()
        acc, _, bad = norms.close_micro_batch()
        model.zero_grad(set_to_none=True)
        spent = time.perf_counter() - t0
        assert bad is None and acc is not None and bool(torch.isfinite(acc).all()), bad
        return spent

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--graphs", action="store_true", help="compiled: graphs and breaks")
    ap.add_argument("--compiled", action="store_true", help="compiled blocks: the norms' cost")
    args = ap.parse_args()
    set_threads(args.threads, "cpu")
    if args.graphs:
        graphs()
        return
    if args.compiled:
        compiled_costs(args.batch, args.seq, args.width, args.repeats)
        return
    b, t, d = args.batch, args.seq, args.width
    cases: list[tuple[str, Callable[[], dict]]] = []
    for impl in ("eager", "grouped_mm"):
        for kind, label in (
            ("mixtral", "Mixtral-style: E=8, k=2, f=3.5d"),
            ("qwen2_moe", "Qwen2-MoE-style: E=32, k=4, f=d/2, shared expert 2d"),
            ("olmoe", "OLMoE-style: E=64, k=8, f=d/2"),
        ):
            make = lambda kind=kind, impl=impl: hf_block(kind, d, impl)  # noqa: E731
            cases.append((f"{label}, {impl}", lambda m=make: measure(m, b, t, d, args.repeats)))
    toy = lambda: ToyMoE(d, 7 * d // 2, 8, 2)  # noqa: E731
    cases.append(("ModuleList experts: E=8, k=2", lambda: measure(toy, b, t, d, args.repeats)))
    for f, label in ((7 * d, "dense SwiGLU, f=7d (Mixtral's active)"), (2 * d, "f=2d")):
        cases.append((label, lambda f=f: measure_dense(d, f, b, t, args.repeats)))
    rows = []
    for label, run in cases:
        got = run()
        shares = ", ".join(f"{k} {v / got['plain']:.2f}" for k, v in sorted(got["shares"].items()))
        rows.append(
            [
                label,
                f"{got['plain'] * 1e3:.1f}",
                f"{got['rules'] * 1e3:.1f}",
                f"{got['rules'] / got['plain']:.2f}",
                shares,
            ]
        )
    header = ["block", "fwd+bwd (ms)", "rules (ms)", "ratio", "by module (ratio)"]
    print(markdown_table(header, rows))
    print(
        f"\nB={b}, T={t}, width {d}, float32, {args.threads} thread(s); median of "
        f"{args.repeats} interleaved repeats"
    )


if __name__ == "__main__":
    main()
