"""lightning-gns: the gradient noise scale (critical batch size) for PyTorch Lightning."""

from lightning_gns.analyzer import GradientNoiseAnalyzer
from lightning_gns.callback import GradientNoiseScale
from lightning_gns.estimator import GNSEstimator, GNSValues
from lightning_gns.logs import read_metrics

__version__ = "0.1.0"

__all__ = [
    "GNSEstimator",
    "GNSValues",
    "GradientNoiseAnalyzer",
    "GradientNoiseScale",
    "__version__",
    "read_metrics",
]
