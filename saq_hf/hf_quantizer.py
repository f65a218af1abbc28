"""The ``saq`` HfQuantizer: how transformers' ``from_pretrained`` rebuilds and loads a saq-hf model."""

import re
import warnings

import transformers
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer

from .compat import check_loading_internals
from .config import QUANT_METHOD
from .quant.convert import convert_layers, resolve_defaults
from .quant.layers import quantized_layers

QUANTIZER_TENSOR = re.compile(r"(^|\.)(weight_quantizer|input_quantizer)\.")


def _keys_message(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"{len(keys)} {kind} quantizer tensor(s) ({shown})"


def _check_quantizer_keys(model) -> None:
    """Make this load fail when a quantizer tensor of the checkpoint is left unused (its layer is not quantized
    under the saved config) or a quantized layer finds no state in the checkpoint (its step size would be
    uninitialised memory). transformers only logs both; its report is final in ``_adjust_missing_and_unexpected_keys``
    (5.x), which this wraps on the instance."""
    adjust = model._adjust_missing_and_unexpected_keys

    def adjust_and_check(loading_info):
        adjust(loading_info)
        del model._adjust_missing_and_unexpected_keys
        model._saq_keys_checked = True
        unused = sorted(key for key in loading_info.unexpected_keys if QUANTIZER_TENSOR.search(key))
        missing = sorted(key for key in loading_info.missing_keys if QUANTIZER_TENSOR.search(key))
        problems = ([_keys_message("unused", unused)] if unused else []) + (
            [_keys_message("missing", missing)] if missing else [])
        if problems:
            raise ValueError(f"the checkpoint does not fit its quantization_config: {'; '.join(problems)}; restore "
                             "the config.json saved with these weights")

    model._adjust_missing_and_unexpected_keys = adjust_and_check


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
            check_loading_internals(type(model))
            convert_layers(model, self.quantization_config)
            _check_quantizer_keys(model)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            if not model.__dict__.pop("_saq_keys_checked", False):
                # The method exists in its expected shape (checked before loading) but this release did not call it.
                warnings.warn("saq-hf could not check this checkpoint's quantizer tensors against its "
                              f"quantization_config with transformers {transformers.__version__}", stacklevel=2)
                model.__dict__.pop("_adjust_missing_and_unexpected_keys", None)
            for name, layer in quantized_layers(model):
                layer.weight_quantizer.check_step_size(f"{name}.weight_quantizer.step_size")
                if layer.input_quantizer is not None:
                    layer.input_quantizer.check_step_size(f"{name}.input_quantizer.step_size")
        if not self.pre_quantized:
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
