"""Every logged ``gns/...`` key, defined once (README's "What is logged" explains each)."""

from __future__ import annotations

PREFIX = "gns/"

B_SIMPLE = "gns/b_simple"
B_SIMPLE_SE = "gns/b_simple_se"
B_SIMPLE_LOWER = "gns/b_simple_lower"
B_SIMPLE_UPPER = "gns/b_simple_upper"
GRAD_NORM_SQ = "gns/grad_norm_sq"
GRAD_VARIANCE = "gns/grad_variance"
BATCH_SIZE = "gns/batch_size"
SMALL_BATCH_SIZE = "gns/small_batch_size"
OPTIMAL_BATCH_SIZE = "gns/optimal_batch_size"
BATCH_SIZE_MULTIPLE = "gns/batch_size_multiple"  # only with batch_size_multiple set
EFFICIENCY = "gns/efficiency"
COVERAGE = "gns/coverage"
SKIPPED_STEPS = "gns/skipped_steps"
STALE_STEPS = "gns/stale_steps"
WINDOW_STEPS = "gns/window_steps"

PRECONDITIONED_B_SIMPLE = "gns/preconditioned/b_simple"
PRECONDITIONED_LOWER = "gns/preconditioned/b_simple_lower"
PRECONDITIONED_UPPER = "gns/preconditioned/b_simple_upper"

# AdaptiveBatchSize
ACCUMULATE = "gns/accumulate"
MICRO_BATCH = "gns/micro_batch"  # AdaptiveBatchSize with a ResizableBatchSampler
LR_SCALE = "gns/lr_scale"
LR = "gns/lr"
BATCH_SIZE_CHANGE = "gns/batch_size_change"  # TensorBoard text
ERROR = "gns/error"  # TensorBoard text: why a run stopped (the report lists it)

# CriticalBatchProbe, at each probed step
B_CRIT_BRANCHED = "gns/b_crit_branched"
B_CRIT_BRANCHED_LOWER = "gns/b_crit_branched_lower"
B_CRIT_BRANCHED_UPPER = "gns/b_crit_branched_upper"
B_CRIT_BRANCHED_EXAMPLES = "gns/b_crit_branched_examples"  # the probe's examples, all ranks
B_CRIT_BRANCHED_SECONDS = "gns/b_crit_branched_seconds"  # its wall time


def layer_b_simple(module: str) -> str:
    """Per-layer B_simple of a module (``per_layer=True``)."""
    return f"gns/layer/{module}/b_simple"
