"""Mixed precision under a size budget: how much each layer loses at each bit-width, then one bit-width per layer.

1. **Sensitivity** of every layer at every candidate bit-width, on a few training batches, around the model's
   (latent) weights with every other layer at 8 bits. Two measures:

   - ``"sharpness"`` (ours, what SAQ optimises): ``L(Q_b(w_l) + ε_l) - L₀``, layer ``l`` alone quantized at ``b``
     bits (weights and, with ``activations``, its input) **and** moved by SAQ's adversarial ε at the training radius
     (``saq_hf.sharpness``: relative ρ, Case 3), ``L₀`` the loss with every layer at 8 bits. Averaged with the same
     at the mirrored point ``x - (Q_b(x) - x)``, which cancels the part linear in the quantization error;
   - ``"hessian"`` (HAWQ-V2/V3): ``½ · Tr(H)/n · ||Q_b(x) - x||²`` for the layer's weight and its input, the
     Hessian traces by Hutchinson's estimator on Hessian-vector products (``saq_hf.landscape``).

2. **Allocation**: a multiple-choice knapsack solved exactly by ``scipy.optimize.milp``: one bit-width per layer,
   minimising the summed sensitivity under an average weight-bit or a weight-byte budget. Bytes are the packed
   weight codes exactly as ``saq-hf export`` writes them (:func:`saq_hf.packing.packed_size` per layer, the
   ``packed_bytes`` of ``export_manifest.json``); the layers the architecture keeps at 8 bits count at 8 bits.
   The average weight bits are over the searched layers, weighted by their weight counts, so a uniform W3 model
   averages exactly 3.

A plan is data: ``bits_overrides`` (every quantized layer by name) plus the table it was chosen from, written as
YAML by ``saq-hf search`` and read back with ``yaml.safe_load`` by ``saq-hf train --bits_plan``.
"""

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from .config import QuantConfig
from .landscape import Measurement, measuring
from .packing import packed_size
from .quant import LSQQuantizer, QuantConv2d, QuantLayerMixin, capture_quantized_weights, quantized_layers
from .quant.lsq import mse_step_sizes, quant_range
from .quant.convert import convert_layers, default_bits_overrides, name_matches
from .sharpness import SharpnessPerturbation

DEFAULT_CANDIDATES = (2, 3, 4, 8)
MEASURES = ("sharpness", "hessian")
PLAN_VERSION = 1
DEFAULT_RHO = 0.002  # relative radius of the sharpness measure: a fixed radius the search was validated with (docs/MIXED.md)


@dataclass
class BitsPlan:
    """A bit-width per quantized layer and how it was chosen.

    ``bits_overrides`` is a ``QuantConfig.bits_overrides`` naming every quantized layer. ``layers`` is the per-layer
    table: ``name``, ``weights`` (count), ``w_bits``, ``a_bits``, ``bytes`` (packed weight codes), ``pinned`` (kept
    at 8 bits by the architecture rule, not searched) and ``sensitivity`` (``{bits: value}`` of the measure).
    """

    bits_overrides: dict[str, dict[str, int]]
    layers: list[dict[str, Any]]
    measure: str
    candidates: list[int]
    activations: bool
    target_bits: float | None = None
    target_bytes: int | None = None
    average_bits: float = 0.0
    weight_bytes: int = 0
    search_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The plan's headline numbers (what ``saq_run.json`` and the model card show beside the per-layer bits)."""
        target = {"target_bits": self.target_bits} if self.target_bits is not None else {
            "target_bytes": self.target_bytes}
        return {"measure": self.measure, **target, "average_bits": self.average_bits,
                "weight_bytes": self.weight_bytes, "budget_met": budget_met(self), "candidates": self.candidates,
                "activations": self.activations}

    def to_dict(self) -> dict[str, Any]:
        return {"bits_plan_version": PLAN_VERSION, **self.summary(), "search_seconds": round(self.search_seconds, 2),
                **self.extra, "bits_overrides": self.bits_overrides, "layers": self.layers}

    def to_yaml(self) -> str:
        header = ("# saq-hf bits plan: one bit-width per quantized layer, chosen by saq-hf search.\n"
                  "# Train with it: saq-hf train RECIPE --bits_plan THIS_FILE (or `bits_plan: THIS_FILE` in the recipe).\n")
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, width=120)


def budget_met(plan: BitsPlan) -> bool:
    if plan.target_bits is not None:
        return plan.average_bits <= plan.target_bits + 1e-9
    return plan.weight_bytes <= plan.target_bytes


# ------------------------------------------------------------------------------------------------------ budget
def _check_choices(candidates: Sequence[int], target_bits, target_bytes, measure: str | None = None) -> list[int]:
    if (target_bits is None) == (target_bytes is None):
        raise ValueError("give exactly one budget: target_bits (average weight bits) or target_bytes (weight bytes)")
    if measure is not None and measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    if isinstance(candidates, (str, bytes)) or not candidates:
        raise ValueError(f"candidates must be a non-empty list of bit-widths in 2..8, got {candidates!r}")
    for bits in candidates:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"candidate bit-widths must be integers in 2..8, got {bits!r}")
    if target_bits is not None and (isinstance(target_bits, bool) or not isinstance(target_bits, (int, float))
                                    or not math.isfinite(target_bits) or target_bits <= 0):
        raise ValueError(f"target_bits must be a number > 0, got {target_bits!r}")
    if target_bytes is not None and (isinstance(target_bytes, bool) or not isinstance(target_bytes, int)
                                     or target_bytes <= 0):
        raise ValueError(f"target_bytes must be an integer > 0, got {target_bytes!r}")
    return sorted(set(candidates))


def _budget(weights: dict[str, int], pinned_bytes: int, candidates: list[int], target_bits, target_bytes):
    """``(cost of layer at bits, budget)`` for the knapsack; ``ValueError`` (one line) when no allocation fits."""
    lowest = min(candidates)
    if target_bits is not None:
        if target_bits < lowest:
            raise ValueError(f"target_bits {target_bits:g} is infeasible: the smallest candidate bit-width is {lowest}; "
                             "raise target_bits or add smaller candidates")
        return (lambda name, bits: weights[name] * bits), target_bits * sum(weights.values())
    smallest = pinned_bytes + sum(packed_size(n, lowest) for n in weights.values())
    if target_bytes < smallest:
        raise ValueError(f"target_bytes {target_bytes:,} is infeasible: the smallest allocation ({lowest} bits on every "
                         f"searched layer, 8 on the pinned ones) packs to {smallest:,} bytes; raise target_bytes")
    return (lambda name, bits: packed_size(weights[name], bits)), target_bytes - pinned_bytes


def allocate_bits(sensitivity: Mapping[str, Mapping[int, float]], weights: Mapping[str, int],
                  candidates: Sequence[int], *, target_bits: float | None = None, target_bytes: int | None = None,
                  pinned_bytes: int = 0) -> dict[str, int]:
    """``{layer: bits}`` minimising the summed ``sensitivity[layer][bits]`` under the budget (``scipy.optimize.milp``).

    ``target_bits``: ``Σ weights·bits <= target_bits · Σ weights``; ``target_bytes``: ``pinned_bytes + Σ
    packed_size(weights, bits) <= target_bytes``. A layer's score at ``b`` bits counts as the least of its scores at
    ``b`` or fewer bits (more bits never cost sensitivity), and among allocations of equal sensitivity the one that
    uses more of the budget wins. ``ValueError`` when no allocation fits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    candidates = _check_choices(candidates, target_bits, target_bytes)
    names = list(weights)
    cost, budget = _budget(dict(weights), pinned_bytes, candidates, target_bits, target_bytes)
    pairs = [(name, bits) for name in names for bits in candidates]
    # More bits are never scored worse than fewer: a measured inversion is noise, and would leave budget unused.
    monotone = {name: dict(zip(candidates, np.minimum.accumulate([float(sensitivity[name][b]) for b in candidates])))
                for name in names}
    scores = np.array([monotone[name][bits] for name, bits in pairs])
    costs = np.array([float(cost(name, bits)) for name, bits in pairs])
    # Scaled to a range of 1, so the solver's absolute tolerances mean the same for any loss scale; the tie-break,
    # the share of the largest possible size an allocation uses, sums to at most 1e-3 of that range: among equal
    # scores the allocation that uses the most budget wins, nothing else changes.
    spread = float(np.ptp(scores)) if len(scores) else 0.0
    scaled = (scores - scores.min()) / spread if spread > 0 else np.zeros_like(scores)
    largest = sum(max(cost(name, bits) for bits in candidates) for name in names)
    objective = scaled - 1e-3 * costs / largest
    one_each = np.zeros((len(names), len(pairs)))
    for i, (name, _) in enumerate(pairs):
        one_each[names.index(name), i] = 1
    result = milp(objective, integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(costs[None, :], -np.inf, budget)],
                  options={"mip_rel_gap": 0.0})
    if result.status != 0 or result.x is None:
        raise ValueError(f"no allocation of {candidates} bits fits the budget ({result.message})")
    chosen = {name: bits for (name, bits), x in zip(pairs, result.x) if x > 0.5}
    if sum(cost(name, bits) for name, bits in chosen.items()) > budget:  # solver tolerance: never over budget
        raise ValueError(f"the solver's allocation exceeds the budget by rounding ({result.message})")
    return {name: chosen[name] for name in names}


# ------------------------------------------------------------------------------------------------- working copy
def _full_precision_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose fake-quantized layers are plain ``nn.Linear``/``nn.Conv2d`` with the latent weights."""
    work = copy.deepcopy(model)
    for name, layer in list(quantized_layers(work)):
        if isinstance(layer, QuantConv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                              bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta")
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, child, plain)
    if hasattr(work, "hf_quantizer"):
        del work.hf_quantizer
    return work


def _quant_config_of(model: nn.Module) -> QuantConfig | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    return config if isinstance(config, QuantConfig) else None


CALIBRATION_VALUES = 1 << 14  # input values per layer the candidates' input step sizes are estimated from


def _weight_quantizers(layer: QuantLayerMixin, candidates: list[int]) -> dict[int, LSQQuantizer]:
    """The layer's weight quantizer at every candidate bit-width, each at the MSE-optimal step size quantize_model
    starts training from (the same grid, every bit-width in one pass)."""
    weight = layer.weight.detach()
    per_channel = layer.weight_quantizer.per_channel
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else None
    steps = mse_step_sizes(weight, [quant_range(bits, True) for bits in candidates], per_channel)
    quantizers = {}
    for bits, step in zip(candidates, steps):
        quantizer = LSQQuantizer(bits, signed=True, channel_shape=shape, device=weight.device, dtype=weight.dtype,
                                 step_size_format="linear")
        quantizer.initialize_to(step)
        quantizers[bits] = quantizer.requires_grad_(False)
    return quantizers


def _input_quantizer(layer: QuantLayerMixin, bits: int) -> LSQQuantizer:
    weight = layer.weight
    quantizer = LSQQuantizer(bits, signed=None, is_activation=True, device=weight.device, dtype=weight.dtype,
                             step_size_format="linear")
    return quantizer.requires_grad_(False)


def _calibration_sample(x: torch.Tensor, limit: int = CALIBRATION_VALUES) -> torch.Tensor:
    """At most ``limit`` values of ``x``, evenly strided, with the largest magnitude kept (the step-size grid is
    anchored at it)."""
    flat = x.detach().reshape(-1).float()
    stride = max(1, -(-flat.numel() // limit))
    return torch.cat([flat[::stride], flat[flat.abs().argmax()].reshape(1)])


class _Candidates:
    """Every searched layer's quantizers at every candidate bit-width, weight step sizes from the weights and input
    step sizes from the first batch (one forward; up to :data:`CALIBRATION_VALUES` values per layer), and swapping
    them in one layer at a time. The working model's own 8-bit quantizers get the same estimates as the 8-bit
    candidates."""

    def __init__(self, work: nn.Module, layers: dict[str, QuantLayerMixin], candidates: list[int],
                 activations: bool, batches: list, loss_fn):
        self.layers = layers
        self.weight = {}
        for name, layer in layers.items():
            for bits, quantizer in _weight_quantizers(layer, candidates).items():
                self.weight[(name, bits)] = quantizer
                if bits == layer.w_bits:  # the working model's own quantizer: the same estimate, not a second one
                    layer.weight_quantizer.initialize_to(quantizer.step_size.detach())
        self.input = ({(n, b): _input_quantizer(layer, b) for n, layer in layers.items() for b in candidates}
                      if activations else {})
        self.input_error: dict[tuple[str, int], float] = {}
        self._points: dict[tuple[str, int, bool], tuple] = {}
        if self.input:
            self._calibrate(work, batches, loss_fn, candidates)

    @torch.no_grad()
    def _calibrate(self, work, batches, loss_fn, candidates) -> None:
        def estimate(name):
            def hook(layer, args):
                x = args[0]
                sample = _calibration_sample(x[: -(-CALIBRATION_VALUES // max(x[:1].numel(), 1))])
                signed = bool(sample.min() < 0)
                steps = mse_step_sizes(sample, [quant_range(bits, signed) for bits in candidates], per_channel=False)
                for bits, step in zip(candidates, steps):
                    self.input[(name, bits)].initialize_to(step, signed=signed)
                    if bits == layer.a_bits and layer.input_quantizer is not None:  # the working model's own
                        layer.input_quantizer.initialize_to(step, signed=signed)
            return hook

        handles = [layer.register_forward_pre_hook(estimate(name)) for name, layer in self.layers.items()]
        try:
            loss_fn(work, batches[0])
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def measure_input_errors(self, work, batches, weights, loss_fn, candidates) -> None:
        """``||Q_b(x) - x||²`` of each layer's input, per batch, averaged with the batch weights."""
        errors = {key: 0.0 for key in self.input}

        def measure(name):
            def hook(_module, args):
                x = args[0]
                for bits in candidates:
                    errors[(name, bits)] += share[0] * float((self.input[(name, bits)](x) - x).float().pow(2).sum())
            return hook

        share = [0.0]
        handles = [layer.register_forward_pre_hook(measure(name)) for name, layer in self.layers.items()]
        try:
            for weight, batch in zip(weights, batches):
                share[0] = weight
                loss_fn(work, batch)
        finally:
            for handle in handles:
                handle.remove()
        self.input_error = errors

    def weight_error(self, name: str, bits: int) -> float:
        layer = self.layers[name]
        with torch.no_grad():
            return float((self.weight[(name, bits)](layer.weight) - layer.weight).float().pow(2).sum())

    def swapped(self, name: str, bits: int, mirrored: bool = False):
        """Layer ``name`` at ``bits`` (or its mirror) for the block. The weights do not move while the search
        measures: each (layer, bits, mirror) point's ``Q(w)`` is computed on first use and kept."""
        key = (name, bits, mirrored)
        if key not in self._points:
            layer = self.layers[name]
            weight_quantizer = self.weight[(name, bits)]
            input_quantizer = self.input.get((name, bits), layer.input_quantizer)
            if mirrored:
                weight_quantizer = _mirror(weight_quantizer)
                input_quantizer = _mirror(input_quantizer) if input_quantizer is not None else None
            self._points[key] = (_FixedQuantizer.of(weight_quantizer, layer.weight), input_quantizer)
        return _Swap(self.layers[name], *self._points[key])

    def release(self, name: str) -> None:
        """Drop layer ``name``'s kept points (a copy of its weight per bit-width and mirror)."""
        self._points = {key: point for key, point in self._points.items() if key[0] != name}


def _copy_as(cls: type, quantizer: LSQQuantizer) -> LSQQuantizer:
    """A ``cls`` (an :class:`LSQQuantizer` subclass) with ``quantizer``'s bits, sign, layout and step sizes."""
    step = quantizer.step_size_parameter
    copy_ = cls(quantizer.bits, signed=None if quantizer.auto_signed else bool(quantizer.signed),
                channel_shape=tuple(step.shape) or None, is_activation=quantizer.is_activation, device=step.device,
                dtype=step.dtype, step_size_format=quantizer.step_size_format)
    copy_.load_state_dict(quantizer.state_dict())
    return copy_.requires_grad_(False)


def _mirror(quantizer: LSQQuantizer) -> LSQQuantizer:
    """The same quantizer (bits, sign, step sizes) moving its input the other way."""
    return _copy_as(_MirroredQuantizer, quantizer)


class _MirroredQuantizer(LSQQuantizer):
    """``x - (Q(x) - x)``: a weight (or input) moved by its quantization error the other way. The mean of the losses
    at ``Q(x)`` and here has no term linear in the error, which on a finite batch is noise of either sign (training
    removes it) and can be larger than the curvature term that says what a bit-width costs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x - super().forward(x)

    def multi_tensor_spec(self, x: torch.Tensor):  # never batched with plain LSQ quantizers: its forward differs
        return None


class _FixedQuantizer(LSQQuantizer):
    """A weight's quantizer while the search measures, where that weight does not move: ``Q(w)`` computed once, not
    in every measuring forward."""

    @classmethod
    def of(cls, source: LSQQuantizer, weight: torch.Tensor) -> "_FixedQuantizer":
        fixed = _copy_as(cls, source)
        with torch.no_grad():
            fixed.value = source(weight)
        return fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value

    def multi_tensor_spec(self, x: torch.Tensor):
        return None


@contextlib.contextmanager
def _weights_quantized_once(model: nn.Module):
    layers = [layer for _, layer in quantized_layers(model)]
    originals = [layer.weight_quantizer for layer in layers]
    try:
        for layer, quantizer in zip(layers, originals):
            layer.weight_quantizer = _FixedQuantizer.of(quantizer, layer.weight)
        yield
    finally:
        for layer, quantizer in zip(layers, originals):
            layer.weight_quantizer = quantizer


class _Swap:
    def __init__(self, layer, weight_quantizer, input_quantizer):
        self.layer, self.new = layer, (weight_quantizer, input_quantizer)

    def __enter__(self):
        self.old = (self.layer.weight_quantizer, self.layer.input_quantizer)
        self.layer.weight_quantizer, self.layer.input_quantizer = self.new

    def __exit__(self, *exc):
        self.layer.weight_quantizer, self.layer.input_quantizer = self.old


def check_budget(model: nn.Module, *, target_bits: float | None = None, target_bytes: int | None = None,
                 candidates: Sequence[int] = DEFAULT_CANDIDATES, measure: str = "sharpness") -> None:
    """What :func:`search_bits` checks before it measures anything, without measuring: one budget, valid
    candidates and measure, and an allocation that fits. ``ValueError`` (one line) otherwise."""
    candidates = _check_choices(candidates, target_bits, target_bytes, measure)
    original = _quant_config_of(model)
    work = _full_precision_copy(model)
    pinned_patterns = default_bits_overrides(work)
    skipped = list(original.modules_to_not_convert or []) if original else []
    weights, pinned_bytes = {}, 0
    for name, module in work.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or any(name_matches(name, p) for p in skipped):
            continue
        if any(name_matches(name, p) for p in pinned_patterns):
            pinned_bytes += packed_size(module.weight.numel(), 8)
        else:
            weights[name] = module.weight.numel()
    if not weights:
        raise ValueError("the model has no layer to search: every quantized layer is kept at 8 bits")
    _budget(weights, pinned_bytes, candidates, target_bits, target_bytes)


# ------------------------------------------------------------------------------------------------------ measures
class _EarlierOutputs:
    """Outputs of the modules that run before each searched layer, recorded in forwards of one batch at the working
    point, for measuring forwards that change that layer alone.

    When only layer ``l`` changes, every module whose forward ended before ``l``'s began computes the same output
    again: :meth:`reused_before` has the outermost such modules (whole blocks, where they return one tensor) return
    their recorded output instead, a copy (the model may change it in place), which saves on average half of each
    measuring forward. Not reused: a module called more than once in a forward, one that returns anything but a
    tensor, or whose output shares memory with its input (an in-place operation or a view); a layer called twice
    reuses nothing. Only the outputs some layer reuses are kept.
    """

    def __init__(self, model: nn.Module, layers: Iterable[nn.Module], compute_loss: Callable[[], torch.Tensor]):
        modules = [m for m in model.modules() if m is not model]
        clock = itertools.count()
        start: dict[nn.Module, int] = {}
        end: dict[nn.Module, int] = {}
        calls: dict[nn.Module, int] = {}
        unusable: set[nn.Module] = set()

        def before(module, _args):
            calls[module] = calls.get(module, 0) + 1
            start.setdefault(module, next(clock))

        def after(module, args, kwargs, output):
            end[module] = next(clock)
            inputs = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            if not torch.is_tensor(output) or any(
                    a.untyped_storage().data_ptr() == output.untyped_storage().data_ptr() for a in inputs):
                unusable.add(module)

        with _hooks(modules, before, after):
            compute_loss()
        reusable = {m for m in modules if calls.get(m) == 1 and m not in unusable}
        self.reuse: dict[nn.Module, list[nn.Module]] = {}
        for layer in layers:
            if calls.get(layer) != 1:
                continue  # not run, or run twice in one forward: nothing before it is safe to skip
            chosen: list[nn.Module] = []
            stack = [model]
            while stack:
                for child in stack.pop().children():
                    if child not in start:
                        stack.append(child)  # a container that is never called (ModuleList): look inside
                    elif start[child] < start[layer]:
                        if child in reusable and end[child] < start[layer]:
                            chosen.append(child)
                        else:
                            stack.append(child)  # an ancestor of the layer, or not reusable: look inside
            self.reuse[layer] = chosen
        needed = {m for chosen in self.reuse.values() for m in chosen}
        self.outputs: dict[nn.Module, torch.Tensor] = {}

        def keep(module, _args, _kwargs, output):
            self.outputs[module] = output.detach().clone()  # the model may change it in place afterwards

        with _hooks(needed, None, keep):
            compute_loss()

    @contextlib.contextmanager
    def reused_before(self, layer: nn.Module):
        earlier = self.reuse.get(layer, [])
        saved = {module: module.__dict__.get("forward") for module in earlier}
        try:
            for module in earlier:
                module.forward = functools.partial(_recorded_output, self.outputs[module])
            yield
        finally:
            for module, forward in saved.items():
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward


@contextlib.contextmanager
def _hooks(modules: Iterable[nn.Module], before, after):
    handles = []
    try:
        for module in modules:
            if before is not None:
                handles.append(module.register_forward_pre_hook(before))
            if after is not None:
                handles.append(module.register_forward_hook(after, with_kwargs=True))
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _recorded_output(output: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
    return output.clone()


def _sharpness_sensitivity(work, measure: Measurement, cands: _Candidates, candidates, rho: float) -> dict:
    """``{layer: {bits: L(Q_b + ε) - L₀}}``, averaged over ``Q_b`` and its mirror (:class:`_MirroredQuantizer`).

    With the relative radius SAQ's ε for one tensor is ``ρ·||Q(w_l)||·g_l/||g_l||``, whatever the other tensors do:
    each layer alone gets exactly its training ε, built by :class:`SharpnessPerturbation`. Its direction ``g_l`` is
    taken once per batch at the 8-bit point (one backward for all layers and bit-widths) and its length from the
    layer's weight at ``b`` bits, so each (layer, bit-width) costs two forward passes per batch (``Q_b`` and its
    mirror) instead of two ascent-descent steps.
    """
    frozen = [p for p in work.parameters() if p.requires_grad]
    restore = contextlib.ExitStack()
    try:
        restore.enter_context(_weights_quantized_once(work))  # nothing but the swapped-in quantizers moves
        base = measure.loss()
        sharp = {name: {bits: -base for bits in candidates} for name in cands.layers}
        for p in frozen:  # ε moves the searched layers' Q(w) only: θ and the pinned layers stay where they are
            p.requires_grad_(False)
        for layer in cands.layers.values():
            layer.weight.requires_grad_(True)
        perturbation = SharpnessPerturbation(work, case="saq", rho=rho, perturb="none", radius="relative")
        index = {layer: i for i, layer in enumerate(perturbation.layers)}
        per_batch = []
        for batch in measure.batches:
            compute_loss = functools.partial(measure.loss_fn, work, batch)
            per_batch.append((perturbation.ascent_gradients(compute_loss),
                              _EarlierOutputs(work, cands.layers.values(), compute_loss)))
        for name, layer in cands.layers.items():  # layer by layer: one layer's candidate points alive at a time
            for weight, batch, (grads, prefix) in zip(measure.weights, measure.batches, per_batch):
                alone = [grad if i == index[layer] else None for i, grad in enumerate(grads)]
                with prefix.reused_before(layer):
                    for bits in candidates:
                        for mirrored in (False, True):
                            with cands.swapped(name, bits, mirrored), torch.no_grad(), \
                                    perturbation.perturbed(perturbation.compute_epsilon(alone)):
                                sharp[name][bits] += 0.5 * weight * float(measure.loss_fn(work, batch))
            cands.release(name)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        restore.close()
    return {"sharpness": sharp, "base_loss": base}


def hessian_traces(work: nn.Module, measure: Measurement, layers: dict[str, QuantLayerMixin], n_samples: int,
                   seed: int, inputs: bool) -> dict[str, dict[str, float]]:
    """Mean Hessian diagonal ``Tr(H)/n`` of the loss w.r.t. each layer's ``Q(w)`` and (``inputs``) its input,
    by Hutchinson's estimator: ``E[vᵀHv]`` over Rademacher ``v``, ``n_samples`` per batch, one double backward
    each (the Hessian-vector products of :mod:`saq_hf.landscape`, with the inputs as extra points)."""
    generator = torch.Generator().manual_seed(seed)
    names = list(layers)
    totals = {name: {"weight": 0.0, "input": 0.0} for name in names}
    for share, batch in zip(measure.weights, measure.batches):
        probes: dict[str, torch.Tensor] = {}

        def probe(name):
            def hook(_module, args):
                probes[name] = torch.zeros_like(args[0], requires_grad=True)
                return (args[0] + probes[name],) + tuple(args[1:])
            return hook

        handles = [layers[n].register_forward_pre_hook(probe(n)) for n in names] if inputs else []
        try:
            with capture_quantized_weights(layers.values()) as captured:
                loss = measure.loss_fn(work, batch)
        finally:
            for handle in handles:
                handle.remove()
        points = [(n, "weight", captured[layers[n]]) for n in names if layers[n] in captured]
        points += [(n, "input", probes[n]) for n in names if n in probes]
        grads = torch.autograd.grad(loss, [p for _, _, p in points], create_graph=True, allow_unused=True)
        reached = [(point, g) for point, g in zip(points, grads) if g is not None and g.requires_grad]
        for _ in range(n_samples):
            # One product per tensor, v on that tensor alone: vᵀHv is then its own diagonal block (positive
            # semi-definite where the loss is convex in it), without the other blocks' cross terms, whose noise
            # swamps the trace when one v spans every layer.
            for (name, kind, point), g in reached:
                v = torch.randint(0, 2, g.shape, generator=generator).to(g) * 2 - 1
                (hv,) = torch.autograd.grad((g * v).sum(), point, retain_graph=True, allow_unused=True)
                if hv is not None:
                    totals[name][kind] += share * float((v * hv).sum()) / point.numel() / n_samples
    return totals


def _hessian_sensitivity(work, measure, cands: _Candidates, candidates, n_samples: int, seed: int) -> dict:
    traces = hessian_traces(work, measure, cands.layers, n_samples, seed, inputs=bool(cands.input))
    if cands.input:
        cands.measure_input_errors(work, measure.batches, measure.weights, measure.loss_fn, candidates)
    sensitivity = {}
    for name in cands.layers:
        # A negative trace estimate (a saddle, or noise) would reward fewer bits: clamped at 0, as HAWQ assumes PSD.
        weight_diag, input_diag = max(traces[name]["weight"], 0.0), max(traces[name]["input"], 0.0)
        sensitivity[name] = {bits: 0.5 * (weight_diag * cands.weight_error(name, bits)
                                          + input_diag * cands.input_error.get((name, bits), 0.0))
                             for bits in candidates}
    return {"hessian": sensitivity, "hessian_traces": traces}


# ---------------------------------------------------------------------------------------------------- the search
def search_bits(model: nn.Module, batches: Iterable, *, target_bits: float | None = None,
                target_bytes: int | None = None, measure: str = "sharpness",
                candidates: Sequence[int] = DEFAULT_CANDIDATES, activations: bool | None = None,
                rho: float = DEFAULT_RHO, max_batches: int | None = 4, hutchinson_samples: int = 8, seed: int = 0,
                loss_fn: Callable | None = None) -> BitsPlan:
    """Choose a bit-width per layer of ``model`` (trained, FP or saq-hf quantized) under a size budget.

    ``batches``: a few training batches (dicts of model inputs with ``labels``, or ``(inputs, labels)`` pairs; the
    first ``max_batches`` are used). ``target_bits``: average weight bits of the searched layers; ``target_bytes``:
    packed weight bytes of every quantized layer as ``saq-hf export`` writes them. ``measure``: ``"sharpness"`` or
    ``"hessian"`` (module docstring). ``activations``: each layer's input is quantized at its weight's bit-width
    (``a_bits = w_bits``; default: true unless ``model`` is quantized weights-only). ``rho``: the relative training
    radius of the sharpness measure. The architecture's 8-bit layers (patch embedding, classifier) are not searched.

    Returns a :class:`BitsPlan`: ``plan.bits_overrides`` goes into ``QuantConfig(bits_overrides=...)``, ``plan.layers``
    is the per-layer table. ``model`` is not changed. Budget and choices are checked before any measurement.
    """
    candidates = _check_choices(candidates, target_bits, target_bytes, measure)
    if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    started = time.perf_counter()
    original = _quant_config_of(model)
    if activations is None:
        activations = original is None or original.a_bits is not None
    work = _full_precision_copy(model)
    pinned_patterns = default_bits_overrides(work)
    config = QuantConfig(w_bits=8, a_bits=8 if activations else None,
                         per_channel=original.per_channel if original else True,
                         modules_to_not_convert=list(original.modules_to_not_convert or []) if original else [],
                         bits_overrides=pinned_patterns, step_size_format="linear")
    convert_layers(work, config)
    all_layers = dict(quantized_layers(work))
    pinned = {n for n in all_layers if any(name_matches(n, p) for p in pinned_patterns)}
    layers = {n: layer for n, layer in all_layers.items() if n not in pinned}
    if not layers:
        raise ValueError("the model has no layer to search: every quantized layer is kept at 8 bits")
    weights = {n: layer.weight.numel() for n, layer in layers.items()}
    pinned_bytes = sum(packed_size(all_layers[n].weight.numel(), all_layers[n].w_bits) for n in pinned)
    _budget(weights, pinned_bytes, candidates, target_bits, target_bytes)  # infeasible: one line, before any work

    measurement = Measurement(work, batches, loss_fn, max_batches)
    with measuring(work, double_backward=measure == "hessian"):  # sharpness: forwards and one backward
        cands = _Candidates(work, layers, candidates, activations, measurement.batches, measurement.loss_fn)
        if measure == "sharpness":
            measured = _sharpness_sensitivity(work, measurement, cands, candidates, rho)
        else:
            measured = _hessian_sensitivity(work, measurement, cands, candidates, hutchinson_samples, seed)
    table = []
    for name, layer in all_layers.items():
        row = {"name": name, "weights": layer.weight.numel(), "w_bits": layer.w_bits, "a_bits": layer.a_bits,
               "bytes": packed_size(layer.weight.numel(), layer.w_bits), "pinned": name in pinned}
        if name not in pinned:
            row["sensitivity"] = {bits: float(measured[measure][name][bits]) for bits in candidates}
        table.append(row)
    plan = BitsPlan(bits_overrides={}, layers=table, measure=measure, candidates=candidates,
                    activations=bool(activations),
                    extra={"rho": float(rho)} if measure == "sharpness" else {"hutchinson_samples": hutchinson_samples})
    plan.extra["batches"] = len(measurement.batches)
    plan = reallocate(plan, target_bits=target_bits, target_bytes=target_bytes)
    plan.search_seconds = time.perf_counter() - started
    return plan


def reallocate(plan: BitsPlan, *, target_bits: float | None = None, target_bytes: int | None = None,
               sensitivity: Mapping[str, Mapping[int, float]] | None = None) -> BitsPlan:
    """The allocation of ``plan``'s layers under another budget, from the sensitivities it measured (no new
    measurement), or from ``sensitivity`` (``{layer: {bits: score}}``, e.g. random scores for a random allocation
    of the same size). Returns a new :class:`BitsPlan`."""
    candidates = _check_choices(plan.candidates, target_bits, target_bytes)
    searched = [row for row in plan.layers if not row["pinned"]]
    weights = {row["name"]: row["weights"] for row in searched}
    scores = sensitivity if sensitivity is not None else {row["name"]: row["sensitivity"] for row in searched}
    pinned_bytes = sum(row["bytes"] for row in plan.layers if row["pinned"])
    chosen = allocate_bits(scores, weights, candidates, target_bits=target_bits, target_bytes=target_bytes,
                           pinned_bytes=pinned_bytes)
    overrides, table = {}, []
    for row in plan.layers:
        row = dict(row)
        if not row["pinned"]:
            row["w_bits"] = chosen[row["name"]]
            row["a_bits"] = row["w_bits"] if plan.activations else None
            row["bytes"] = packed_size(row["weights"], row["w_bits"])
        # Weights only: the layer keeps the a_bits the training config gives it.
        overrides[row["name"]] = ({"w_bits": row["w_bits"], "a_bits": row["a_bits"]} if row["a_bits"] is not None
                                  else {"w_bits": row["w_bits"]})
        table.append(row)
    return dataclasses.replace(
        plan, bits_overrides=overrides, layers=table, extra=dict(plan.extra),
        target_bits=float(target_bits) if target_bits is not None else None, target_bytes=target_bytes,
        average_bits=sum(weights[n] * chosen[n] for n in weights) / sum(weights.values()),
        weight_bytes=sum(row["bytes"] for row in table))


# ------------------------------------------------------------------------------------------------------ plan I/O
class PlanError(ValueError):
    """A bits plan that cannot be used; the message is one line that says what to change."""


def _plan_error(path, what: str) -> PlanError:
    return PlanError(f"bits_plan {str(path)!r}: {what}")


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """A plan file written by ``saq-hf search`` (``yaml.safe_load``), checked for shape and bit ranges:
    ``{"bits_overrides": {...}, "target_bits" or "target_bytes": ..., ...}``. ``PlanError`` (one line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise _plan_error(path, "not found; write one with saq-hf search")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise _plan_error(path, "is not valid YAML; write it again with saq-hf search") from None
    if not isinstance(data, dict) or not isinstance(data.get("bits_overrides"), dict) or not data["bits_overrides"]:
        raise _plan_error(path, "has no bits_overrides mapping of layer name -> {w_bits, a_bits}")
    if data.get("bits_plan_version", PLAN_VERSION) != PLAN_VERSION:
        raise _plan_error(path, f"has bits_plan_version {data.get('bits_plan_version')!r}, this saq-hf reads "
                                f"{PLAN_VERSION}")
    for name, bits in data["bits_overrides"].items():
        if not isinstance(bits, dict) or not bits or set(bits) - {"w_bits", "a_bits"}:
            raise _plan_error(path, f"layer {name!r} must map to {{w_bits: b, a_bits: b}}, got {bits!r}")
        for key, value in bits.items():
            if key == "a_bits" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise _plan_error(path, f"layer {name!r} has {key} {value!r}; bits must be integers in 2..8")
    targets = [key for key in ("target_bits", "target_bytes") if data.get(key) is not None]
    if len(targets) != 1:
        raise _plan_error(path, "must name its budget: target_bits or target_bytes")
    value = data[targets[0]]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _plan_error(path, f"{targets[0]} must be a number > 0, got {value!r}")
    return data


def check_plan(plan: Mapping[str, Any], model: nn.Module, path: str | os.PathLike = "plan") -> dict[str, Any]:
    """Check ``plan`` (from :func:`read_plan`) against the FP ``model`` it will quantize, before any training:
    it names exactly the model's quantizable layers and meets its own budget. Returns ``{average_bits,
    weight_bytes, budget_met: True, ...}`` for the run record; ``PlanError`` (one line) otherwise."""
    overrides = plan["bits_overrides"]
    convertible = {name: module for name, module in model.named_modules()
                   if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, QuantLayerMixin)}
    unknown = [name for name in overrides if name not in convertible]
    if unknown:
        raise _plan_error(path, f"names layer {unknown[0]!r}, which the model does not have ({len(unknown)} unknown); "
                                "search this model again")
    missing = [name for name in convertible if name not in overrides]
    if missing:
        raise _plan_error(path, f"does not name layer {missing[0]!r} of the model ({len(missing)} missing); search "
                                "this model again")
    pinned_patterns = default_bits_overrides(model)
    searched = {n: convertible[n].weight.numel() for n in overrides
                if not any(name_matches(n, p) for p in pinned_patterns)}
    weight_bytes = sum(packed_size(convertible[n].weight.numel(), bits["w_bits"]) for n, bits in overrides.items())
    average = (sum(count * overrides[n]["w_bits"] for n, count in searched.items()) / sum(searched.values())
               if searched else 8.0)
    if plan.get("target_bits") is not None and average > plan["target_bits"] + 1e-9:
        raise _plan_error(path, f"averages {average:.3f} weight bits, over its target_bits {plan['target_bits']:g}; "
                                "search again or raise target_bits")
    if plan.get("target_bytes") is not None and weight_bytes > plan["target_bytes"]:
        raise _plan_error(path, f"packs to {weight_bytes:,} weight bytes, over its target_bytes "
                                f"{plan['target_bytes']:,}; search again or raise target_bytes")
    target = {k: plan[k] for k in ("target_bits", "target_bytes") if plan.get(k) is not None}
    return {"measure": plan.get("measure"), **target, "average_bits": average, "weight_bytes": weight_bytes,
            "budget_met": True, "layers": {n: dict(bits) for n, bits in overrides.items()}}


def format_plan(plan: BitsPlan) -> str:
    """Printable per-layer table of a plan and its budget line."""
    width = max(len(row["name"]) for row in plan.layers)
    candidates = plan.candidates
    lines = [f"{'layer':<{width}}  {'weights':>9}  bits  {'bytes':>8}  " +
             "  ".join(f"{'s@' + str(b):>9}" for b in candidates)]
    for row in plan.layers:
        bits = f"W{row['w_bits']}" + (f"A{row['a_bits']}" if row["a_bits"] else "")
        scores = ("  ".join(f"{row['sensitivity'][b]:>9.3g}" for b in candidates) if "sensitivity" in row
                  else "pinned at 8 bits")
        lines.append(f"{row['name']:<{width}}  {row['weights']:>9,}  {bits:<5} {row['bytes']:>8,}  {scores}")
    target = (f"target {plan.target_bits:g} average weight bits" if plan.target_bits is not None
              else f"target {plan.target_bytes:,} weight bytes")
    lines.append(f"{plan.measure} measure: average {plan.average_bits:.3f} weight bits (searched layers), "
                 f"{plan.weight_bytes:,} weight bytes packed; {target}: {'met' if budget_met(plan) else 'NOT met'}; "
                 f"search took {plan.search_seconds:.1f} s")
    return "\n".join(lines)
