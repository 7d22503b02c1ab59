"""Fixtures; the helpers themselves live in tests/helpers.py."""

from __future__ import annotations

import pytest
from helpers import digits
from torch import Tensor


@pytest.fixture(scope="session")
def digits_data() -> tuple[Tensor, Tensor]:
    return digits()


@pytest.fixture(autouse=True)
def compiler_stance_restored():  # noqa: ANN201
    """The structural check runs one micro-batch with torch.compile off; no test may leave it
    off (a user's later compiled code would silently run eagerly)."""
    yield
    from torch._dynamo import eval_frame

    assert eval_frame._stance.stance == "default", "torch.compile left in force_eager"
