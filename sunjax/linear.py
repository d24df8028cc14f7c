"""The one matmul every linear layer uses: plain weights or quantized ones, same call.

A ``kernel`` leaf of the params tree is one of

* a plain array ``[in, out]``;
* a ``QuantizedWeight`` (``kernels_pallas.quant_matmul``): int4 / int8 weight-only;
* a ``ScaledWeight``: either of the above plus a per-input-channel factor applied to ``x``
  first. AWQ uses it where the inverse scale cannot be folded into an earlier op without
  changing what the layer hands on (``o_proj``: folding into ``v_proj`` would change the V
  cache, which the decode module shares with every prefill module).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.quant_matmul import QuantizedWeight, quant_matmul


@dataclasses.dataclass(frozen=True)
class ScaledWeight:
    """``x @ W`` computed as ``(x * in_scale) @ weight`` (``weight = diag(1/in_scale) W``)."""

    weight: jax.Array | QuantizedWeight  # [in, out]
    in_scale: jax.Array  # [in], float32


jax.tree_util.register_dataclass(ScaledWeight, data_fields=["weight", "in_scale"], meta_fields=[])

Kernel = jax.Array | QuantizedWeight | ScaledWeight


def matmul(x: jax.Array, kernel: Kernel) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` with float32 accumulation, result in ``x.dtype``.

    A ``QuantizedWeight`` runs ``quant_matmul`` (Pallas on GPU / TPU, XLA on the CPU).
    """
    if isinstance(kernel, ScaledWeight):
        x = (x.astype(jnp.float32) * kernel.in_scale.astype(jnp.float32)).astype(x.dtype)
        kernel = kernel.weight
    if isinstance(kernel, QuantizedWeight):
        return quant_matmul(x, kernel).astype(x.dtype)
    return jnp.einsum(
        "...i,io->...o", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)
