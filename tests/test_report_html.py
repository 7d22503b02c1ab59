"""Render report.html in headless Chromium: every embedded plot must decode and show.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; see tests/browser.py).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from browser import dom, require_chromium, run
from torch.utils.tensorboard import SummaryWriter

from lightning_gns.report import write_explore, write_report

pytestmark = pytest.mark.slow  # make test-fast leaves these out


@pytest.fixture(scope="module")
def chromium() -> Path:
    return require_chromium()


def _screenshot(browser: Path, page: Path, out: Path) -> np.ndarray:
    proc = run(
        browser,
        "--virtual-time-budget=5000",
        f"--screenshot={out}",
        "--window-size=1200,2000",
        page.as_uri(),
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    return mpimg.imread(out)


def _body_attrs(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


# The page has no script of its own: the test loads it in an iframe of a harness page and
# counts, from outside, the images that decoded (naturalWidth > 0).
_HARNESS = """<!DOCTYPE html><html><body data-loaded="none">
<iframe id="f" src="{src}" width="1200" height="2000"></iframe>
<script>
document.getElementById('f').addEventListener('load', function () {{
  var im = this.contentDocument.images, n = 0;
  for (var i = 0; i < im.length; i++) {{ if (im[i].complete && im[i].naturalWidth > 0) n++; }}
  document.body.setAttribute('data-loaded', n + '/' + im.length);
}});
</script></body></html>"""


def _decoded_images(browser: Path, page: Path) -> str:
    harness = page.with_name("harness-" + page.name)
    harness.write_text(_HARNESS.format(src=page.name), encoding="utf-8")
    proc = run(
        browser,
        "--allow-file-access-from-files",
        "--virtual-time-budget=5000",
        "--dump-dom",
        harness.as_uri(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _body_attrs(proc.stdout).get("data-loaded", "")


def _write_logs(root: Path) -> None:
    for name, batch in [("small", 16), ("large", 1024)]:
        writer = SummaryWriter(str(root / name))
        for step in range(0, 60, 3):
            b = 30 * math.exp(step / 40)
            writer.add_scalar("gns/b_simple", b, step)
            writer.add_scalar("gns/b_simple_se", 0.05 * b, step)
            writer.add_scalar("gns/batch_size", batch, step)
        writer.close()


def test_report_renders_its_plots(chromium: Path, tmp_path: Path) -> None:
    _write_logs(tmp_path / "logs")
    page = write_report(tmp_path / "logs", tmp_path / "report")
    text = dom(chromium, page)
    assert len(re.findall(r"<img\b", text)) == 3
    assert _decoded_images(chromium, page) == "3/3", "not every <img> decoded (naturalWidth > 0)"
    shot = _screenshot(chromium, page, tmp_path / "shot.png")
    assert shot.shape[0] >= 1000 and shot.shape[1] >= 1000
    assert float(np.var(shot[..., :3])) > 0, "screenshot is blank"


def test_explore_page_renders_its_plots(chromium: Path, tmp_path: Path) -> None:
    page = write_explore(16.07, None, tmp_path / "explore")
    assert _decoded_images(chromium, page) == "2/2"


def test_report_on_the_demos_logs_end_to_end(chromium: Path, tmp_path: Path) -> None:
    """`make demo` then `lightning-gns report runs/`: table, PNGs and an HTML page that renders."""
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    demo = subprocess.run(
        [sys.executable, str(root / "examples" / "demo.py"), "--root", "runs", "--epochs", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "final               : B_simple" in demo.stdout
    assert "tensorboard --logdir runs" in demo.stdout
    said = (demo.stdout + demo.stderr).splitlines()
    top = said.index("GradientNoiseScale summary")  # the callback's end-of-fit summary
    headline, advice_line = said[top + 1].strip(), said[top + 2].strip()
    assert any(line.startswith(f"final               : {headline}") for line in said)
    assert f"advice              : {advice_line}" in said  # the demo says what the callback said
    assert not re.search(r"\bnan\b", demo.stdout, flags=re.I)
    cli = subprocess.run(
        [sys.executable, "-m", "lightning_gns.report.cli", "report", "runs", "--out", "report"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "digits_b32x1" in cli.stdout and "recommended" in cli.stdout
    out = tmp_path / "report"
    assert {"noise_scale.png", "efficiency.png", "pareto.png", "report.html"} <= {
        p.name for p in out.iterdir()
    }
    assert _decoded_images(chromium, out / "report.html") == "3/3"
