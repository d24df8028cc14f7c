"""The one matmul every linear layer uses: plain weights or quantized ones, same call."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, kernel) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` with float32 accumulation, result in ``x.dtype``."""
    return jnp.einsum(
        "...i,io->...o", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)
