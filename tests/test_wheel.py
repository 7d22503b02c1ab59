"""The wheel a user installs: built with ``python -m build``, installed into a fresh virtual
environment with ``pip install --no-deps``, imported from there (not from this source tree)
and used for a short fit with the callback and a report."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FIT = textwrap.dedent(
    """
    import math, sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_gns
    from lightning_gns import GradientNoiseScale

    venv = Path(sys.prefix).resolve()
    assert venv != Path(sys.base_prefix).resolve(), "not inside the virtual environment"
    where = Path(lightning_gns.__file__).resolve()
    assert venv in where.parents, f"imported from {where}, not the venv {venv}"
    assert (where.parent / "py.typed").is_file()

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)
    gns = GradientNoiseScale()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[gns], logger=CSVLogger("logs"), log_every_n_steps=4,
        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Model(), data)
    assert gns.reads > 0 and gns.batch_size == 16
    assert math.isfinite(gns.b_simple_lower) and gns.b_simple_lower > 0
    print("fit ok", where)
    """
)


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_trains(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    dist = tmp_path / "dist"
    built = subprocess.run(  # the environment's setuptools (dev extra): no download
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("lightning_gns-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lightning_gns/py.typed", "lightning_gns/report/template.html"} <= names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = _venv_python(venv)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # torch, Lightning, pandas... come from this environment's site-packages (appended after
    # the venv's own, without running its .pth files: no editable install of this tree).
    Path(site, "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    work = tmp_path / "work"  # outside the repository: no ./lightning_gns to import by accident
    work.mkdir()
    (work / "fit.py").write_text(FIT)
    fit = subprocess.run(
        [str(python), "fit.py"], cwd=work, capture_output=True, text=True, timeout=600, env=env
    )
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
    assert "fit ok" in fit.stdout and str(venv.resolve()) in fit.stdout
    cli = venv / ("Scripts" if os.name == "nt" else "bin") / "lightning-gns"
    report = subprocess.run(
        [str(cli), "report", "logs", "--out", "report"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert (work / "report" / "report.html").is_file()  # the page's template is package data
