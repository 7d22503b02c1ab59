"""CriticalBatchProbe: the branched critical batch size measured inside the user's run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import IterableDataset, default_collate
from typing_extensions import override

from lightning_gns import host_sync, keys
from lightning_gns._compat import SuggestsArguments
from lightning_gns.adaptive.rules import LRScaling, lr_scale
from lightning_gns.callback import GradientNoiseScale
from lightning_gns.norms.preconditioner import GRADIENT_SCALES, keeps_second_moment
from lightning_gns.probe import branches
from lightning_gns.probe.branches import ProbeResult
from lightning_gns.probe.restore import Snapshot, quiet
from lightning_gns.probe.runner import Draws, Runner, run_branches
from lightning_gns.publish import publish, tensorboard_layout

EXACT_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed", "bf16-true")


class CriticalBatchProbe(SuggestsArguments, Callback):
    r"""B_crit(branched) at chosen optimizer steps, measured on the run itself and undone.

    At each step of ``at_steps`` (and every ``every_n_steps``), from the model and optimizer
    state at that step, one short branch per factor k trains at k·B (B: the run's examples
    per optimizer step) on the same E examples with the rate × the rule ``AdaptiveBatchSize``
    uses (√k for optimizers with a second moment, k otherwise), and is scored on the same
    held-back batches. B_crit(branched) is the largest k·B whose loss stays within
    ``tolerance`` of the k = 1 branch's (:mod:`lightning_gns.probe.branches`); its 95%
    interval is a paired bootstrap over the evaluation batches (evaluation noise, not the
    data order). Then the model, optimizer, schedulers, gradients and every random generator
    are restored exactly: the run goes on bit for bit as without the probe. The branches draw
    from the train dataset with a private generator; the user's DataLoader never moves.

    Logs ``gns/b_crit_branched`` with ``_lower``, ``_upper``, ``_examples`` and ``_seconds``
    at the probed step, and at the end of fit prints one line per probe beside
    ``GradientNoiseScale``'s B_simple, and the probe's examples as a fraction of the run's.

    Args:
        at_steps: optimizer steps to probe at (after the step).
        every_n_steps: also probe every so many optimizer steps.
        factors: the k of the branches; 1 is the reference.
        examples: E, examples per branch (rounded up to a multiple of the largest branch's
            batch); default: about 4% of the run's planned examples per probe, split over the
            branches, 2 to 32 steps of the largest branch.
        tolerance: relative loss tolerance against the k = 1 branch.
        eval_batches: held-back micro-batches the branches are scored on (drawn once).
        repeats: data orders per branch; with more than one the bootstrap resamples them too
            (the interval then holds the data order's noise, not only the evaluation's).
        lr_scaling: ``auto``, ``sqrt``, ``linear``, ``adascale`` or ``none``
            (:func:`~lightning_gns.adaptive.rules.lr_scale`).
        dataset: a map-style dataset to branch from (default: the train loader's).
        collate_fn: how to collate it (default: the train loader's).
        seed: the private generator's seed.

    Raises:
        ValueError: at construction, an argument out of range.
        RuntimeError: at fit start, what it cannot branch or restore exactly, with the fix.

    Examples:
        >>> from lightning_gns import CriticalBatchProbe
        >>> probe = CriticalBatchProbe(at_steps=[2000], factors=(1, 2, 4, 8, 16))
        >>> probe.factors, probe.results
        ((1, 2, 4, 8, 16), [])
    """

    def __init__(
        self,
        at_steps: Sequence[int] = (),
        every_n_steps: int | None = None,
        factors: Sequence[int] = (1, 2, 4, 8),
        examples: int | None = None,
        tolerance: float = 0.01,
        eval_batches: int = 8,
        repeats: int = 1,
        lr_scaling: LRScaling = "auto",
        dataset: Any = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        branches.check_arguments(locals())
        self.at_steps = frozenset(at_steps)
        self.every_n_steps, self.factors = every_n_steps, branches.check_factors(factors)
        self.examples, self.tolerance, self.eval_batches = examples, tolerance, eval_batches
        self.lr_scaling, self.seed, self.repeats = lr_scaling, seed, repeats
        self.dataset, self.collate_fn = dataset, collate_fn
        self.results: list[ProbeResult] = []
        self.run_examples = 0  # examples the run trained on (all ranks)
        self._micro = 0  # the largest micro-batch seen
        self._seen = -1  # the last optimizer step seen
        self._draws: Draws | None = None
        self._runner: Runner | None = None

    @property
    def spent(self) -> int:
        """Examples all probes used, training and evaluation, all ranks."""
        return sum(r.spent for r in self.results)

    # -- refusals ------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = "CriticalBatchProbe"
        if not pl_module.automatic_optimization:
            raise RuntimeError(f"{name}: manual optimization steps on its own schedule, so "
                               "the probe cannot branch it; use automatic optimization or "
                               "remove the probe")  # fmt: skip
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(
            strategy, (SingleDeviceStrategy, DDPStrategy)
        ):
            raise RuntimeError(f"{name}: the {type(strategy).__name__} shards or owns the "
                               "state, which the probe cannot restore exactly; probe with one "
                               "device or strategy='ddp'")  # fmt: skip
        if str(trainer.precision) not in EXACT_PRECISIONS:
            raise RuntimeError(f"{name}: precision {trainer.precision!r} scales the loss with "
                               "a GradScaler the branches would not reproduce; use '32-true' "
                               "or 'bf16-mixed'")  # fmt: skip

        for logger in trainer.loggers:  # after GradientNoiseScale's (setup): this one is read
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_custom_scalars(layout())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        dataset = self.dataset if self.dataset is not None else getattr(loader, "dataset", None)
        collate = self.collate_fn or getattr(loader, "collate_fn", None)
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        ):
            raise RuntimeError("CriticalBatchProbe: the train loader's data is not a map-style "
                               "dataset (an IterableDataset or a plain iterable), so the probe "
                               "cannot draw branch batches without moving it; pass "
                               "CriticalBatchProbe(dataset=..., collate_fn=...) a map-style "
                               "dataset of the same examples")  # fmt: skip
        if collate is None:
            collate = default_collate
        self._runner = Runner(trainer, pl_module, dataset, collate)

    # -- when ----------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        try:
            size = int(extract_batch_size(batch))
        except Exception:  # an odd batch: keep the size seen before
            size = self._micro
        self._micro = max(self._micro, size)
        self.run_examples += size * trainer.world_size
        step = trainer.global_step
        if step == self._seen:
            return
        self._seen = step
        every = self.every_n_steps
        if step > 0 and (step in self.at_steps or (every and step % every == 0)):
            with host_sync.allowed():
                self.probe(trainer, pl_module)

    # -- the probe -----------------------------------------------------------------------
    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeResult | None:
        """Branch now, restore, log; None (with a warning) when it could not measure."""
        runner, step, start = self._runner, trainer.global_step, time.perf_counter()
        if runner is None or self._micro < 1:
            return None
        accumulate, world = trainer.accumulate_grad_batches, trainer.world_size
        batch = self._micro * accumulate * world
        if self._draws is None:  # the held-back batches, fixed once
            held = min(self.eval_batches * self._micro, len(runner.dataset) // 2)
            self._draws = Draws(len(runner.dataset), held, self.seed, self._micro)
        held = len(self._draws.held)
        e = branches.branch_examples(self.examples, self.factors, batch,
                                     planned(trainer, batch), held, self.repeats)  # fmt: skip
        optimizer = trainer.optimizers[0]
        gns = next((c for c in trainer.callbacks if isinstance(c, GradientNoiseScale)), None)  # type: ignore[attr-defined]
        b_simple = float(gns.b_simple) if gns is not None else math.nan
        scales = rate_scales(self.lr_scaling, self.factors, trainer, batch, b_simple)
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        snapshot: Snapshot | None = None
        try:  # the copy too: out of memory there must not end the run
            snapshot = Snapshot.take(pl_module, optimizer, schedulers)
            with quiet(pl_module, optimizer):
                per_batch = run_branches(runner, snapshot, self._draws, step, self.factors,
                                         self._micro, accumulate, e, scales,
                                         self.repeats)  # fmt: skip
        except Exception as error:  # the run must go on: restored, said, nothing logged
            return skipped(snapshot, step, error)
        losses = {k: math.fsum(map(math.fsum, v)) / sum(map(len, v)) for k, v in per_batch.items()}
        lower, upper = branches.bootstrap(per_batch, batch, self.tolerance, seed=self.seed)
        spent = self.repeats * len(self.factors) * (e + held)
        result = ProbeResult(step, batch, e, losses, branches.b_crit(losses, batch, self.tolerance),
                             lower, upper, spent, time.perf_counter() - start, b_simple,
                             scales, self.repeats)  # fmt: skip
        self.results.append(result)
        publish(trainer, None, {
            keys.B_CRIT_BRANCHED: result.b_crit, keys.B_CRIT_BRANCHED_LOWER: lower,
            keys.B_CRIT_BRANCHED_UPPER: upper, keys.B_CRIT_BRANCHED_EXAMPLES: float(spent),
            keys.B_CRIT_BRANCHED_SECONDS: result.seconds,
        })  # fmt: skip
        rank_zero_info(branches.line(result))
        share = self.spent / planned(trainer, batch)
        if share > branches.WARN_SHARE:
            rank_zero_warn(f"CriticalBatchProbe: the probes so far used {share:.0%} of the "
                           "run's planned examples (a short run for these factors); pass "
                           "fewer factors, examples=... or eval_batches=...")  # fmt: skip
        return result

    # -- the end -------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for result in self.results:
            rank_zero_info(branches.line(result))
        if self.results:
            rank_zero_info(branches.cost_line(self.spent, self.run_examples))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": [asdict(r) for r in self.results], "run_examples": self.run_examples,
                "seen": self._seen}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = [ProbeResult(**r) for r in state_dict.get("results", [])]
        self.run_examples = int(state_dict.get("run_examples", 0))
        self._seen = int(state_dict.get("seen", -1))  # resumed at a probed step: not again


def skipped(snapshot: Snapshot | None, step: int, error: Exception) -> ProbeResult | None:
    """A probe that failed: the state restored (if it was copied), a warning, no result."""
    if snapshot is not None:
        snapshot.restore()
    rank_zero_warn(f"CriticalBatchProbe: the probe at step {step:,} failed and was skipped "
                   f"({type(error).__name__}: {error}); the run continues unchanged")  # fmt: skip
    return None


def rate_scales(
    scaling: str, factors: Sequence[int], trainer: pl.Trainer, batch: int, b_simple: float
) -> dict[int, float]:
    """Each branch's rate multiplier: the rule's (:func:`~lightning_gns.adaptive.rules.lr_scale`,
    ``auto`` as ``AdaptiveBatchSize`` reads it), times AdaptiveBatchSize's own now (its LR hook
    is silenced in the branches)."""
    if scaling == "auto":
        scaling = (
            "sqrt" if keeps_second_moment(trainer.optimizers[0], GRADIENT_SCALES) else "linear"
        )
    base = 1.0
    for c in trainer.callbacks:  # type: ignore[attr-defined]
        if type(c).__name__ == "AdaptiveBatchSize":
            base = float(c.lr_scale)
    return {k: base * lr_scale(scaling, k * batch, batch, b_simple) for k in factors}


def planned(trainer: pl.Trainer, batch: int) -> float:
    """The run's planned examples (inf when its length is not known)."""
    try:
        return float(trainer.estimated_stepping_batches) * batch
    except Exception:  # no length known
        return math.inf


def layout() -> dict[str, dict[str, list[Any]]]:
    """GradientNoiseScale's custom-scalars layout and a category for the probe: B_crit
    (branched) with its interval, and B_simple and B_crit on one chart."""
    return {
        **tensorboard_layout(),
        "critical batch (branched)": {
            "B_crit (branched) with its 95% interval": [
                "Margin",
                [keys.B_CRIT_BRANCHED, keys.B_CRIT_BRANCHED_LOWER, keys.B_CRIT_BRANCHED_UPPER],
            ],
            "B_simple and B_crit (branched)": [
                "Multiline",
                [f"^{keys.B_SIMPLE}$", f"^{keys.B_CRIT_BRANCHED}$"],
            ],
        },
    }
