"""Shared pieces of the benchmark scripts: workloads, timing helpers, table printing."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import digits  # noqa: E402, F401  the standardised digits, as the tests use them


def quiet() -> None:
    """Silence Lightning's banner/info logs and the warnings that only add noise here."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GradientNoiseScale.*")
    warnings.filterwarnings("ignore", message=".*TF32.*")
    warnings.filterwarnings("ignore", message=".*performance drop.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="backpack")
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
    warnings.filterwarnings("ignore", category=FutureWarning)


def mlp(hidden: int = 256, seed: int = 0) -> nn.Module:
    """64 → hidden → hidden → 10 ReLU MLP for the digits."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels so that ``time.perf_counter()`` brackets real work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table with padded columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, rule, *body])


def set_threads(threads: int | None, device: str) -> None:
    """Intra-op CPU threads (None: torch's default).

    On a small shared machine, torch's OpenMP threads spin-wait for each other; when another
    process takes a core, a step can become ten times slower for as long as that lasts. One
    thread only loses its share of a core, which interleaving and medians can absorb.
    """
    if threads is not None and torch.device(device).type == "cpu":
        torch.set_num_threads(threads)


def describe_device(device: str) -> str:
    """A short description of where the benchmark runs."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"CPU ({os.cpu_count()} cores), {n} thread{'s' if n > 1 else ''}"
