"""Fixtures; the helpers themselves live in tests/helpers.py."""

from __future__ import annotations

import pytest
from helpers import digits
from torch import Tensor


@pytest.fixture(scope="session")
def digits_data() -> tuple[Tensor, Tensor]:
    return digits()
