"""Fixtures; the helpers themselves live in tests/helpers.py."""

from __future__ import annotations

import pytest
from helpers import digits, exact_gns, mlp


@pytest.fixture(scope="session")
def truth() -> dict[str, float]:
    """The exact |G|², tr(Σ) and B_simple of the frozen digits MLP over all 1797 digits."""
    x, y = digits()
    return exact_gns(mlp(), x, y)


@pytest.fixture(autouse=True)
def compiler_stance_restored():  # noqa: ANN201
    """The structural check runs one micro-batch with torch.compile off; no test may leave it
    off (a user's later compiled code would silently run eagerly)."""
    yield
    from torch._dynamo import eval_frame

    assert eval_frame._stance.stance == "default", "torch.compile left in force_eager"
