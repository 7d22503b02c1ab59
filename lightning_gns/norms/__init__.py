"""Where squared gradient norms come from.

* :mod:`~lightning_gns.norms.micro_batch`: a tensor hook per parameter, each micro-batch's
  local gradient (and the preconditioned variant).
* :mod:`~lightning_gns.norms.per_example`: per-example norms from module hooks, built from
  :mod:`~lightning_gns.norms.sites` (what is hooked), :mod:`~lightning_gns.norms.site_hooks`
  (the hooks), :mod:`~lightning_gns.norms.rules` (one rule per layer type), the torch.func
  fallback (:mod:`~lightning_gns.norms.generic`), the routed Linear
  (:mod:`~lightning_gns.norms.simultaneous`), compiled taps (:mod:`~lightning_gns.norms.compiled`),
  shared positions (:mod:`~lightning_gns.norms.positions`) and the structural check
  (:mod:`~lightning_gns.norms.check`).
* :mod:`~lightning_gns.norms.probe`: how many examples the layers see.
"""

from lightning_gns.norms.micro_batch import MicroBatchNorms, WeightedMicroBatchNorms, squared_norm
from lightning_gns.norms.per_example import PerExampleNorms
from lightning_gns.norms.rules import (
    GRAD_SAMPLE_RULES,
    NORM_RULES,
    grad_sample_rule_for,
    norm_rule_for,
    register_grad_sample,
    register_norm,
)
from lightning_gns.norms.sites import NORM_LAYERS, Site, find_sites, trainable_parameters

__all__ = [
    "GRAD_SAMPLE_RULES",
    "NORM_LAYERS",
    "NORM_RULES",
    "MicroBatchNorms",
    "PerExampleNorms",
    "Site",
    "WeightedMicroBatchNorms",
    "find_sites",
    "grad_sample_rule_for",
    "norm_rule_for",
    "register_grad_sample",
    "register_norm",
    "squared_norm",
    "trainable_parameters",
]
