"""Which source measures a model: per-example norms or micro-batches, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lightning_gns.norms import PerExampleNorms
from lightning_gns.norms.sites import coupled_modules, unrecognised_norm_layers
from lightning_gns.sources import MicroBatchSource, PerExampleSource, Source

SourceName = Literal["auto", "micro_batch", "per_example"]

MICRO_BATCH_HINT = (
    "set Trainer(accumulate_grad_batches>=2) or train on 2+ devices (DDP); the default "
    "source='auto' then measures between micro-batches"
)


@dataclass(frozen=True)
class Choice:
    """The source and, in words, why it was chosen (the end-of-fit summary says it)."""

    source: Source
    why: str


def choose_source(
    model: nn.Module,
    source: SourceName = "auto",
    layers: Literal["all", "norm"] = "all",
    several_gradients: bool = True,
    per_layer: bool = False,
    examples_per_batch: int | None = None,
    left_out: dict[str, str] | None = None,
) -> Choice:
    """The source for this model and set-up, or a ``ValueError`` that says what to do.

    ``auto`` takes per-example norms when dedicated rules cover every trainable parameter, when
    ``layers="norm"``, or when a step has no second gradient (``several_gradients`` False:
    one device, no accumulation); micro-batches otherwise. The rules also run inside a
    ``torch.compile`` graph (:mod:`lightning_gns.norms.compiled`); the torch.func fallback for
    layers without one does not. Per-example norms are refused where they are undefined
    (BatchNorm in train mode mixes the examples of a batch).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if source == "micro_batch":
        if not several_gradients:
            raise ValueError(
                "source='micro_batch' needs two gradients per step to compare: set "
                "Trainer(accumulate_grad_batches>1) or train on several devices (DDP), or use "
                "source='per_example' (the default 'auto' picks it)"
            )
        return Choice(MicroBatchSource(params), "source='micro_batch' was asked for")
    norms = PerExampleNorms(model, layers, per_layer, examples_per_batch)
    coupled = coupled_modules(model)
    generic = [site.label for site in norms.sites.values() if site.generic]
    # auto prefers the fast path: per-example norms when dedicated rules cover every parameter
    # (the torch.func fallback costs 2-4x its layer, 50x an LSTM); micro-batches otherwise.
    full = norms.coverage() >= 1.0 and not norms.left_out and not generic
    if source == "auto" and several_gradients and (coupled or (layers == "all" and not full)):
        why = (
            f"{coupled[0]} (BatchNorm in train mode) mixes the examples of a batch"
            if coupled
            else f"no per-example rule for {', '.join(generic[:3]) or 'some layers'}"
        )
        return Choice(MicroBatchSource(params), f"auto: {why}; measured between micro-batches")
    _refuse_per_example(model, norms, coupled, layers)
    if source == "per_example":
        why = "source='per_example' was asked for"
    elif layers == "norm":
        why = "auto: layers='norm' measures the normalization layers per example"
    elif full:
        why = "auto: per-example rules cover every trainable parameter"
    else:
        why = "auto: one gradient per step (one device, no accumulation), so per example"
    chosen = PerExampleSource(norms, per_layer, left_out)
    chosen.several_gradients = several_gradients
    return Choice(chosen, why)


def _refuse_per_example(
    model: nn.Module, norms: PerExampleNorms, coupled: list[str], layers: str
) -> None:
    if coupled:
        raise ValueError(
            f"per-example gradients are not defined for this model: {', '.join(coupled[:3])} "
            "(BatchNorm in train mode) mixes the examples of a batch. Measure between "
            f"micro-batches instead: {MICRO_BATCH_HINT}"
        )
    if not norms.sites and layers == "all":  # every parameter shared where no rule can sum it
        left = ", ".join(f"{k} ({v})" for k, v in sorted(norms.left_out.items())[:5])
        raise ValueError(
            f"per-example norms can cover none of the parameters (left out: {left}), and each "
            f"step has only one gradient: {MICRO_BATCH_HINT}"
        )
    if not norms.sites:
        odd = unrecognised_norm_layers(model)
        raise ValueError(
            "layers='norm' found no normalization layer with a per-example rule "
            "(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm and their subclasses)"
            + (f"; not recognised: {', '.join(odd[:5])}" if odd else "")
            + ". Use layers='all', or register a rule with lightning_gns.norms.register_norm"
        )
    bare = [site.label for site in norms.sites.values() if site.generic and not site.name]
    if bare and len(norms.sites) == 1:
        raise ValueError(
            f"the model's only parameters are its own ({bare[0]}: no layer holds them), so "
            "there is no layer whose per-example gradient a rule or torch.func can compute, and "
            f"each step has only one gradient: {MICRO_BATCH_HINT}; or put the parameters in a "
            "module (e.g. nn.Linear) that the forward calls"
        )
