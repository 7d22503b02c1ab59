"""Hooks that collect squared gradient norms during the normal backward pass.

* :class:`MicroBatchNorms` — a tensor hook per parameter sees each micro-batch's local
  gradient before it is accumulated into ``.grad`` (and before DDP averages it).
* :class:`PerExampleNorms` — forward hooks save each registered module's input, a hook on its
  output sees the output gradient, and a rule from :mod:`lightning_gns.norms.rules` turns the
  pair into per-example squared norms without materialising per-example gradients.

All results stay on the device: nothing on the per-step path reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns.norms.rules import grad_sample_rule_for, norm_rule_for

NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Unique parameters that require grad, in ``named_parameters`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def squared_norm(tensors: Iterable[Tensor | None]) -> Tensor | None:
    """Σ |t|² over the tensors (float32, on their device); None if there are none."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return None
    norms = torch._foreach_norm(ts, 2.0)
    return torch.stack([n.float() for n in norms]).square().sum()


def _not_a_batch(x: object) -> bool:
    """Inputs whose dim 0 cannot be examples: a parameter, or positions arange(s, s + n) (a
    positional embedding), which would pass the batch-size check when n equals the batch."""
    if isinstance(x, nn.Parameter):
        return True
    if isinstance(x, Tensor) and x.dim() == 1 and x.numel() > 1 and not x.is_floating_point():
        steps = torch.arange(x.numel(), device=x.device, dtype=x.dtype)
        return bool(torch.equal(x - x[0], steps))
    return False


class MicroBatchNorms:
    """Squared norms of each micro-batch's local gradient, over the given parameters.

    The hooks record one |g_p|² per parameter; :meth:`take` sums those of a whole optimizer
    step in one go (the mean over micro-batches is that sum over their count).
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = list(params)
        self._parts: list[Tensor] = []
        self._start = 0  # first part of the current micro-batch
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        self.detach()
        self._handles = [p.register_hook(self._hook) for p in self.params]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._parts.clear()
        self._start = 0

    def _hook(self, grad: Tensor) -> None:
        g = grad.detach()
        if g.dtype == torch.float32 and g.is_contiguous():  # one BLAS call, cheapest on CPU
            flat = g.view(-1)
            self._parts.append(torch.dot(flat, flat))
        else:  # half precision: accumulate in float32 (squares of scaled fp16 grads overflow)
            self._parts.append(torch.linalg.vector_norm(g, dtype=torch.float32).square())

    def close_micro_batch(self, weight: float = 1.0) -> bool:
        """End a micro-batch; its |g|² counts ``weight`` times. False if it had no gradient."""
        if len(self._parts) == self._start:
            return False
        if weight != 1.0:
            mine = torch.stack(self._parts[self._start :]).sum().mul(weight)
            del self._parts[self._start :]
            self._parts.append(mine)
        self._start = len(self._parts)
        return True

    def take(self) -> Tensor | None:
        """Σ over the closed micro-batches of their |g|² (weighted); resets."""
        parts = self._parts[: self._start]
        self._parts = self._parts[self._start :]
        self._start = 0
        if not parts:
            return None
        return torch.stack(parts).sum()


@dataclass
class _Site:
    """One hooked module: its rule, parameters and the input saved by the last forward."""

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    calls: int = 0
    activation: Tensor | None = None
    grad_output: Tensor | None = None  # kept only during the structural check
    shared: set[str] = field(default_factory=set)  # attrs whose weight is tied to another site
    handle: RemovableHandle | None = None
    active: bool = True


class PerExampleNorms:
    """Per-example squared gradient norms from module hooks, one rule per layer type.

    Args:
        model: the model to hook.
        layers: ``"all"`` registered layer types, or ``"norm"`` for LayerNorm/RMSNorm/GroupNorm
            only (the cheap transformer mode of Gray et al. 2024).
        per_layer: also keep per-example norms per module, for per-layer noise scales.
        examples_per_batch: compute norms for only the first k examples of each micro-batch
            (cost × k/B; still unbiased when batches are shuffled); None: all examples.

    The first micro-batch after :meth:`start_check` runs a structural check: each module must
    be called once per forward on inputs with batch dimension ``batch_size``, and the gradient
    recomputed through the module alone must equal the parameter's whole micro-batch gradient
    (so a weight also used elsewhere, e.g. through ``F.linear``, is found). Failing modules are
    left out, with the reason in :attr:`left_out`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str = "all",
        per_layer: bool = False,
        examples_per_batch: int | None = None,
    ) -> None:
        if layers not in ("all", "norm"):
            raise ValueError(f"layers must be 'all' or 'norm', got {layers!r}")
        if examples_per_batch is not None and examples_per_batch < 1:
            raise ValueError(f"examples_per_batch must be >= 1, got {examples_per_batch!r}")
        self.model = model
        self.per_layer = per_layer
        self.examples_per_batch = examples_per_batch
        self._params: list[nn.Parameter] | None = None
        self.sites: dict[str, _Site] = {}
        self.left_out: dict[str, str] = {}
        self._acc: Tensor | None = None
        self._layer_acc: dict[str, Tensor] = {}
        self._shared_acc: dict[int, Tensor] = {}
        self._batch_size: int | None = None
        self._bad: str | None = None
        self._checking = False
        self._recomputing = False
        self._check_grads: dict[int, Tensor] = {}
        self._check_handles: list[RemovableHandle] = []
        self._find_sites(layers)

    # -- set-up ---------------------------------------------------------------------------
    def _find_sites(self, layers: str) -> None:
        owners: dict[int, list[tuple[str, str]]] = {}
        for name, mod in self.model.named_modules():
            own = {k: p for k, p in mod.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            rule = norm_rule_for(mod)
            wanted = layers == "all" or isinstance(mod, NORM_LAYERS)
            if rule is None or not wanted:
                if wanted:
                    self.left_out[name or type(mod).__name__] = (
                        f"no per-example rule for {type(mod).__name__}"
                    )
                continue
            self.sites[name] = _Site(name, mod, own)
            for attr, p in own.items():
                owners.setdefault(id(p), []).append((name, attr))
        for owner in owners.values():
            if len(owner) > 1:
                for name, attr in owner:
                    site = self.sites[name]
                    if grad_sample_rule_for(site.module) is None:
                        self.leave_out(name, f"weight '{attr}' is shared with another module")
                    else:
                        site.shared.add(attr)

    def leave_out(self, name: str, reason: str) -> None:
        self._params = None
        site = self.sites.pop(name, None)
        if site is not None:
            site.active = False
            if site.handle is not None:
                site.handle.remove()
            self.left_out[name] = reason

    def _fail(self, site: _Site, reason: str) -> None:
        """A module broke an assumption. In the structural check it is left out for good; later
        only this micro-batch is dropped, so the covered parameters never change mid-run."""
        if self._checking:
            self.leave_out(site.name, reason)
        else:
            self._bad = f"module '{site.name}' {reason}"

    @property
    def params(self) -> list[nn.Parameter]:
        """Unique covered parameters."""
        if self._params is None:
            seen: dict[int, nn.Parameter] = {}
            for site in self.sites.values():
                for p in site.params.values():
                    seen.setdefault(id(p), p)
            self._params = list(seen.values())
        return self._params

    def coverage(self) -> float:
        """Fraction of trainable parameter elements covered."""
        total = sum(p.numel() for p in trainable_parameters(self.model))
        return sum(p.numel() for p in self.params) / total if total else 0.0

    def attach(self) -> None:
        self.detach()
        for site in self.sites.values():
            site.handle = site.module.register_forward_hook(self._make_forward_hook(site))

    def detach(self) -> None:
        for site in self.sites.values():
            if site.handle is not None:
                site.handle.remove()
                site.handle = None
        self._stop_check_hooks()
        self._reset()

    # -- per micro-batch ------------------------------------------------------------------
    def start_micro_batch(self, batch_size: int | None) -> None:
        """Called before the forward of each micro-batch with its number of examples."""
        self._reset()
        self._batch_size = batch_size

    def _reset(self) -> None:
        self._acc = None
        self._layer_acc = {}
        self._shared_acc = {}
        self._bad = None
        for site in self.sites.values():
            site.calls = 0
            site.activation = None
            site.grad_output = None

    def _make_forward_hook(self, site: _Site):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._recomputing or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not args:
                return
            if not output.requires_grad:
                return
            site.calls += 1
            if site.calls > 1:
                self._fail(site, f"called {site.calls} times in one forward")
                return
            site.activation = args[0]
            if self._checking and _not_a_batch(args[0]):
                self._fail(site, "has inputs that are positions or parameters, not a batch")
                return
            base = output._base
            if base is not None and base.numel() == output.numel() and output.is_contiguous():
                # Linear on (B, T, d) returns a view of a 2-D product; an in-place op on that
                # view (e.g. relu_) reroutes autograd around its hooks, but not its base's.
                shape = output.shape
                base.register_hook(lambda g: self._backward(site, g.reshape(shape)))
            else:
                output.register_hook(lambda g: self._backward(site, g))

        return hook

    def _backward(self, site: _Site, g: Tensor) -> None:
        a = site.activation
        if a is None or not site.active or self._bad is not None:
            return
        b = self._batch_size
        if b is not None and (g.dim() == 0 or g.shape[0] != b or a.shape[:1] != g.shape[:1]):
            self._fail(site, f"has inputs without a batch dimension of size {b}")
            return
        if self._checking:
            site.grad_output = g.detach()
        k = self.examples_per_batch
        if k is not None and g.shape[0] > k:
            a, g = a[:k], g[:k]
        try:
            self._apply_rules(site, a, g)
        except Exception as err:  # noqa: BLE001 - never break the user's backward
            self._fail(site, f"its per-example rule failed ({type(err).__name__}: {err})")

    def _apply_rules(self, site: _Site, a: Tensor, g: Tensor) -> None:
        rule = norm_rule_for(site.module)
        assert rule is not None
        norms = rule(site.module, a, g)
        total: Tensor | None = None
        for attr, n in norms.items():
            if attr in site.shared:
                continue
            total = n if total is None else total + n
        if site.shared:
            gs_rule = grad_sample_rule_for(site.module)
            assert gs_rule is not None
            samples = gs_rule(site.module, a, g)
            for attr in site.shared:
                key = id(site.params[attr])
                prev = self._shared_acc.get(key)
                self._shared_acc[key] = samples[attr] if prev is None else prev + samples[attr]
        if total is None:
            return
        self._acc = total if self._acc is None else self._acc + total
        if self.per_layer:
            prev = self._layer_acc.get(site.name)
            self._layer_acc[site.name] = total if prev is None else prev + total

    def close_micro_batch(self) -> tuple[Tensor | None, dict[str, Tensor], str | None]:
        """Per-example |g_j|² (B,) over covered parameters, per-layer ones, and a reason if the
        micro-batch cannot be used (a module reused within one forward, a missing batch dim)."""
        acc = self._acc
        for shared in self._shared_acc.values():
            sq = shared.flatten(1).square().sum(1)
            acc = sq if acc is None else acc + sq
        if self._checking:
            self._finish_check()
        bad = self._bad
        layers = self._layer_acc
        self._reset()
        return (None if bad else acc), layers, bad

    # -- structural check -----------------------------------------------------------------
    def start_check(self) -> None:
        """Check the next micro-batch's structure (see class docstring)."""
        self._checking = True
        self._check_grads = {}
        self._check_handles = [
            p.register_hook(self._make_grad_recorder(id(p))) for p in self.params
        ]

    def _make_grad_recorder(self, key: int):  # noqa: ANN202
        def rec(grad: Tensor) -> None:
            self._check_grads[key] = grad.detach().clone()

        return rec

    def _stop_check_hooks(self) -> None:
        for h in self._check_handles:
            h.remove()
        self._check_handles = []
        self._checking = False

    def _finish_check(self) -> None:
        """Compare each site's own gradient with the parameter's total micro-batch gradient."""
        self._stop_check_hooks()  # the recomputation below must not overwrite the totals
        local: dict[int, Tensor] = {}
        for name, site in list(self.sites.items()):
            if site.calls == 0:
                self.leave_out(name, "not called through its forward (parameters used directly)")
                continue
            if site.calls > 1:
                self.leave_out(name, f"called {site.calls} times in one forward")
                continue
            if site.grad_output is None or site.activation is None:
                self.leave_out(name, "its output got no gradient in backward")
                continue
            self._recomputing = True
            try:
                grads = self._local_grads(site)
            except Exception as err:  # noqa: BLE001 - anything odd means: do not trust it
                self.leave_out(name, f"could not verify its gradient ({err})")
                continue
            finally:
                self._recomputing = False
            for attr, gr in grads.items():
                key = id(site.params[attr])
                local[key] = gr if key not in local else local[key] + gr
        for name, site in list(self.sites.items()):
            for attr, p in site.params.items():
                total = self._check_grads.get(id(p))
                mine = local.get(id(p))
                if total is None or mine is None:
                    self.leave_out(name, f"no gradient seen for '{attr}'")
                    break
                err = (mine - total.float()).norm() / total.float().norm().clamp_min(1e-30)
                if float(err) > 1e-2:
                    self.leave_out(
                        name, f"'{attr}' also gets gradient from outside this module (tied/reused?)"
                    )
                    break
        self._check_grads = {}

    @staticmethod
    def _local_grads(site: _Site) -> dict[str, Tensor]:
        mod, a, g = site.module, site.activation, site.grad_output
        assert a is not None and g is not None
        params = list(site.params.values())
        dtype = params[0].dtype
        x = a.detach().to(dtype) if a.is_floating_point() else a.detach()
        with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            out = mod(x)
            grads = torch.autograd.grad(out, params, g.to(out.dtype), allow_unused=True)
        return {
            attr: gr.float()
            for (attr, _), gr in zip(site.params.items(), grads, strict=True)
            if gr is not None
        }
