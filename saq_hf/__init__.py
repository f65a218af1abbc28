"""saq-hf: Sharpness-Aware Quantization for Hugging Face vision models.

Importing the package registers the ``saq`` quantization method with transformers, so
``AutoModelForImageClassification.from_pretrained`` rebuilds saved saq-hf checkpoints.
"""

from .config import QuantConfig
from .hf_quantizer import SAQHfQuantizer
from .quant import calibrate, quantized_layer_bits
from .quantize import quantize_model
from .trainer import SAQTrainer, SAQTrainingArguments

__version__ = "0.1.0"

__all__ = ["QuantConfig", "SAQHfQuantizer", "calibrate", "quantize_model", "quantized_layer_bits", "SAQTrainer",
           "SAQTrainingArguments", "__version__"]

from .export import export_quantized, load_exported  # noqa: E402  (export imports __version__)

__all__ += ["export_quantized", "load_exported"]

from .search import BitsPlan, search_bits  # noqa: E402

__all__ += ["BitsPlan", "search_bits"]
