"""Headless Chromium (Debian's ``chromium``) for the tests that render pages.

A missing browser skips those tests, unless the CI environment variable is set: then it fails.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_chromium() -> Path:
    """The browser, or skip (fail under CI) when it is not installed."""
    if not CHROMIUM.exists():
        if in_ci():
            pytest.fail(f"{CHROMIUM} is missing and CI is set: apt-get install -y chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); CI not set")
    return CHROMIUM


def run(browser: Path, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [str(browser), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )


def dom(browser: Path, page: Path, *args: str) -> str:
    """The DOM after the page's scripts ran (``--dump-dom``)."""
    proc = run(browser, "--virtual-time-budget=5000", *args, "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
