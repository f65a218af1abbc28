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
YAML by ``saq-hf search`` and read back with ``yaml.safe_load`` by ``saq-hf train --bits_plan``. This module owns the
budget, the allocation and the search; the measures are :mod:`saq_hf.sensitivity`'s, the plan file
:mod:`saq_hf.bits_plan`'s.
"""

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from .bits_plan import PLAN_VERSION, BitsPlan, PlanError, budget_met, check_plan, format_plan, read_plan  # noqa: F401
from .config import QuantConfig
from .landscape import Measurement, measuring
from .packing import packed_size
from .quant import QuantConv2d, quantized_layers
from .quant.convert import convert_layers, default_bits_overrides, name_matches
from .sensitivity import _Candidates, _hessian_sensitivity, _sharpness_sensitivity, hessian_traces  # noqa: F401

DEFAULT_CANDIDATES = (2, 3, 4, 8)
MEASURES = ("sharpness", "hessian")
DEFAULT_RHO = 0.002  # relative radius of the sharpness measure: a fixed radius the search was validated with (docs/MIXED.md)


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
