"""Acting on the noise scale: :class:`AdaptiveBatchSize` grows the batch as B_noise grows.

* :mod:`~lightning_gns.adaptive.callback`: the Lightning callback (its hooks and checkpoint);
* :mod:`~lightning_gns.adaptive.rules`: the growth rules, pure functions of one read-out;
* :mod:`~lightning_gns.adaptive.ladder`: the batches a run can take and the decision among them;
* :mod:`~lightning_gns.adaptive.changes`: deciding at a read-out, applying at a batch boundary;
* :mod:`~lightning_gns.adaptive.schedule`: when changes apply, kept for resume;
* :mod:`~lightning_gns.adaptive.per_step`: around each optimizer step (learning-rate multiplier,
  Adam's second moment, step time, the B_noise window);
* :mod:`~lightning_gns.adaptive.sampler`: :class:`ResizableBatchSampler`, a batch sampler whose
  size can change between steps.
"""

from lightning_gns.adaptive.callback import AdaptiveBatchSize
from lightning_gns.adaptive.sampler import ResizableBatchSampler

__all__ = ["AdaptiveBatchSize", "ResizableBatchSampler"]
