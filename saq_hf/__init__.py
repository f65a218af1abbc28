"""saq-hf: Sharpness-Aware Quantization for Hugging Face vision models.

Importing the package registers the ``saq`` quantization method with transformers, so
``AutoModelForImageClassification.from_pretrained`` rebuilds saved saq-hf checkpoints.
"""

from ._version import __version__
from .config import QuantConfig
from .export import export_quantized, load_exported
from .hf_quantizer import SAQHfQuantizer
from .quant import calibrate, quantized_layer_bits
from .quantize import quantize_model
from .search import BitsPlan, search_bits
from .trainer import SAQTrainer
from .training_args import SAQTrainingArguments

__all__ = ["QuantConfig", "SAQHfQuantizer", "calibrate", "quantize_model", "quantized_layer_bits", "SAQTrainer",
           "SAQTrainingArguments", "__version__", "export_quantized", "load_exported", "BitsPlan", "search_bits"]
