"""Plain-XLA reference: dequantize, then one dot with float32 accumulation.

Also the error model the kernels are tested (and benchmarked) against: see
:func:`error_bound`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.quant_matmul.format import QuantizedWeight, dequantize


def _precision(dtype) -> jax.lax.Precision:
    # float32 activations must not be silently demoted to TF32 (GPU) or one bf16 pass (TPU).
    return (
        jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
    )


@jax.jit
def quant_matmul_reference(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """``x[..., K] @ dequantize(w, x.dtype)[K, N]``, float32 accumulation, result in x.dtype."""
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} does not match the weight's K={k}")
    wd = dequantize(w, x.dtype)  # [K, N]
    y = jax.lax.dot_general(
        x,
        wd,
        (((x.ndim - 1,), (0,)), ((), ())),
        precision=_precision(x.dtype),
        preferred_element_type=jnp.float32,
    )
    return y.astype(x.dtype)


def unit_roundoff(dtype) -> float:
    """``u = 2**-p`` for a ``p``-bit significand (bf16 2**-8, f16 2**-11, f32 2**-24)."""
    return float(jnp.finfo(dtype).eps) / 2


@jax.jit
def error_bound(x: jax.Array, w: QuantizedWeight, ref: jax.Array) -> jax.Array:
    """Elementwise bound on ``|kernel(x, w) - quant_matmul_reference(x, w)|`` as float32.

    With ``S = |x| @ |W|`` (``W`` the float32 dequantized weight), ``u_in`` the unit
    roundoff of ``x.dtype`` (which is also the output dtype) and ``u32 = 2**-24``:

    * the reference rounds every ``W`` to ``x.dtype`` (``<= u_in * S``) and accumulates
      ``K`` products in float32 (``<= (K + 1) * u32 * S``);
    * a kernel either does the same, or multiplies integer-valued ``q - z`` (exact in
      ``x.dtype``) and applies the scale to the float32 partial sums
      (``<= (K + 2) * u32 * S``), in any summation order;
    * both results are then rounded to ``x.dtype`` once (``<= 2 * u_in * |ref|``, to
      first order).

    Hence ``bound = (u_in + (2K + 3) * u32) * S + 2 * u_in * |ref|`` (times 1.01, plus
    the smallest normal number).  For float32 that is about ``(2K) * 6e-8`` relative to
    ``S``; for bfloat16 it is dominated by one bf16 rounding of each weight.
    """
    k, _ = w.shape
    u_in = unit_roundoff(x.dtype)
    u32 = unit_roundoff(jnp.float32)
    xa = jnp.abs(x.astype(jnp.float32))
    wa = jnp.abs(dequantize(w, jnp.float32))
    s = jax.lax.dot_general(
        xa,
        wa,
        (((x.ndim - 1,), (0,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    r = jnp.abs(ref.astype(jnp.float32))
    tiny = float(jnp.finfo(x.dtype).tiny)
    return 1.01 * ((u_in + (2 * k + 3) * u32) * s + 2 * u_in * r) + tiny
