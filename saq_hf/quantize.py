"""``quantize_model``: fake-quantize any ``nn.Module`` in place and record how on its config."""

from torch import nn

from .config import QuantConfig
from .quant.convert import convert_layers, quantized_layer_bits, resolve_defaults


def quantize_model(model: nn.Module, config: QuantConfig | None = None, *, verbose: bool = False) -> nn.Module:
    """Replace ``nn.Linear``/``nn.Conv2d`` layers of ``model`` by LSQ fake-quantized ones, in place.

    Weight step sizes are initialised from the weights now; activation step sizes on the first batch the
    model sees, or earlier with :func:`saq_hf.calibrate`. For a transformers ``PreTrainedModel`` the config is
    stored as ``model.config.quantization_config`` and the model gets the ``saq`` HfQuantizer, so
    ``save_pretrained``, ``from_pretrained`` and ``Trainer`` handle it like any quantized model.
    ``quantized_layer_bits(model)`` lists what was converted. Raises ``ValueError`` on an already
    quantized model.
    """
    from transformers import PreTrainedModel

    from .hf_quantizer import SAQHfQuantizer

    config = config if config is not None else QuantConfig()
    if isinstance(model, PreTrainedModel):
        # The same hooks from_pretrained runs when it quantizes an FP checkpoint on load.
        quantizer = SAQHfQuantizer(config, pre_quantized=False)
        quantizer.preprocess_model(model)
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    else:
        convert_layers(model, resolve_defaults(model, config))
    if verbose:
        converted = quantized_layer_bits(model)
        width = max(len(name) for name in converted)
        for name, (w_bits, a_bits) in converted.items():
            print(f"{name:<{width}}  W{w_bits}" + (f"A{a_bits}" if a_bits else ""))
    return model
