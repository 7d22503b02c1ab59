"""Screenshots for the documentation: TensorBoard's Custom Scalars tab, the HTML report and an
example of the API reference.

Runs the small sweep of ``examples/sweep.py`` (each run logged to TensorBoard and CSV at once,
a run with only a lower bound, a run refused at fit start), writes ``lightning-gns report``'s
page, starts TensorBoard on localhost and takes headless-Chromium screenshots (Debian's
``chromium``) at 1400 px wide:

    .venv/bin/python docs/screenshots.py            # about 5 minutes on 2 CPU cores
    .venv/bin/python docs/screenshots.py --api      # only the API page (a few seconds)

writes ``docs/img/tensorboard_custom_scalars.png``, ``docs/img/report.png`` and
``docs/img/api_example.png`` (``GradientNoiseScale``'s example on the built site: highlighted
code with its ``>>>`` prompts).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.sweep import make_sweep  # noqa: E402
from lightning_gns.report import write_report  # noqa: E402

CHROMIUM = "chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def screenshot(url: str, out: Path, width: int, height: int, wait_ms: int = 30000) -> Path:
    """A PNG of ``url`` at ``width`` × ``height`` once ``wait_ms`` of virtual time passed."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.run(
            [
                shutil.which(CHROMIUM) or CHROMIUM,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={wait_ms}",
                f"--screenshot={out}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed on {url}: {proc.stderr[-2000:]}")
    return out


_MEASURE = """<script>addEventListener("load", () => {
  const title = [...document.querySelectorAll(".doc-section-title")]
    .find((e) => e.textContent.startsWith("Examples"));
  document.body.dataset.top = Math.round(title.getBoundingClientRect().top + scrollY);
});</script></body>"""


def api_screenshot(out: Path, width: int = 1400, height: int = 900) -> Path:
    """The first docstring example of the built API page (``GradientNoiseScale``'s), as
    Chromium draws it: the page is measured in a throw-away copy (where the "Examples:"
    title sits), then drawn tall enough to hold it and cropped around it."""
    import matplotlib.image as mpimg

    with tempfile.TemporaryDirectory(prefix="gns-site-") as tmp:
        site = Path(tmp) / "site"
        subprocess.run(
            [str(Path(sys.executable).parent / "mkdocs"), "build", "--site-dir", str(site)],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        )
        page = site / "api" / "index.html"
        probe = page.with_name("measure.html")
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _MEASURE, 1))
        dom = subprocess.run(
            [
                shutil.which(CHROMIUM) or CHROMIUM,
                *FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width},{height}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
        found = re.search(r'data-top="(\d+)"', dom)
        if found is None:
            raise RuntimeError("no 'Examples:' section on the API page")
        top = max(0, int(found.group(1)) - 120)
        full = screenshot(page.as_uri(), Path(tmp) / "full.png", width, top + height, 5000)
        mpimg.imsave(out, mpimg.imread(full)[top : top + height])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tensorboard(logdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start TensorBoard on a free localhost port; return the process and its URL once it
    answers."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            logdir.name,  # the runs' names in TensorBoard's sidebar start there
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=logdir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/custom_scalars/layout", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("tensorboard exited at start") from None
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("tensorboard did not answer within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where PNGs go")
    parser.add_argument("--logs", help="keep the sweep's logs here (default: a temp folder)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    parser.add_argument("--api", action="store_true", help="only the API reference's example")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(api_screenshot(out / "api_example.png"))
    if args.api:
        return
    with tempfile.TemporaryDirectory(prefix="gns-sweep-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp) / "sweep"
        if not logs.exists():
            make_sweep(logs, args.steps)
        page = write_report(logs, Path(tmp) / "report", progress=print, source="sweep")
        print(screenshot(page.as_uri(), out / "report.png", 1400, 1800, wait_ms=5000))
        proc, url = tensorboard(logs)
        try:
            shot = screenshot(
                f"{url}/#custom_scalars", out / "tensorboard_custom_scalars.png", 1400, 1000
            )
            print(shot)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
