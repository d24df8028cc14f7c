"""Size accounting: bytes and logical parameters of a (possibly quantized) tree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels_pallas.quant_matmul import QuantizedWeight
from sunjax.linear import ScaledWeight


def tree_bytes(params) -> int:
    """Bytes of every array in the tree (quantized payload, scales and zeros included)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def bytes_report(params) -> dict[str, float]:
    """Bytes and logical parameter counts: whole tree and the linear kernels of the layers.

    A quantized ``W[K, N]`` counts ``K * N`` parameters; an AWQ ``in_scale`` counts as bytes
    only. ``bytes_per_param`` of a bfloat16 tree is 2.0.
    """
    total_b = total_p = lin_b = lin_p = 0
    is_kernel = lambda x: isinstance(x, (QuantizedWeight, ScaledWeight))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_kernel)[0]:
        b = tree_bytes(leaf)
        inner = leaf.weight if isinstance(leaf, ScaledWeight) else leaf
        p = math.prod(inner.shape)
        total_b, total_p = total_b + b, total_p + p
        if str(getattr(path[-1], "key", "")) == "kernel" and "lm_head" not in jax.tree_util.keystr(
            path
        ):
            lin_b, lin_p = lin_b + b, lin_p + p
    return {
        "bytes": total_b,
        "params": total_p,
        "bytes_per_param": total_b / max(total_p, 1),
        "linear_bytes": lin_b,
        "linear_params": lin_p,
        "linear_bytes_per_param": lin_b / max(lin_p, 1),
    }
