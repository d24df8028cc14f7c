"""Public entry point: ``quant_matmul(x, w)`` with backend dispatch.

Letters: M rows (all leading dims of x flattened), K input dim, N output dim.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from kernels_pallas.quant_matmul import gpu, tpu
from kernels_pallas.quant_matmul.config import Config, get_config
from kernels_pallas.quant_matmul.format import SUPPORTED_BITS, QuantizedWeight
from kernels_pallas.quant_matmul.reference import quant_matmul_reference

Implementation = Literal["xla", "pallas"] | None
_IMPLEMENTATIONS = (None, "xla", "pallas")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _check_weight(w: QuantizedWeight) -> None:
    if not isinstance(w, QuantizedWeight):
        raise ValueError(f"w must be a QuantizedWeight, got {type(w).__name__}")
    if w.bits not in SUPPORTED_BITS:
        raise ValueError(f"w.bits must be one of {SUPPORTED_BITS}, got {w.bits!r}")
    k, n = w.shape
    if w.bits == 4:
        expected = {
            "data": (w.padded_k // 2, n),
            "scales": (w.num_groups, n),
            "zeros": (w.num_groups, n),
        }
    else:
        expected = {"data": (k, n), "scales": (1, n)}
    for name, shape in expected.items():
        leaf = getattr(w, name)
        if leaf is None or tuple(leaf.shape) != shape:
            got = None if leaf is None else tuple(leaf.shape)
            raise ValueError(
                f"w.{name} has shape {got}, expected {shape} for a {w.bits}-bit weight of "
                f"shape {w.shape} (stacked weights must be indexed to one matrix first)"
            )


def quant_matmul(
    x: jax.Array,
    w: QuantizedWeight,
    *,
    implementation: Implementation = None,
    config: Config | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x[..., K] @ W[K, N]`` -> ``[..., N]`` in ``x.dtype``, float32 accumulation.

    implementation:
        ``None``: the Pallas kernel on GPU (Triton) and TPU (Mosaic) when it supports
        ``w``'s format, otherwise (and on CPU) the XLA reference.
        ``"xla"``: dequantize in XLA, then one dot (``reference.py``).
        ``"pallas"``: the Pallas kernel for the default backend; on CPU the Triton
        kernel runs in interpret mode.  Raises ValueError if it cannot handle ``w``.
    config: block sizes; ``None`` looks up ``config.TABLE`` for this device and M.
    interpret: run the Pallas kernel in interpret mode (implies ``"pallas"`` when
        ``implementation`` is ``None``).
    """
    _check_weight(w)
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}"
        )
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config must be a Config or None, got {type(config).__name__}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dim [..., K], got shape {x.shape}")
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} does not match the weight's K={k}")

    platform = jax.default_backend()
    kernel = tpu if platform == "tpu" else gpu
    unsupported = kernel.supports(w, x.dtype)
    if implementation is None:
        on_accelerator = platform == "tpu" or platform in _GPU_PLATFORMS
        implementation = "pallas" if (interpret or on_accelerator) and not unsupported else "xla"
    if implementation == "xla":
        return quant_matmul_reference(x, w)
    if unsupported:
        raise ValueError(unsupported)

    lead = x.shape[:-1]
    m = math.prod(lead)
    if m == 0:
        return jnp.zeros((*lead, n), x.dtype)
    interpret = interpret or not (platform == "tpu" or platform in _GPU_PLATFORMS)
    if config is None:
        config = get_config(m, platform="tpu" if kernel is tpu else "gpu")
    run = tpu.quant_matmul_tpu if kernel is tpu else gpu.quant_matmul_gpu
    y = run(x.reshape(m, k), w, config=config, interpret=interpret)  # [M, N]
    return y.reshape(*lead, n)
