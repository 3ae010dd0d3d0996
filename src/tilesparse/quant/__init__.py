"""Weight-only group-wise quantization (2, 3, 4 or 8 bits), applied after the sparsity mask.

Pure math lives in :mod:`.rtn` (the grid: bfloat16 scales and zero points per group of ``group_size``
input columns, round-to-nearest, exact dequantization) and :mod:`.gptq` (GPTQ with the mask held fixed,
one weight and its Hessian); :mod:`.model` applies either to a whole model (fake-quant: the dequantized
weights written into its linears), GPTQ through the pruning engine's calibration pass; :mod:`.state`
records on a model that it is quantized.
"""

from .config import QuantConfig
from .gptq import quantize_gptq
from .model import ModelQuantization, quantize_model
from .rtn import (
    QuantizedTensor,
    QuantResult,
    check_quant_args,
    dequantize,
    group_params,
    n_groups,
    quantize_codes,
    quantize_rtn,
)
from .state import check_not_quantized, describe, mark_quantized, quantization_of

__all__ = [
    "QuantConfig", "quantize_gptq", "ModelQuantization", "quantize_model",
    "QuantizedTensor", "QuantResult", "check_quant_args", "dequantize", "group_params", "n_groups",
    "quantize_codes", "quantize_rtn",
    "check_not_quantized", "describe", "mark_quantized", "quantization_of",
]
