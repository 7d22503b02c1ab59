"""LightningCLI with GradientNoiseScale configured from YAML.

python examples/cli.py fit --config configs/digits.yaml
python examples/cli.py fit --config configs/digits.yaml --config configs/gns_accumulation.yaml
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402


def main() -> None:
    LightningCLI(DigitsClassifier, DigitsDataModule)


if __name__ == "__main__":
    main()
