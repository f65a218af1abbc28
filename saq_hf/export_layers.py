"""A quantized model's layers as the export sees them: the checks that a model is ready to export, and the integer
codes <-> weight arithmetic (``codes * step_size``) that the integer export, its loader and the ONNX graph share."""

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import QUANT_METHOD, QuantConfig
from .quant import quantized_layers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dequantize(codes: torch.Tensor, step_size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Same operands, dtype and broadcast as LSQ's forward (`codes * step_size.to(x.dtype)`), so bit-identical.
    return codes.to(dtype) * step_size.to(dtype)


def _check_fixed_point(name: str, layer: nn.Module, weight: torch.Tensor, codes: torch.Tensor) -> None:
    changed = int((layer.weight_quantizer.codes(weight) != codes).sum())
    if changed:
        raise ValueError(
            f"re-quantizing the dequantized {_dtype_name(weight.dtype)} weight of '{name}' changes {changed} "
            "codes, so it would not reload exactly: export the model in float32 (model.float())"
        )


def _exportable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of a saq-hf model that is ready to export; ``ValueError`` saying what to do otherwise."""
    layers = dict(quantized_layers(model))
    if not layers:
        raise ValueError("model is not quantized with saq-hf: run saq_hf.quantize_model first")
    quant_config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(quant_config, QuantConfig):
        quant_config = quant_config.to_dict()
    if not isinstance(model, PreTrainedModel) or (quant_config or {}).get("quant_method") != QUANT_METHOD:
        raise ValueError(
            "export needs a transformers model with a saq quantization_config on its config: quantize it with "
            "saq_hf.quantize_model, or load the saved run with from_pretrained after import saq_hf"
        )
    for name, layer in layers.items():
        if layer.weight_perturbation is not None:
            raise ValueError(f"layer '{name}' carries a SAQ weight perturbation: export outside "
                             "perturb_quantized_weights()")
        if not bool(layer.weight_quantizer.initialized):
            raise ValueError(f"weight step size of '{name}' is not initialised: quantize the model with "
                             "saq_hf.quantize_model before exporting")
        if layer.input_quantizer is not None and not bool(layer.input_quantizer.initialized):
            raise ValueError(f"activation step size of '{name}' is not initialised: run saq_hf.calibrate(model, "
                             "batches) or train the model before exporting")
        layer.weight_quantizer.check_step_size(f"{name}.weight_quantizer.step_size")
        if layer.input_quantizer is not None:
            layer.input_quantizer.check_step_size(f"{name}.input_quantizer.step_size")
    return layers
