"""The documentation cannot rot: docstring examples run as doctests, the Python snippets of
README.md and of the site's pages run on tiny data, and the site builds with warnings as
errors and renders in headless Chromium."""

from __future__ import annotations

import doctest
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from browser import dom, require_chromium
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = [  # modules whose public docstrings carry examples
    "lightning_gns.advice",
    "lightning_gns.adaptive.callback",
    "lightning_gns.analyzer",
    "lightning_gns.callback",
    "lightning_gns.meter",
    "lightning_gns.report.logs",
]
API = [
    "GradientNoiseScale",
    "AdaptiveBatchSize",
    "GradientNoiseAnalyzer",
    "GradientNoiseMeter",
    "read_metrics",
]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever an example writes stays in tmp_path
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0, f"{result.failed} example(s) of {name} failed (output above)"


def test_docstring_examples_are_google_examples_sections() -> None:
    """Griffe reads "Example:" as an admonition of prose (its ``>>>`` lines become nested
    quotes on the site) and "Examples:" as code: every doctest sits under "Examples:"."""
    wrong = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
        for path in sorted((ROOT / "lightning_gns").rglob("*.py"))
        for text in [path.read_text(encoding="utf-8")]
        for m in re.finditer(r"^\s*Example:\s*\n\s*>>>", text, flags=re.M)
    ]
    assert not wrong, f"write 'Examples:' (plural) above doctests: {wrong}"


class TinyModel(pl.LightningModule):
    """What the snippets call ``model``: a LightningModule that is also a plain classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=gen)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8, shuffle=True)


class TinyData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return _loader()


def snippets(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in PAGES if snippets(p)], ids=lambda p: p.name)
def test_python_snippets_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page's ```python blocks, in order, in one namespace holding a tiny ``model``,
    ``datamodule``, ``criterion`` and ``data_loader``."""
    monkeypatch.chdir(tmp_path)
    namespace = {
        "model": TinyModel(),
        "datamodule": TinyData(),
        "criterion": nn.CrossEntropyLoss(),
        "data_loader": _loader(),
    }
    for i, code in enumerate(snippets(path)):
        exec(compile(code, f"{path.name} snippet {i + 1}", "exec"), namespace)  # noqa: S102
    if "gns" in namespace:  # the usage snippet trained: the callback measured something
        assert namespace["gns"].reads > 0


def test_readme_is_one_page_that_links_only_inside_the_repository() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) < 15_000
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert not target.startswith(("http:", "https:", "/", "..")), target
        assert (ROOT / target.split("#")[0]).exists(), target
    for needle in ("make demo", "make test", "gns/b_simple_lower", "AdaptiveBatchSize", "report"):
        assert needle in text


def _mkdocs() -> list[str]:
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if exe is None:
        pytest.skip("mkdocs not installed (pip install -e '.[docs]')")
    return [exe]


def assert_examples_render_as_code(api: str) -> None:
    """Docstring examples are highlighted code with their ``>>>`` prompts, not Markdown quotes
    (a ``>>>`` line under "Example:" renders as three nested block quotes, ``__init__`` as a
    bold "init"), and no code block of the API page is empty."""
    assert "<blockquote" not in api, "a docstring example rendered as a block quote"
    assert "<strong>init</strong>" not in api, "__init__ rendered as bold 'init'"
    blocks = re.findall(r"<pre[^>]*>(.*?)</pre>", api, flags=re.S)
    texts = [re.sub(r"<[^>]+>", "", b).strip() for b in blocks]
    assert blocks and all(texts), "an empty code block on the API page"
    examples = re.findall(
        r'doc-section-title">Examples:</span></p>\s*<div class="highlight"><pre[^>]*>(.*?)</pre>',
        api,
        flags=re.S,
    )
    prompt = '<span class="gp">&gt;&gt;&gt; </span>'
    assert len(examples) >= len(API) and all(prompt in e for e in examples), len(examples)


@pytest.mark.slow
def test_the_site_builds_strictly_and_its_pages_render(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    build = subprocess.run(
        [*_mkdocs(), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    browser = require_chromium()
    pages = {
        "index.html": "lightning-gns",
        "usage/index.html": "What is logged",
        "report/index.html": "TensorBoard",
        "hard-regime/index.html": "Reading an unknown value",
        "overhead/index.html": "Overhead",
        "api/index.html": "API reference",
    }
    for page, heading in pages.items():
        text = dom(browser, site / page)
        title = re.search(r"<title>(.*?)</title>", text, flags=re.S)
        assert title and "lightning-gns" in title.group(1), page
        assert re.search(rf"<h[12][^>]*>[^<]*{re.escape(heading)}", text), (page, heading)
        assert 'class="md-nav' in text, page  # Material's navigation rendered
    api = dom(browser, site / "api" / "index.html")
    for name in API:
        assert re.search(rf'<h2[^>]*id="[^"]*{name}"', api), name
    for module in ("lightning_gns.advice", "lightning_gns.report"):
        assert f'id="{module}"' in api, module
    for section in ("Raises:", "Example"):
        assert section in api, section
    assert_examples_render_as_code(api)
    assert not re.search(r":(func|class|meth|attr|mod|data):`", api)  # roles became code
    images = [p.name for p in (site / "img").glob("*.png")]
    assert {"tensorboard_custom_scalars.png", "report.png", "api_example.png"} <= set(images)
