"""``quantize_tree``: the decode tree with every linear kernel of the layers quantized,
by round-to-nearest (RTN) or after AWQ's scale and clipping searches (``sunjax.quant.awq``)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Int

from kernels_pallas.quant_matmul import QuantizedWeight, quantize
from sunjax.config import ModelConfig
from sunjax.linear import ScaledWeight
from sunjax.quant.awq import awq_scale
from sunjax.quant.layout import LINEARS, METHODS, bits_of, check_clip, copy_tree, unrolled


def quantize_tree(
    cfg: ModelConfig,
    params,
    *,
    bits: int = 4,
    group_size: int = 128,
    method: str = "rtn",
    calib_tokens: Int[Array, "B T"] | None = None,
    scale_dtype=jnp.float32,
    grid: int = 20,
    clip: bool = True,
    int8: tuple[str, ...] = (),
):
    """The decode tree with every linear kernel of the layers quantized.

    ``method="rtn"``: round-to-nearest. ``method="awq"``: activation-aware scales searched on
    ``calib_tokens`` (``[B, T]`` or ``[T]`` token ids), folded as in the module docstring,
    then (``clip=True``) AWQ's weight-clipping search, then round-to-nearest. ``clip`` is
    ignored by ``method="rtn"``. ``int8``: names of ``LINEARS`` (``"down_proj"``, ...) quantized
    to int8 in every layer whatever ``bits`` says. Works on the unrolled and the scanned layer
    layout.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "awq" and calib_tokens is None:
        raise ValueError("method='awq' needs calib_tokens, got None")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    check_clip(clip)
    bits_of_ = bits_of(bits, int8)
    restack, cfg, params = unrolled(cfg, params)
    if method == "awq":
        params, _ = awq_scale(
            cfg,
            params,
            calib_tokens,
            bits=bits,
            group_size=group_size,
            grid=grid,
            clip=clip,
            int8=int8,
        )
    out = dict(params)
    for i in range(cfg.n_layers):
        layer = copy_tree(params[f"layers_{i}"])
        for mod, name in LINEARS:
            node = layer[mod][name]
            k = node["kernel"]
            b = bits_of_(name)
            q = lambda w, b=b: quantize(w, bits=b, group_size=group_size, scale_dtype=scale_dtype)
            if isinstance(k, ScaledWeight):
                node["kernel"] = ScaledWeight(q(k.weight), k.in_scale)
            elif isinstance(k, QuantizedWeight):
                raise ValueError(f"layers_{i}/{mod}/{name} is already quantized")
            else:
                node["kernel"] = q(k)
        out[f"layers_{i}"] = layer
    return restack(out)
