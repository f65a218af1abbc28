"""LSQ quantizers, fake-quantized layers and model conversion (depends on torch only)."""

from .convert import calibrate, convert_layers, default_bits_overrides, quantized_layer_bits
from .layers import (
    QuantConv2d,
    QuantLayerMixin,
    QuantLinear,
    capture_quantized_weights,
    is_quantized,
    perturb_quantized_weights,
    quantize_weights_together,
    quantized_layers,
    recomputes_activations,
)
from .lsq import quant_range
from .quantizer import LSQQuantizer

__all__ = [
    "LSQQuantizer",
    "QuantConv2d",
    "QuantLayerMixin",
    "QuantLinear",
    "calibrate",
    "capture_quantized_weights",
    "convert_layers",
    "default_bits_overrides",
    "is_quantized",
    "perturb_quantized_weights",
    "quant_range",
    "quantize_weights_together",
    "quantized_layer_bits",
    "quantized_layers",
    "recomputes_activations",
]
