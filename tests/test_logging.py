"""What a run writes: TensorBoard events (read with TensorBoard's reader), CSV, YAML configs."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers import Classifier, mlp, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gns import GradientNoiseScale

ROOT = Path(__file__).resolve().parents[1]
BOUNDS = ("gns/b_simple_lower", "gns/b_simple_upper")
KEYS = {
    "gns/b_simple",
    "gns/b_simple_se",
    "gns/b_simple_lower",
    "gns/b_simple_upper",
    "gns/small_batch_size",
    "gns/stale_steps",
    "gns/window_steps",
    "gns/grad_norm_sq",
    "gns/grad_variance",
    "gns/batch_size",
    "gns/optimal_batch_size",
    "gns/efficiency",
    "gns/coverage",
    "gns/skipped_steps",
}


def test_tensorboard_and_csv_loggers_get_the_gns_keys(tmp_path) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb")
    cs = CSVLogger(tmp_path, name="csv")
    cb = GradientNoiseScale(ema_decay=0.9, per_layer=True)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, logger=[tb, cs], log_every_n_steps=5),
        callbacks=[cb],
    )
    trainer.fit(Classifier(mlp(), batch_size=64))

    acc = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert KEYS <= tags
    assert {"gns/layer/model.0/b_simple", "gns/layer/model.2/b_simple"} <= tags
    steps = [e.step for e in acc.Scalars("gns/b_simple")]
    assert steps[:3] == [4, 9, 14]  # where Lightning logs self.log values (every 5 steps)
    assert acc.Scalars("gns/batch_size")[-1].value == 64
    # The custom-scalars layout groups the curves in TensorBoard's "Custom Scalars" tab.
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert content, "no custom-scalars layout in the event file"
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(next(iter(content)))[0].tensor_proto.string_val[0])
    charts = [c for cat in layout.category for c in cat.chart]
    margins = [[(s.value, s.lower, s.upper) for s in c.margin.series] for c in charts]
    assert [("gns/b_simple", "gns/b_simple_lower", "gns/b_simple_upper")] in margins
    # TensorBoard draws a category's multiline charts before its margin charts: the B_simple
    # margin chart is first on the tab only as the one chart of the first category.
    first = layout.category[0].chart
    assert len(first) == 1 and margins[0] == [("gns/b_simple", *BOUNDS)]
    for chart in charts:  # each Multiline regex is anchored and matches exactly one tag
        for pattern in chart.multiline.tag:
            assert pattern.startswith("^") and pattern.endswith("$"), pattern
            assert len([t for t in tags if re.search(pattern, t)]) == 1, pattern

    with open(Path(cs.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert KEYS <= set(rows[0])
    values = [float(r["gns/b_simple"]) for r in rows if r["gns/b_simple"]]
    assert values and values[-1] == cb.b_simple


class LogsLoss(Classifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def test_gns_values_share_the_rows_of_the_users_own_values(tmp_path) -> None:
    """metrics.csv: the gns/* values sit in the row of the user's self.log values (same step,
    epoch filled), so curves line up in CSV and TensorBoard."""
    cs = CSVLogger(tmp_path, name="csv")
    cb = GradientNoiseScale()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, logger=cs, log_every_n_steps=5), callbacks=[cb]
    )
    trainer.fit(LogsLoss(mlp(), batch_size=64))  # 29 steps per epoch
    with open(Path(cs.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    gns_rows = [r for r in rows if r["gns/batch_size"]]
    loss_steps = {r["step"] for r in rows if r["train_loss"]}
    assert len(gns_rows) >= 10
    for r in gns_rows[:-1]:  # the last read-out comes at the end of training, on its own
        assert r["train_loss"] and r["epoch"] != "", r
    assert {r["step"] for r in gns_rows[:-1]} <= loss_steps
    assert gns_rows[-1]["epoch"] != ""


@pytest.mark.slow  # make test-fast leaves it out (a real fit or subprocess)
def test_lightning_cli_configures_the_callback_from_yaml(tmp_path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "cli.py"),
        "fit",
        "--config",
        str(ROOT / "configs" / "digits.yaml"),
        "--config",
        str(ROOT / "configs" / "gns_accumulation.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--print_config",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lightning_gns.GradientNoiseScale" in out.stdout
    assert "source: micro_batch" in out.stdout and "ema_decay: 0.98" in out.stdout

    cmd.remove("--print_config")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    assert "gns/b_simple" in acc.Tags()["scalars"]


class _AtEpochEnd(pl.Callback):
    """What EarlyStopping reads at each epoch end (it runs after this one)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        self.seen.append({k: float(m[k]) for k in ("gns/optimal_batch_size", "gns/b_simple_upper")})


def test_early_stopping_reads_the_advice_while_b_simple_is_unknown(tmp_path) -> None:
    """README: gns/optimal_batch_size is readable by EarlyStopping. In the hard regime (a
    trained model, B_simple not yet known) it must still be a number: EarlyStopping's default
    check_finite=True would stop the run on a NaN."""
    from helpers import trained_mlp
    from lightning.pytorch.callbacks import EarlyStopping

    seen = _AtEpochEnd()
    stop = EarlyStopping(monitor="gns/optimal_batch_size", mode="max", patience=100)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, log_every_n_steps=20),
        callbacks=[GradientNoiseScale(), seen, stop],
    )
    trainer.fit(Classifier(trained_mlp(), lr=1e-3, batch_size=16))
    assert trainer.current_epoch == 2 and not trainer.should_stop  # ran every epoch
    assert not math.isfinite(seen.seen[0]["gns/b_simple_upper"])  # B_simple unknown then
    assert all(s["gns/optimal_batch_size"] >= 16 for s in seen.seen)  # a number, ≥ the batch
