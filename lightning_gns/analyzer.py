"""GradientNoiseAnalyzer: "what batch size should I use?" for a plain PyTorch model.

It drives the same per-example source (:mod:`lightning_gns.sources`) and the same tracker
(:mod:`lightning_gns.tracker`) as the Lightning callback over a data loader, and leaves the
model exactly as it found it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn

from lightning_gns import advice
from lightning_gns._compat import DROPOUT
from lightning_gns.driver import StepDriver
from lightning_gns.norms.sites import coupled_modules
from lightning_gns.publish import decide
from lightning_gns.records import MODEL, SkipStep, Units
from lightning_gns.sources import PerExampleSource, choose_source
from lightning_gns.tracker import GNSTracker

_REDUCTIONS = ("mean", "sum", "batchmean")


class GradientNoiseAnalyzer:
    """Estimate the gradient noise scale B_simple = tr(Σ)/|G|² from a few batches.

    Each batch gives per-example gradient norms (B_small = 1) and the batch gradient
    (B_big = batch size); the unbiased |G|² and tr(Σ) are averaged over batches and
    B_simple is their ratio, with a delta-method standard error.

    Args:
        model: a ``nn.Module``; it is not changed (parameters, ``.grad``, buffers, train/eval
            mode and the RNG state are restored).
        criterion: ``loss = criterion(model(inputs), targets)`` with a mean (default) or sum
            reduction over examples, e.g. ``nn.CrossEntropyLoss()``.
        loss_reduction: ``"mean"`` or ``"sum"``, how ``criterion`` reduces over examples;
            ``None``: its ``reduction`` attribute, else the mean (a plain function that sums
            needs ``"sum"``).
        data_loader: yields ``(inputs, targets)`` batches with the batch on dim 0.
        layers: ``"all"`` registered layer types or ``"norm"`` (normalization layers only).
        train_mode: put the model in train mode while analysing (dropout on, as in training);
            ``False`` for eval mode, ``None`` to keep the modes it has.
        verbose: print progress and a summary.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``criterion`` is not callable.
        ValueError: a criterion with ``reduction="none"``, a model without trainable
            parameters; in :meth:`analyze`, an empty loader, batches that are not
            ``(inputs, targets)`` pairs, or a model whose examples interact (BatchNorm in
            train mode), each with the fix.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_gns import GradientNoiseAnalyzer
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 8, generator=gen)
        >>> loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> before = model[0].weight.clone()
        >>> results = GradientNoiseAnalyzer(model, nn.CrossEntropyLoss(), loader,
        ...     verbose=False).analyze(num_batches=10)
        >>> results["num_examples"], results["current_batch_size"], results["coverage"]
        (160, 16, 1.0)
        >>> lower, upper = results["confidence_interval"]
        >>> bool(lower <= upper) and torch.equal(before, model[0].weight)  # model unchanged
        True
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[Any, Any], Tensor],
        data_loader: Iterable[Any],
        layers: Literal["all", "norm"] = "all",
        train_mode: bool | None = True,
        verbose: bool = True,
        loss_reduction: Literal["mean", "sum"] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(criterion):
            raise TypeError("criterion must be callable as criterion(model(inputs), targets)")
        if loss_reduction not in (None, "mean", "sum"):
            raise ValueError(
                f"loss_reduction must be 'mean', 'sum' or None, got {loss_reduction!r}"
            )
        if train_mode not in (None, True, False):
            raise ValueError(f"train_mode must be True, False or None, got {train_mode!r}")
        reduction = getattr(criterion, "reduction", loss_reduction or "mean")
        if loss_reduction is not None and reduction not in (loss_reduction, "batchmean"):
            raise ValueError(
                f"loss_reduction={loss_reduction!r} but the criterion's reduction is "
                f"{reduction!r}: leave loss_reduction out (the criterion's is used)"
            )
        if reduction == "none":
            raise ValueError(
                "criterion has reduction='none'; pass one with reduction='mean' or 'sum' "
                "(e.g. nn.CrossEntropyLoss()) so each example's share of the gradient is known"
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"criterion reduction {reduction!r} has no per-example form")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no parameters that require grad")
        self.model = model
        self.criterion = criterion
        self.data_loader = data_loader
        self.layers = layers
        self.train_mode = train_mode
        self.verbose = verbose
        self.reduction = "sum" if reduction == "sum" else "mean"

    def analyze(self, num_batches: int = 30) -> dict[str, Any]:
        """Run ``num_batches`` batches (forward and backward, no optimizer step).

        Returns a dict with ``gradient_noise_scale`` (B_simple; NaN while not known: |G|² is
        not significantly above zero, and the interval's lower end bounds it),
        ``gradient_noise_scale_se``, ``confidence_interval`` (95%, Fieller), ``known`` (B_simple
        has a value), ``precise`` (the interval spans at most 1.5×: enough for advice),
        ``optimal_batch_size`` (None unless precise), ``grow_to_batch_size`` (only a lower
        bound, above the batch used: grow to at least this; else None), ``advice`` (the
        sentence the callback prints, :func:`lightning_gns.advice.decide`),
        ``current_batch_size``, ``efficiency`` (fraction; 1.0 = optimal; NaN unless precise),
        ``mean_gradient_norm`` (|G|),
        ``grad_norm_sq`` (|G|²), ``gradient_variance`` (tr(Σ)), ``num_batches``,
        ``num_examples``, ``coverage`` and ``left_out``.
        """
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
        state = _ModelState(self.model)
        try:
            return self._analyze(num_batches)
        finally:
            state.restore()

    def _analyze(self, num_batches: int) -> dict[str, Any]:
        model = self.model
        device = next(model.parameters()).device
        if self.train_mode is not None:
            model.train(self.train_mode)
        self._zero(model)
        units = Units(1, "sum" if self.reduction == "sum" else "mean")  # only the reduction
        driver: StepDriver | None = None
        self._say("📊 Analyzing Gradient Noise Scale...")
        sizes: list[int] = []
        try:
            for i, batch in enumerate(_first(self.data_loader, num_batches)):
                inputs, targets = move_data_to_device(_split(batch), device)
                size = _batch_size(inputs)
                if driver is None:  # first batch: can examples be told apart? then the check
                    _check_independent(self._loss, self.reduction, model, inputs, targets, size)
                    driver = self._driver(device)
                    self._step(driver, inputs, targets, units)  # the structural check
                self._step(driver, inputs, targets, units)
                sizes.append(size)
                self._progress(i + 1, num_batches)
        finally:
            if driver is not None:
                driver.detach()
        if driver is None:
            raise ValueError("the data loader is empty: it yielded no batch")
        assert isinstance(driver.source, PerExampleSource)
        return self._results(driver.tracker, sizes, driver.source)

    def _driver(self, device: torch.device) -> StepDriver:
        coupled = coupled_modules(self.model)
        if coupled:
            raise ValueError(
                f"examples interact in {', '.join(coupled[:3])} (BatchNorm in train mode), so "
                "per-example gradients are not defined; pass train_mode=False (eval mode uses "
                "the running statistics)"
            )
        try:
            choice = choose_source(self.model, "per_example", self.layers, several_gradients=False)
        except ValueError as err:
            raise ValueError(f"cannot analyze this model: {err}") from None
        choice.source.attach()
        tracker = GNSTracker(running_mean=True, device=device)  # every batch weighs the same
        return StepDriver(choice.source, tracker, lambda key, msg: None, _batch_size, strict=True)

    def _step(self, driver: StepDriver, inputs: Any, targets: Any, units: Units) -> None:
        """One forward and backward, recorded by the driver (the first: the structural check)."""
        driver.start_micro_batch(inputs)
        self._backward(inputs, targets)
        driver.end_micro_batch(units.reduction)
        try:
            driver.end_step(units)
        except SkipStep as skip:
            raise ValueError(f"cannot use per-example norms on this model: {skip.reason}") from None
        finally:
            self._zero(self.model)

    def _progress(self, done: int, total: int) -> None:
        """One line per tenth of the batches (a log file gets lines, not carriage returns)."""
        if self.verbose and (done in (1, total) or done % max(1, total // 10) == 0):
            print(f"   Collecting gradients: {done}/{total}", flush=True)

    def _results(self, tracker: GNSTracker, sizes: list[int], source: PerExampleSource) -> dict:
        v = tracker.read()[MODEL]
        current = getattr(self.data_loader, "batch_size", None) or max(sizes)
        a = decide(v, float(current))  # the callback's advice, from the same function
        out = {
            "gradient_noise_scale": a.b_simple,
            "gradient_noise_scale_se": v.b_simple_se,
            "confidence_interval": (v.b_simple_lower, v.b_simple_upper),
            "known": a.known,
            "precise": a.kind == "recommend",
            "optimal_batch_size": a.recommended,
            "grow_to_batch_size": a.grow_to,
            "advice": a.sentence(),
            "current_batch_size": int(current),
            "efficiency": a.efficiency,
            "mean_gradient_norm": math.sqrt(v.grad_norm_sq) if v.grad_norm_sq > 0 else 0.0,
            "grad_norm_sq": v.grad_norm_sq,
            "gradient_variance": v.grad_variance,
            "num_batches": len(sizes),
            "num_examples": sum(sizes),
            "coverage": source.norms.coverage(),
            "left_out": dict(source.norms.left_out),
        }
        for line in summary_lines(a):
            self._say(line)
        return out

    def _loss(self, inputs: Any, targets: Any) -> Tensor:
        out = self.model(*inputs) if isinstance(inputs, (list, tuple)) else self.model(inputs)
        return self.criterion(out, targets)

    def _backward(self, inputs: Any, targets: Any) -> None:
        loss = self._loss(inputs, targets)
        if loss.dim() != 0:
            raise ValueError("criterion must return a scalar loss (reduction 'mean' or 'sum')")
        loss.backward()

    @staticmethod
    def _zero(model: nn.Module) -> None:
        for p in model.parameters():
            p.grad = None

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)


def summary_lines(a: advice.Advice) -> list[str]:
    """What :meth:`GradientNoiseAnalyzer.analyze` prints at the end (``verbose``)."""
    lines = [f"\nGradient Noise Scale: {a.headline()}", f"Advice: {a.sentence()}"]
    if a.kind != "recommend":
        lines.append("Analyze more batches for a tighter interval.")
    return lines


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("each batch must be an (inputs, targets) pair")


def _batch_size(inputs: Any) -> int:
    try:
        size = int(extract_batch_size(inputs))
    except Exception:  # noqa: BLE001 - Lightning's inference found no tensor
        raise ValueError(
            "inputs must be a tensor (or a collection of tensors) with the batch on dim 0"
        ) from None
    if size < 2:
        raise ValueError(
            "batch size 1 gives no second example to compare with: use batch_size >= 2"
        )
    return size


def _check_independent(
    loss: Callable[[Any, Any], Tensor],
    reduction: str,
    model: nn.Module,
    inputs: Any,
    targets: Any,
    size: int,
) -> None:
    """The loss of a batch must be the mean (or sum) of the losses of its two halves."""
    half = size // 2
    with torch.no_grad(), _dropout_off(model):
        rng = torch.get_rng_state()
        whole = loss(inputs, targets).double()
        losses = []
        for lo, hi in ((0, half), (half, size)):
            torch.set_rng_state(rng)
            losses.append(loss(_slice(inputs, lo, hi), _slice(targets, lo, hi)))
        torch.set_rng_state(rng)
    # a loss in bfloat16 or float16 is rounded to its own precision
    rtol = (
        max(1e-3, 4 * torch.finfo(losses[0].dtype).eps) if losses[0].is_floating_point() else 1e-3
    )
    first, second = (x.double() for x in losses)
    total, mean = first + second, (half * first + (size - half) * second) / size
    expect, other = (total, mean) if reduction == "sum" else (mean, total)
    if not torch.isclose(whole, expect, rtol=rtol, atol=1e-6):
        if torch.isclose(whole, other, rtol=rtol, atol=1e-6):
            swap = "mean" if reduction == "sum" else "sum"
            raise ValueError(
                f"the criterion's batch loss is the {swap} of per-example losses, not the "
                f"{reduction} ({float(whole):.6g} = {float(other):.6g}): pass "
                f"loss_reduction={swap!r}"
            )
        raise ValueError(
            f"the criterion's batch loss is not the {reduction} of per-example losses "
            f"({float(whole):.6g} vs {float(expect):.6g}): examples interact (e.g. BatchNorm "
            "in train mode, or a batch-level loss), so per-example gradients are not defined; "
            "for BatchNorm pass train_mode=False (eval mode uses its running statistics)"
        )


def _first(loader: Iterable[Any], n: int) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


@contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    """Dropout draws a new mask per call (it does not couple examples): switch it off while
    comparing a batch's loss with its halves', so only real coupling is reported."""
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT)]
    modes = [m.training for m in dropouts]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(dropouts, modes, strict=True):
            m.train(mode)


def _slice(obj: Any, lo: int, hi: int) -> Any:
    if isinstance(obj, Tensor):
        return obj[lo:hi]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(o, lo, hi) for o in obj)
    return obj


class _ModelState:
    """Everything analysis may touch: parameters, .grad, buffers, modes, RNG."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.grads = {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        }
        self.buffers = {k: b.clone() for k, b in model.named_buffers()}
        self.modes = {k: m.training for k, m in model.named_modules()}
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                p.copy_(self.params[k])
                p.grad = self.grads[k]
            for k, b in self.model.named_buffers():
                b.copy_(self.buffers[k])
        for k, m in self.model.named_modules():
            m.training = self.modes[k]
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
