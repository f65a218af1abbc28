"""ONNX export of a saq-hf model: ``pixel_values -> logits`` with int8 weight codes behind ``DequantizeLinear`` and
``QuantizeLinear -> Clip -> DequantizeLinear`` on quantized inputs (torch's TorchScript exporter)."""

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .export_layers import _dequantize, _exportable_layers
from .quant import QuantConv2d

ONNX_FILE = "model.onnx"
ONNX_INSTALL = 'pip install "saq-hf[onnx]"'


def _require_onnx() -> None:
    if importlib.util.find_spec("onnx") is None:
        raise ModuleNotFoundError(f"ONNX export needs the onnx package: {ONNX_INSTALL}", name="onnx")


class _ActivationQDQ(torch.autograd.Function):
    """LSQ's activation fake-quant; in ONNX ``QuantizeLinear`` -> ``Clip`` to the b-bit range -> ``DequantizeLinear``.

    QuantizeLinear saturates to the 8-bit range only; clipping the integers to ``qmin..qmax`` afterwards equals
    LSQ's clamp-then-round because the bounds are integers.
    """

    @staticmethod
    def forward(ctx, x, step_size, qmin, qmax):
        return torch.clamp(x / step_size, qmin, qmax).round() * step_size

    @staticmethod
    def symbolic(g, x, step_size, qmin, qmax):
        dtype = torch.int8 if qmin < 0 else torch.uint8
        zero_point = g.op("Constant", value_t=torch.tensor(0, dtype=dtype))
        codes = g.op("QuantizeLinear", x, step_size, zero_point)
        codes = g.op("Clip", codes, g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype)))
        return g.op("DequantizeLinear", codes, step_size, zero_point)


class _WeightDQ(torch.autograd.Function):
    """``codes * step_size`` from int8 codes; in ONNX one ``DequantizeLinear`` (per output channel: axis 0)."""

    @staticmethod
    def forward(ctx, codes, step_size):
        shape = (-1,) + (1,) * (codes.dim() - 1) if step_size.dim() else ()
        return _dequantize(codes, step_size.reshape(shape), step_size.dtype)

    @staticmethod
    def symbolic(g, codes, step_size):
        return g.op("DequantizeLinear", codes, step_size, axis_i=0)


class _OnnxQuantLayer(nn.Module):
    """A quantized layer as the ONNX graph holds it: int8 weight codes, step sizes, Q/DQ nodes, float bias."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        quantizer = layer.weight_quantizer
        self.register_buffer("weight_codes", quantizer.codes(layer.weight).to(torch.int8))
        step_size = quantizer.step_size.detach().clone()
        self.register_buffer("weight_step_size", step_size.flatten() if quantizer.per_channel else step_size)
        self.bias = layer.bias
        self.conv_args = None
        if isinstance(layer, QuantConv2d):
            if layer.padding_mode != "zeros":
                raise ValueError(f"export_onnx supports zero-padded convolutions only, got padding_mode="
                                 f"{layer.padding_mode!r}; use export_quantized for this model")
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        self.activation_range = layer.input_quantizer.qrange() if layer.input_quantizer is not None else None
        if layer.input_quantizer is not None:
            self.register_buffer("input_step_size", layer.input_quantizer.step_size.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `<layer>.weight.dtype` in some forwards (ViT's patch embedding).
        return _WeightDQ.apply(self.weight_codes, self.weight_step_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_range is not None:
            x = _ActivationQDQ.apply(x, self.input_step_size, *self.activation_range)
        if self.conv_args is not None:
            return nn.functional.conv2d(x, self.weight, self.bias, *self.conv_args)
        return nn.functional.linear(x, self.weight, self.bias)


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 17) -> Path:
    """Write ``model`` as an ONNX graph ``pixel_values -> logits`` with int8 weight codes and Q/DQ nodes.

    Each quantized layer becomes ``DequantizeLinear(int8 codes, step sizes)`` for its weight and, when its input
    is quantized, ``QuantizeLinear -> Clip(qmin, qmax) -> DequantizeLinear`` on its input; everything else is
    the model's float graph. Weight codes are stored one per byte (ONNX has no 2/3-bit type). The batch size is
    dynamic, the image size is ``config.image_size``. Uses torch's TorchScript ONNX exporter (deprecated since
    torch 2.9, still in 2.13), which needs the ``onnx`` package but not ``onnxscript``.
    """
    _require_onnx()
    layers = _exportable_layers(model)
    config = model.config
    size = getattr(config, "image_size", None)
    if size is None or getattr(config, "num_channels", None) is None:
        raise ValueError("export_onnx needs an image model whose config has image_size and num_channels")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    graph_model = copy.deepcopy(model).eval()
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(graph_model.get_submodule(parent) if parent else graph_model, child, _OnnxQuantLayer(layer))
    parameter = next(graph_model.parameters())
    example = torch.zeros(1, config.num_channels, height, width, dtype=parameter.dtype, device=parameter.device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Expected for this path: the TorchScript exporter's deprecation notice and tracer notes on the image
        # size checks in transformers' forwards (the image size is fixed by the config anyway).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(_Logits(graph_model), (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    return path
