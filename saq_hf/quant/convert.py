"""Swap ``nn.Linear``/``nn.Conv2d`` for fake-quantized layers, by name rules, and calibrate activations."""

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

import torch
from torch import nn

from .layers import QuantConv2d, QuantLayerMixin, QuantLinear, quantize_weights_together, quantized_layers

# The paper's ViT setting (and the authors' CNN code) keeps the patch embedding / first layer and the
# classifier head at 8 bits; these are the module names of those layers in transformers' models.
ARCHITECTURE_8BIT_MODULES = {
    "vit": ["*embeddings.patch_embeddings.projection", "classifier"],
    "deit": ["*embeddings.patch_embeddings.projection", "cls_classifier", "distillation_classifier", "classifier"],
    "convnext": ["*embeddings.patch_embeddings", "classifier"],
    "convnextv2": ["*embeddings.patch_embeddings", "classifier"],
}


def name_matches(name: str, pattern: str) -> bool:
    """Glob ``pattern`` against a module name, or against any dotted suffix of it (``classifier`` matches
    ``model.classifier``)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def _convertible(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, QuantLayerMixin)


def default_bits_overrides(model: nn.Module) -> dict[str, dict[str, int]]:
    """8-bit patterns for ``model``: per architecture for known HF models, else its first and last layer."""
    eight_bit = {"w_bits": 8, "a_bits": 8}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = [name for name, module in model.named_modules() if _convertible(module)]
    if model_type in ARCHITECTURE_8BIT_MODULES:
        # Only the patterns this model has (DeiT's distillation head exists in one class only): a saved pattern
        # that matches nothing is refused on load.
        return {pattern: dict(eight_bit) for pattern in ARCHITECTURE_8BIT_MODULES[model_type]
                if any(name_matches(name, pattern) for name in names)}
    return {name: dict(eight_bit) for name in dict.fromkeys(names[:1] + names[-1:])}


def resolve_defaults(model: nn.Module, config):
    """Fill the architecture-dependent defaults into ``config`` (a ``QuantConfig``) so the saved config is explicit."""
    if config.modules_to_not_convert is None:
        config.modules_to_not_convert = []
    if config.bits_overrides is None:
        config.bits_overrides = default_bits_overrides(model)
    return config


def resolve_layer_bits(name: str, config) -> tuple[int, int | None] | None:
    """``(w_bits, a_bits)`` for the layer called ``name``; ``None`` when it stays unconverted."""
    if any(name_matches(name, pattern) for pattern in config.modules_to_not_convert or []):
        return None
    w_bits, a_bits = config.w_bits, config.a_bits
    for pattern, bits in (config.bits_overrides or {}).items():
        if name_matches(name, pattern):
            w_bits, a_bits = bits.get("w_bits", w_bits), bits.get("a_bits", a_bits)
    return w_bits, a_bits


def _quantized_copy(module: nn.Module, w_bits: int, a_bits: int | None, per_channel: bool,
                    step_size_format: str) -> nn.Module:
    factory = {"device": module.weight.device, "dtype": module.weight.dtype, "step_size_format": step_size_format}
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        layer = QuantLinear(module.in_features, module.out_features, bias=has_bias, w_bits=w_bits,
                            a_bits=a_bits, per_channel=per_channel, **factory)
    else:
        layer = QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, groups=module.groups,
                            bias=has_bias, padding_mode=module.padding_mode, w_bits=w_bits, a_bits=a_bits,
                            per_channel=per_channel, **factory)
    # Reuse the Parameter objects: same names, same storage, same requires_grad.
    layer.weight = module.weight
    if has_bias:
        layer.bias = module.bias
    layer.train(module.training)
    return layer


def planned_layers(model: nn.Module, config) -> dict[str, tuple[int, int | None]]:
    """``{name: (w_bits, a_bits)}`` of the layers :func:`convert_layers` converts under ``config``.

    ``ValueError`` when nothing would be converted, or when a ``modules_to_not_convert`` or ``bits_overrides``
    pattern matches no layer: a typo, or a saved config that no longer fits the weights (a layer would come back
    at other bits, or a trained quantizer would be dropped).
    """
    names = [name for name, module in model.named_modules() if _convertible(module)]
    for key in ("modules_to_not_convert", "bits_overrides"):
        for pattern in getattr(config, key) or []:
            if not any(name_matches(name, pattern) for name in names):
                raise ValueError(f"{key} pattern {pattern!r} matches no nn.Linear/nn.Conv2d layer of the model")
    plan = {name: bits for name in names if (bits := resolve_layer_bits(name, config)) is not None}
    if not plan:
        raise ValueError("no nn.Linear or nn.Conv2d left to quantize: check modules_to_not_convert")
    return plan


def convert_layers(model: nn.Module, config) -> dict[str, tuple[int, int | None]]:
    """Replace every convertible layer of ``model`` in place; returns ``{name: (w_bits, a_bits)}``.

    Weight step sizes are initialised from the weights unless they live on the meta device (a checkpoint
    is about to be loaded into them).
    """
    existing = next((name for name, _ in quantized_layers(model)), None)
    if existing is not None:
        raise ValueError(
            f"model is already quantized (found a fake-quantized layer at '{existing}'); "
            "quantize the full-precision model once, or load the quantized checkpoint with from_pretrained"
        )
    converted = planned_layers(model, config)
    for name, bits in converted.items():
        layer = _quantized_copy(model.get_submodule(name), *bits, per_channel=config.per_channel,
                                step_size_format=config.step_size_format)
        if layer.weight.device.type != "meta":
            layer.weight_quantizer.initialize_from(layer.weight)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    quantize_weights_together(model)
    return converted


def quantized_layer_bits(model: nn.Module) -> dict[str, tuple[int, int | None]]:
    """``{layer name: (w_bits, a_bits)}`` of a quantized model; ``a_bits`` is ``None`` for weight-only."""
    return {name: (layer.w_bits, layer.a_bits) for name, layer in quantized_layers(model)}


def _run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (tuple, list)):
        model(batch[0])
    else:
        model(batch)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable) -> int:
    """Initialise every activation step size from ``batches`` (mean of the per-batch LSQ estimates).

    A batch is a dict of model inputs, a ``(inputs, labels)`` pair, or an input tensor. Returns the number
    of batches used. Calibrating again overwrites earlier step sizes.
    """
    quantizers = {name: layer.input_quantizer for name, layer in quantized_layers(model)
                  if layer.input_quantizer is not None}
    was_training = model.training
    model.eval()
    for quantizer in quantizers.values():
        quantizer.start_calibration()
    count, failed = 0, []
    try:
        for batch in batches:
            try:
                _run_batch(model, batch)
            except ValueError as error:  # e.g. a non-finite first batch for an auto-signed quantizer
                raise ValueError(f"calibration batch {count}: {error}") from None
            count += 1
    finally:
        for name, quantizer in quantizers.items():
            try:
                quantizer.finish_calibration()
            except ValueError:  # non-finite estimate: the step size is left as it was
                failed.append(name)
        model.train(was_training)
    if failed:
        raise ValueError(f"calibration saw NaN or infinite inputs at {len(failed)} layer(s) (first: '{failed[0]}'), "
                         "so their activation step sizes cannot be set: check the batches and their normalisation")
    if count == 0:
        raise ValueError("calibrate() got no batches: pass at least one batch of model inputs")
    return count
