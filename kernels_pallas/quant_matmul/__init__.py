"""Weight-only quantized matmul (int8 per-channel, int4 group-wise) for GPU and TPU.

``y = quant_matmul(x, quantize(w))`` computes ``x @ w`` with ``w`` stored as int4 / int8;
see ``format.py`` for the storage layout, ``gpu.py`` / ``tpu.py`` for the Pallas kernels,
``reference.py`` for the plain-XLA reference and ``bench.py`` for the benchmark.
"""

from kernels_pallas.quant_matmul.api import quant_matmul
from kernels_pallas.quant_matmul.config import Config, get_config
from kernels_pallas.quant_matmul.format import (
    QuantizedWeight,
    bytes_per_param,
    dequantize,
    quantize,
)

__all__ = [
    "Config",
    "QuantizedWeight",
    "bytes_per_param",
    "dequantize",
    "get_config",
    "quant_matmul",
    "quantize",
]
