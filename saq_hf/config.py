"""``QuantConfig``: the ``quantization_config`` that goes into ``config.json`` and back out unchanged."""

from typing import Any

from transformers.quantizers.auto import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "saq"
STEP_SIZE_FORMATS = ("log", "linear")  # as saq_hf.quant.quantizer (config.py stays free of torch)


def _check_bits(field: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        extra = " or None (weights only)" if allow_none else ""
        raise ValueError(f"{field} must be an integer in 2..8{extra}, got {value!r}")


def _normalise_overrides(overrides: Any) -> dict[str, dict[str, int | None]] | None:
    if overrides is None:
        return None
    if not isinstance(overrides, dict):
        raise ValueError(
            f"bits_overrides must be a dict of module-name pattern -> bits, got {type(overrides).__name__}"
        )
    normalised = {}
    for pattern, bits in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"bits_overrides keys must be non-empty module-name patterns, got {pattern!r}")
        if isinstance(bits, int) and not isinstance(bits, bool):
            bits = {"w_bits": bits, "a_bits": bits}
        if not isinstance(bits, dict) or not bits or set(bits) - {"w_bits", "a_bits"}:
            raise ValueError(
                f"bits_overrides[{pattern!r}] must be an int or a dict with keys w_bits/a_bits, got {bits!r}"
            )
        if "w_bits" in bits:
            _check_bits(f"bits_overrides[{pattern!r}].w_bits", bits["w_bits"])
        if "a_bits" in bits:
            _check_bits(f"bits_overrides[{pattern!r}].a_bits", bits["a_bits"], allow_none=True)
        normalised[pattern] = dict(bits)
    return normalised


@register_quantization_config(QUANT_METHOD)
class QuantConfig(QuantizationConfigMixin):
    """LSQ fake-quantization settings for :func:`saq_hf.quantize_model` and ``from_pretrained``.

    Args:
        w_bits: weight bit-width, 2..8 (signed range).
        a_bits: input-activation bit-width, 2..8, or ``None`` to quantize weights only.
        per_channel: one weight step size per output channel (``True``) or per tensor.
        modules_to_not_convert: module-name patterns (globs, matched against the full name or any dotted
            suffix of it) whose layers stay in floating point.
        bits_overrides: ``{pattern: bits}`` or ``{pattern: {"w_bits": b, "a_bits": b}}`` for mixed precision;
            later patterns win. ``None`` means the architecture default, filled in when the model is
            quantized: ViT/DeiT/ConvNeXt keep the patch embedding and classifier at 8 bits (the paper's
            setting); any other model keeps its first and last layer at 8 bits.
        step_size_format: how the checkpoint stores the LSQ step sizes: ``"log"`` (``log_step_size``, what training
            writes) or ``"linear"`` (``step_size``: exported models, and checkpoints written before the log form,
            whose configs do not name a format).
    """

    def __init__(
        self,
        w_bits: int = 4,
        a_bits: int | None = 4,
        per_channel: bool = True,
        modules_to_not_convert: list[str] | None = None,
        bits_overrides: dict[str, Any] | None = None,
        step_size_format: str = "log",
        **kwargs,
    ):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be '{QUANT_METHOD}' for QuantConfig, got {quant_method!r}")
        if kwargs:
            raise ValueError(f"unknown QuantConfig field(s): {', '.join(sorted(kwargs))}")
        self.quant_method = QUANT_METHOD
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.per_channel = per_channel
        self.modules_to_not_convert = modules_to_not_convert
        self.bits_overrides = bits_overrides
        self.step_size_format = step_size_format
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        # A saved config without the field was written when step sizes were stored as they are.
        return super().from_dict({"step_size_format": "linear", **config_dict}, return_unused_kwargs, **kwargs)

    def post_init(self) -> None:
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits, allow_none=True)
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"per_channel must be true or false, got {self.per_channel!r}")
        if self.modules_to_not_convert is not None:
            if isinstance(self.modules_to_not_convert, str) or not all(
                isinstance(p, str) and p for p in self.modules_to_not_convert
            ):
                raise ValueError(
                    "modules_to_not_convert must be a list of module-name patterns, "
                    f"got {self.modules_to_not_convert!r}"
                )
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        self.bits_overrides = _normalise_overrides(self.bits_overrides)
        if self.step_size_format not in STEP_SIZE_FORMATS:
            raise ValueError(f"step_size_format must be one of {STEP_SIZE_FORMATS}, got {self.step_size_format!r}")

    @property
    def tag(self) -> str:
        """Short bit-width label, ``W4A4`` or ``W4`` (weights only)."""
        return f"W{self.w_bits}A{self.a_bits}" if self.a_bits else f"W{self.w_bits}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "per_channel": self.per_channel,
            "modules_to_not_convert": self.modules_to_not_convert,
            "bits_overrides": self.bits_overrides,
            "step_size_format": self.step_size_format,
        }
