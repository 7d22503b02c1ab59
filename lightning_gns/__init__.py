"""lightning-gns: the gradient noise scale (critical batch size) for PyTorch Lightning."""

from typing import Any

from lightning_gns.adaptive import AdaptiveBatchSize, ResizableBatchSampler
from lightning_gns.analyzer import GradientNoiseAnalyzer
from lightning_gns.callback import GradientNoiseScale
from lightning_gns.estimator import GNSValues
from lightning_gns.host_sync import forbid_host_sync
from lightning_gns.meter import GradientNoiseMeter
from lightning_gns.probe import CriticalBatchProbe
from lightning_gns.tracker import GNSTracker

__version__ = "0.1.0"

__all__ = [
    "AdaptiveBatchSize",
    "CriticalBatchProbe",
    "GNSTracker",
    "GNSValues",
    "GradientNoiseAnalyzer",
    "GradientNoiseMeter",
    "GradientNoiseScale",
    "ResizableBatchSampler",
    "__version__",
    "forbid_host_sync",
    "read_metrics",
]


def __getattr__(name: str) -> Any:
    """``read_metrics`` needs pandas: imported when first used, not with the package."""
    if name == "read_metrics":
        from lightning_gns.report import read_metrics  # names the [report] extra if missing

        return read_metrics
    raise AttributeError(f"module 'lightning_gns' has no attribute {name!r}")
