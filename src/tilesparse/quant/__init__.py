"""Weight-only group-wise quantization (2, 3, 4 or 8 bits), applied after the sparsity mask.

Pure math lives in :mod:`.rtn` (the grid: bfloat16 scales and zero points per group of ``group_size``
input columns, round-to-nearest, exact dequantization) and :mod:`.gptq` (GPTQ with the mask held fixed,
one weight and its Hessian).
"""

from .gptq import quantize_gptq
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

__all__ = [
    "quantize_gptq",
    "QuantizedTensor", "QuantResult", "check_quant_args", "dequantize", "group_params", "n_groups",
    "quantize_codes", "quantize_rtn",
]
