"""Where squared gradient norms come from: parameter hooks and per-example layer rules."""

from lightning_gns.norms.hooks import (
    NORM_LAYERS,
    MicroBatchNorms,
    PerExampleNorms,
    squared_norm,
    trainable_parameters,
)
from lightning_gns.norms.rules import (
    GRAD_SAMPLE_RULES,
    NORM_RULES,
    grad_sample_rule_for,
    norm_rule_for,
    register_grad_sample,
    register_norm,
)

__all__ = [
    "GRAD_SAMPLE_RULES",
    "NORM_LAYERS",
    "NORM_RULES",
    "MicroBatchNorms",
    "PerExampleNorms",
    "grad_sample_rule_for",
    "norm_rule_for",
    "register_grad_sample",
    "register_norm",
    "squared_norm",
    "trainable_parameters",
]
