"""Integer export of a fake-quantized saq-hf model: packed weight codes plus step sizes that reload exactly.

An export folder holds three files, none of them pickled:

- ``config.json``: the model's transformers config, with its saq ``quantization_config``;
- ``weights.safetensors``: for every quantized layer ``<layer>.weight_codes`` (uint8, the integer weight codes
  packed as described in :mod:`saq_hf.packing`) in place of its FP latent ``<layer>.weight``; every other
  parameter and buffer (weight and activation step sizes, quantizer flags, biases, norms, unconverted
  layers) unchanged, in its own dtype;
- ``export_manifest.json``: format name and version, model class, the SHA-256 of the weights file and, per
  quantized layer, the weight bits, code range, shape, dtype and pack layout and the activation bits and range.

:func:`load_exported` unpacks the codes, sets each quantized layer's ``weight`` to ``codes * step_size`` (computed
as the quantizer's forward computes it) and hands that state dict with ``config.json`` to transformers'
``from_pretrained``, which rebuilds the model through the saq HfQuantizer like any saved saq-hf run. That
weight is a fixed point of the quantizer: ``fl(c·s) / s`` lies within a few ulp of the integer ``c``, so it
rounds back to ``c`` and the reloaded layer multiplies by exactly the fake-quant model's ``Q(w)``. Both export
and load check this per layer instead of assuming it (it can fail for 8-bit codes in bfloat16). The ONNX graph is
:mod:`saq_hf.onnx_export`'s; ``export_command`` is ``saq-hf export``.
"""

import copy
import hashlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from ._version import __version__
from .config import QUANT_METHOD
from .export_layers import _check_fixed_point, _dequantize, _dtype_name, _exportable_layers
from .file_modes import follow_umask
from .onnx_export import ONNX_FILE, _require_onnx, export_onnx
from .packing import pack_codes, unpack_codes
from .quant import LSQQuantizer, quantized_layers

FORMAT = "saq-hf-export"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "export_manifest.json"
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)
PACKING = "offset-binary (code - qmin), `bits` bits per code, LSB-first bit stream, zero-padded to a byte"


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights); each gets its own copy on disk.
    seen, out = set(), {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def export_quantized(model: nn.Module, out_dir: str | os.PathLike) -> dict:
    """Write ``model``'s integer export (packed weight codes, step sizes, config, manifest) to ``out_dir``.

    ``model`` is a transformers model fake-quantized by saq-hf, with initialised (calibrated or trained)
    step sizes. Returns the manifest that was written. Raises ``ValueError`` for a model that is not quantized
    or not ready; files in ``out_dir`` other than the three export files are left alone.
    """
    layers = _exportable_layers(model)
    tensors = model.state_dict()
    # Step sizes are exported as the values the codes were taken with (s itself, not its log).
    for name, quantizer in model.named_modules():
        if isinstance(quantizer, LSQQuantizer) and quantizer.step_size_format == "log":
            del tensors[f"{name}.log_step_size"]
            tensors[f"{name}.step_size"] = quantizer.step_size.detach()
    manifest_layers = {}
    for name, layer in layers.items():
        codes = layer.weight_quantizer.codes(layer.weight)
        _check_fixed_point(name, layer, _dequantize(codes, layer.weight_quantizer.step_size, layer.weight.dtype),
                           codes)
        qmin, qmax = layer.weight_quantizer.qrange()
        codes_key = f"{name}.weight_codes"
        del tensors[f"{name}.weight"]
        tensors[codes_key] = pack_codes(codes, layer.w_bits, qmin)
        activation = None
        if layer.input_quantizer is not None:
            a_min, a_max = layer.input_quantizer.qrange()
            activation = {"bits": layer.a_bits, "signed": bool(layer.input_quantizer.signed),
                          "qmin": a_min, "qmax": a_max, "step_size": f"{name}.input_quantizer.step_size"}
        manifest_layers[name] = {
            "type": type(layer).__name__,
            "weight": {
                "bits": layer.w_bits, "signed": bool(layer.weight_quantizer.signed), "qmin": qmin, "qmax": qmax,
                "shape": list(layer.weight.shape), "dtype": _dtype_name(layer.weight.dtype),
                "per_channel": layer.weight_quantizer.per_channel, "step_size": f"{name}.weight_quantizer.step_size",
                "codes": codes_key, "packed_bytes": tensors[codes_key].numel(),
            },
            "input": activation,
        }

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # The manifest is written last, so an interrupted export is reported as incomplete, never loaded stale.
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    save_file(_unshared(tensors), folder / WEIGHTS_FILE, metadata={"format": "pt", FORMAT: str(FORMAT_VERSION)})
    follow_umask(folder / WEIGHTS_FILE)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if isinstance(config.quantization_config, dict):
        config.quantization_config["step_size_format"] = "linear"
    else:
        config.quantization_config.step_size_format = "linear"
    config.save_pretrained(folder)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "saq_hf_version": __version__,
        "model_class": type(model).__name__, "weights_file": WEIGHTS_FILE,
        "weights_sha256": _sha256(folder / WEIGHTS_FILE), "packing": PACKING, "layers": manifest_layers,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _short(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _corrupt(folder: Path, what: str) -> ValueError:
    return ValueError(f"export folder {folder} is corrupt: {what}; re-run saq-hf export")


def _read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} does not exist: pass the OUT_DIR written by saq-hf export")
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"export folder {folder} is incomplete: missing {', '.join(missing)}; re-run saq-hf export"
        )
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise _corrupt(folder, f"{MANIFEST_FILE} is not valid JSON ({str(error)[:100]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(folder, f"{MANIFEST_FILE} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _corrupt(folder, f"{MANIFEST_FILE} has no valid format_version")
    if version > FORMAT_VERSION:
        raise ValueError(f"export folder {folder} has format version {version}, newer than this saq-hf reads "
                         f"({FORMAT_VERSION}): upgrade saq-hf")
    if not isinstance(manifest.get("layers"), dict) or not manifest["layers"]:
        raise _corrupt(folder, f"{MANIFEST_FILE} lists no quantized layers")
    for name, entry in manifest["layers"].items():
        problem = _entry_problem(entry)
        if problem:
            raise _corrupt(folder, f"layer {name[:100]!r} has a malformed entry or tensors ({problem})")
    return manifest


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _entry_problem(entry) -> str | None:
    """What is malformed in one layer entry of the manifest (types and ranges), or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("weight"), dict):
        return "entry is not an object with a 'weight' object"
    weight, activation = entry["weight"], entry.get("input")
    if activation is not None and not isinstance(activation, dict):
        return "'input' is neither null nor an object"
    parts = [(weight, ("bits", "qmin", "qmax", "shape", "dtype", "codes", "step_size"))]
    parts += [(activation, ("bits", "signed", "qmin", "qmax", "step_size"))] if activation else []
    for part, fields in parts:
        missing = [key for key in fields if key not in part]
        if missing:
            return f"missing {', '.join(missing)}"
    for part in (weight, activation) if activation else (weight,):
        if not _is_int(part["bits"], 2, 8):
            return f"bits must be an integer in 2..8, got {str(part['bits'])[:40]}"
        if not (_is_int(part["qmin"], -128, 255) and _is_int(part["qmax"], -128, 255)
                and 0 < part["qmax"] - part["qmin"] < 2 ** part["bits"]):
            return "qmin/qmax do not form a code range of its bits"
        if not isinstance(part["step_size"], str):
            return "step_size must name a tensor"
    shape = weight["shape"]
    if not (isinstance(shape, list) and 1 <= len(shape) <= 5 and all(_is_int(d, 1, 2**31) for d in shape)):
        return "weight shape must be a list of 1 to 5 positive integers"
    if weight["dtype"] not in ("float32", "float16", "bfloat16", "float64") or not isinstance(weight["codes"], str):
        return "weight dtype or codes name is invalid"
    return None


def _read_weights(folder: Path, manifest: dict) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if _sha256(path) != manifest.get("weights_sha256"):
        raise _corrupt(folder, f"{WEIGHTS_FILE} does not match the checksum in {MANIFEST_FILE} "
                               "(truncated or modified)")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise _corrupt(folder, f"{WEIGHTS_FILE} is not a readable safetensors file ({error})") from None


def _read_config(folder: Path, manifest: dict) -> tuple[type[PreTrainedModel], transformers.PretrainedConfig]:
    if "auto_map" in (_json_object(folder / CONFIG_FILE) or {}):
        raise _corrupt(folder, f"{CONFIG_FILE} asks to run Python code from the folder (auto_map), which saq-hf never "
                               "does")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, RecursionError) as error:
        raise _corrupt(folder, f"{CONFIG_FILE} cannot be read ({_short(error)})") from None
    quant_config = getattr(config, "quantization_config", None)
    if not isinstance(quant_config, dict) or quant_config.get("quant_method") != QUANT_METHOD:
        raise _corrupt(folder, f"{CONFIG_FILE} has no saq quantization_config")
    model_class = getattr(transformers, str(manifest.get("model_class")), None)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise _corrupt(folder, f"model_class {manifest.get('model_class')!r} is not a transformers model class")
    return model_class, config


def _layer_weight(entry: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack one layer's codes (removing them from ``tensors``) and dequantize them: ``(codes, weight)``."""
    shape, dtype = entry["shape"], getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {entry['dtype']!r}")
    packed, step_size = tensors[entry["codes"]], tensors[entry["step_size"]]
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (count * entry["bits"] + 7) // 8:
        raise ValueError(f"{entry['codes']} holds {packed.numel()} bytes, not the {(count * entry['bits'] + 7) // 8} "
                         f"of {count} {entry['bits']}-bit codes")
    if step_size.numel() not in (1, shape[0]) or not step_size.is_floating_point():
        raise ValueError(f"{entry['step_size']} has {step_size.numel()} values for {shape[0]} output channels")
    codes = unpack_codes(tensors.pop(entry["codes"]), entry["bits"], count, entry["qmin"])
    codes = codes.reshape(shape)
    return codes, _dequantize(codes, tensors[entry["step_size"]], dtype)


def _check_layer(folder: Path, name: str, entry: dict, layer: nn.Module, codes: torch.Tensor) -> None:
    activation = entry["input"]
    bits = (entry["weight"]["bits"], activation["bits"] if activation else None)
    if bits != (layer.w_bits, layer.a_bits):
        raise _corrupt(folder, f"layer '{name}' has (w_bits, a_bits) {bits} in {MANIFEST_FILE} but "
                               f"{(layer.w_bits, layer.a_bits)} in {CONFIG_FILE}")
    if activation and activation["signed"] != bool(layer.input_quantizer.signed):
        raise _corrupt(folder, f"activation sign of '{name}' differs between {MANIFEST_FILE} and {WEIGHTS_FILE}")
    _check_fixed_point(name, layer, layer.weight, codes)


@torch.no_grad()
def load_exported(out_dir: str | os.PathLike) -> PreTrainedModel:
    """Rebuild the model written by :func:`export_quantized`, in eval mode, from the export folder alone.

    Quantized layers are the usual ``QuantLinear``/``QuantConv2d`` with ``weight = codes * step_size``; their
    forward re-quantizes that weight to the same codes, so the logits equal the fake-quant model's. Raises
    ``FileNotFoundError`` for a missing or incomplete folder and ``ValueError`` for a corrupt one.
    """
    folder = Path(out_dir)
    manifest = _read_manifest(folder)
    tensors = _read_weights(folder, manifest)
    model_class, config = _read_config(folder, manifest)
    codes = {}
    for name, entry in manifest["layers"].items():
        try:
            codes[name], tensors[f"{name}.weight"] = _layer_weight(entry["weight"], tensors)
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise _corrupt(folder, f"layer '{name}' has a malformed entry or tensors ({_short(error)})") from None
    # The rebuilt state dict is a fake-quant checkpoint, so transformers loads it through the saq HfQuantizer
    # exactly as from_pretrained loads a saved run: built on the meta device, no re-initialised step sizes.
    try:
        model, info = model_class.from_pretrained(None, config=config, state_dict=tensors, output_loading_info=True)
    except (RuntimeError, ValueError, TypeError, AttributeError, OverflowError) as error:
        raise _corrupt(folder, f"{WEIGHTS_FILE} does not fit {CONFIG_FILE} ({_short(error)})") from None
    unfit = {kind: sorted(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]}
    if unfit:
        raise _corrupt(folder, f"{WEIGHTS_FILE} does not fit {CONFIG_FILE}: {unfit}")
    layers = dict(quantized_layers(model))
    if set(layers) != set(manifest["layers"]):
        raise _corrupt(folder, f"{MANIFEST_FILE} lists quantized layers {sorted(manifest['layers'])} but "
                               f"{CONFIG_FILE}'s quantization_config quantizes {sorted(layers)}")
    for name, entry in manifest["layers"].items():
        try:
            _check_layer(folder, name, entry, layers[name], codes[name])
        except (KeyError, TypeError, AttributeError) as error:
            raise _corrupt(folder, f"layer '{name}' has a malformed entry ({error!r})"[:300]) from None
    return model.eval()


def size_table(out_dir: str | os.PathLike) -> str:
    """Printable table of an export folder: FP32 bytes vs exported bytes of the quantized layers, per bit-width.

    Measured on the tensors stored in ``weights.safetensors``. A layer's exported bytes are its packed weight
    codes plus its weight and activation step sizes and quantizer flags; its bias is stored unchanged and counted
    with the other unquantized tensors. FP32 bytes are 4 per weight element.
    """
    folder = Path(out_dir)
    manifest = _read_manifest(folder)
    tensors = _read_weights(folder, manifest)
    rows = defaultdict(lambda: [0, 0, 0, 0])  # layers, weights, FP32 bytes, exported bytes
    for name, entry in manifest["layers"].items():
        count = math.prod(entry["weight"]["shape"])
        exported = sum(tensor.nbytes for key, tensor in tensors.items()
                       if key.startswith(name + ".") and key != f"{name}.bias")
        for bits in (f"W{entry['weight']['bits']}", "all"):
            rows[bits] = [total + part for total, part in zip(rows[bits], (1, count, 4 * count, exported))]
    other_bytes = sum(tensor.nbytes for tensor in tensors.values()) - rows["all"][3]
    lines = [f"{'bits':<5}{'layers':>7}{'weights':>11}{'FP32 bytes':>13}{'exported bytes':>16}{'ratio':>8}"]
    for bits in sorted((b for b in rows if b != "all"), key=lambda b: int(b[1:])) + ["all"]:
        layers, count, fp32, exported = rows[bits]
        lines.append(f"{bits:<5}{layers:>7}{count:>11,}{fp32:>13,}{exported:>16,}{exported / fp32:>8.3f}")
    lines.append(f"unquantized tensors, kept as they are (biases, norms, embeddings, ...): {other_bytes:,} bytes")
    lines.append(f"{folder / WEIGHTS_FILE}: {(folder / WEIGHTS_FILE).stat().st_size:,} bytes on disk")
    return "\n".join(lines)


def _json_object(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def export_command(run_dir: str, out_dir: str, onnx: bool = False) -> str:
    """``saq-hf export RUN_DIR OUT_DIR [--onnx]``: export the quantized model saved in ``run_dir``.

    Writes the integer export to ``out_dir`` (and ``out_dir/model.onnx`` with ``onnx=True``); returns the size
    table to print. Every check (the onnx package included) runs before anything is written.
    """
    if onnx:
        _require_onnx()
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {run}: pass the output folder of a saq-hf training run "
                                "(the one holding config.json and model.safetensors)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{out} already holds files that are not a saq-hf export: choose a new or empty OUT_DIR")
    if "auto_map" in (_json_object(run / CONFIG_FILE) or {}):
        raise ValueError(f"{run / CONFIG_FILE} asks to run Python code from the folder (auto_map); saq-hf never runs "
                         "code shipped with a model: export a folder written by saq-hf")
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(run, trust_remote_code=False)
    except Exception as error:  # truncated or corrupt weights, a config that does not fit them: many types
        raise ValueError(f"could not load the model in {run}: {_short(error)}") from None
    export_quantized(model, out_dir)
    table = size_table(out_dir)
    if onnx:
        path = export_onnx(model, Path(out_dir) / ONNX_FILE)
        table += f"\n{path}: {path.stat().st_size:,} bytes on disk (int8 weight codes, Q/DQ nodes)"
    return table
