"""A bits plan: one bit-width per quantized layer (:class:`BitsPlan`, as ``saq-hf search`` writes it in YAML), read
back and checked against the model it will quantize (``saq-hf train --bits_plan``), and printed as a table."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .packing import packed_size
from .quant import QuantLayerMixin
from .quant.convert import default_bits_overrides, name_matches

PLAN_VERSION = 1


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
