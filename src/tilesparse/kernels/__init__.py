"""tilesparse.kernels: packed hybrid (dense / 2:4 / all-zero tiles) format, GPU kernels and ``HybridLinear``.

* :mod:`.format` -- :class:`PackedHybrid`, :func:`pack`, :func:`pack_from_kinds`, :func:`unpack` (pure tensor math)
* :mod:`.reference` -- the torch reference product (CPU path, test oracle)
* :mod:`.triton_stream` -- the Triton stream kernel (1-64 tokens); :mod:`.triton_hybrid` -- the Triton helpers it
  shares and ``unpack_kernel``; :mod:`.cuda_mma` -- the CUDA sparse-tensor-core kernels (1-64 tokens)
* :mod:`.triton_q4` -- the Triton decode kernel of the 4-bit format (:mod:`.format_q4`, 1-16 tokens), run by
  :class:`~.linear_q4.HybridLinearQ4` through :func:`.library.q4_linear`; :mod:`.cuda_mma_q4` -- the 4-bit
  sparse-tensor-core kernel (the default at 1-16 tokens where it applies); :mod:`.cuda_gemm` -- the hybrid GEMM
  on sparse tensor cores (16-64 tokens)
* :mod:`.ops` -- :func:`hybrid_linear` (dispatch + autotune)
* :mod:`.library` -- the same product as the operator ``torch.ops.tilesparse.hybrid_linear`` (torch.compile)
* :mod:`.linear` -- :class:`HybridLinear`, :func:`convert_model`
* packed checkpoints: :mod:`tilesparse.io.packed`
"""

from .format import PackedHybrid, bytes_bound_speedup, hybrid_bytes, pack, pack_from_kinds, unpack
from .linear import HybridLinear, convert_model, hybrid_layers
from .ops import KernelConfig, hybrid_linear, kernel_supported, workspace_bytes
from .reference import reference_linear

__all__ = [
    "PackedHybrid", "pack", "pack_from_kinds", "unpack", "hybrid_bytes", "bytes_bound_speedup",
    "HybridLinear", "convert_model", "hybrid_layers", "hybrid_linear", "KernelConfig", "kernel_supported",
    "workspace_bytes", "reference_linear",
]
