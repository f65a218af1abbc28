"""The ``saq`` HfQuantizer: how transformers' ``from_pretrained`` rebuilds and loads a saq-hf model."""

from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer

from .config import QUANT_METHOD
from .quant.convert import convert_layers


@register_quantizer(QUANT_METHOD)
class SAQHfQuantizer(HfQuantizer):
    """Fake-quantized (QAT-trainable) checkpoints: latent FP weights plus LSQ step sizes, in safetensors.

    A saved saq model is rebuilt on the meta device before its weights load, so the checkpoint fills latent
    weights, step sizes and quantizer state exactly. An FP checkpoint loaded with a ``QuantConfig`` is
    loaded as usual and quantized afterwards, so step sizes are initialised from the real weights.
    """

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            convert_layers(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            from .quantize import resolve_defaults

            convert_layers(model, resolve_defaults(model, self.quantization_config))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True
