"""What torch.compile meets: graph breaks caused by this package's hooks (CPU is enough).

``torch._dynamo.explain`` on the tiny GPT of ``examples/tiny_gpt.py`` (2 layers), with no
hooks, with the per-example source's module hooks (short context: every Linear in the Gram
form; long context: every Linear on the simultaneous route; tied embeddings) and with the
micro-batch source's parameter hooks; prints the graph count, the breaks and their reasons.

    python benchmarks/compile_check.py
"""

from __future__ import annotations

import warnings

import torch
import torch._dynamo as dynamo
from common import quiet
from tiny_gpt import TinyGPT

from lightning_gns.norms import MicroBatchNorms, PerExampleNorms


def explain(model: torch.nn.Module, x: torch.Tensor, label: str) -> None:
    dynamo.reset()
    out = dynamo.explain(model)(x)
    print(f"{label}: {out.graph_count} graph(s), {out.graph_break_count} graph break(s)")
    reasons = sorted({str(r.reason).splitlines()[0][:100] for r in out.break_reasons})
    for reason in reasons[:5]:
        print(f"    {reason}")


def main() -> None:
    quiet()
    warnings.filterwarnings("ignore")
    for t, width, tie in ((16, 32, False), (64, 16, True)):
        torch.manual_seed(0)
        model = TinyGPT(50, seq_len=t, width=width, n_layers=2, n_heads=2, tie_weights=tie)
        x = torch.randint(0, 50, (8, t))
        print(f"TinyGPT T={t}, width {width}{', tied embeddings' if tie else ''}:")
        explain(model, x, "  no hooks")
        per_example = PerExampleNorms(model)
        per_example.attach()
        per_example.start_micro_batch(8)
        explain(model, x, "  per-example source (module hooks)")
        per_example.detach()
        micro = MicroBatchNorms([p for p in model.parameters() if p.requires_grad])
        micro.attach()
        explain(model, x, "  micro-batch source (parameter hooks)")
        micro.detach()


if __name__ == "__main__":
    main()
