"""GPTQ int8/int4 quantization: the algorithm, the AutoGPTQ checkpoint format, and quantized layers.

    telechat quantize --model PATH --bits 4 --group-size 128 --calib FILE_OR_DIR --output DIR
    llm = telechat.load(DIR)          # detects the quantized folder, builds QuantLinear layers
"""
from torch import Tensor, nn

from .format import (MODULE_ORDER, QUANTIZED_MODULES, QuantConfig, QuantError, QuantizedWeight, dequantize, pack,
                     read_quant_config, unpack, write_quant_config)
from .linear import KERNELS, QuantLinear, quantize_modules, quantized_layers, use_kernel
from .pipeline import quantize


def ignorable(model: nn.Module, name: str, tensor: Tensor) -> bool:
    """A checkpoint tensor the model has no place for but may skip: the all-zero `bias` that older
    AutoGPTQ versions store for every quantized layer, biased or not."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, QuantLinear) and attr == "bias" and module.bias is None and not tensor.any()


__all__ = ["MODULE_ORDER", "QUANTIZED_MODULES", "QuantConfig", "QuantError", "QuantizedWeight", "QuantLinear",
           "KERNELS", "dequantize", "pack", "unpack", "read_quant_config", "write_quant_config", "quantize_modules",
           "quantized_layers", "use_kernel", "ignorable", "quantize"]
