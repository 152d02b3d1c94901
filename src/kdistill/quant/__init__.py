"""Quantization-aware distillation: binary/ternary/uniform weights, learned activation quantizers,
BinaryBERT's weight splitting and a packed 1-bit export."""
from kdistill.quant.linear import QuantLinear, split_layer, split_ternary_weight
from kdistill.quant.model import calibrate, is_quantized, quantize_model
from kdistill.quant.packing import export_packed
from kdistill.quant.quantizers import (ElasticBinary, LearnedStepQuantizer, activation_quantizer, binarize,
                                       quantize_weight, ternarize)

__all__ = ["QuantLinear", "split_layer", "split_ternary_weight", "quantize_model", "calibrate", "is_quantized",
           "export_packed", "ElasticBinary", "LearnedStepQuantizer", "activation_quantizer", "binarize",
           "quantize_weight", "ternarize"]
