"""lightning-gns: the gradient noise scale (critical batch size) for PyTorch Lightning."""

from lightning_gns.callback import GradientNoiseScale
from lightning_gns.estimator import GNSEstimator, GNSValues

__version__ = "0.1.0"

__all__ = ["GNSEstimator", "GNSValues", "GradientNoiseScale", "__version__"]
