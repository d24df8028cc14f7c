"""Pallas Mosaic (TPU) weight-only quantized matmul: ``y[M, N] = x[M, K] @ W[K, N]``.

Letters: M rows (Mp padded to bm), K input dim, N output dim, gs group size, G groups,
Kp = G * gs; bm / bn / bk the block of M / N / K per grid step, gpb = bk / gs groups
per block.

Grid ``(Mp / bm, cdiv(N, bn), Kp / bk)`` with K innermost ("arbitrary") and a float32
``[bm, bn]`` VMEM accumulator; the output block is written on the last K step.  Block
shapes obey the (8, 128) tiling rule: ``bn`` is a multiple of 128 (or all of N, with a
clipped edge block when N is not a multiple of 128 and too large for one block), ``bk``
is a multiple of 256 whose int4 scale block ``[gpb, bn]`` has ``gpb`` a multiple of 8
(or ``bk`` is all of Kp), and the packed uint8 block ``[bk/2, bn]`` has a multiple of 32
rows.  Only ``x`` is padded (cheap); weights are never copied.

int4: the wrapper splits ``x`` into its even / odd columns (matching the low / high
nibbles), the kernel dequantizes the block exactly like ``format.dequantize`` (``(q - z)
* s`` in float32, one cast to the activation dtype) and runs two MXU dots.  int8: ``q``
is cast to the activation dtype (exact) and the per-column scale is applied to the
float32 accumulator on the last step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.quant_matmul.config import Config
from kernels_pallas.quant_matmul.format import QuantizedWeight

_LANES = 128
_FULL_N_LIMIT = 2048  # unaligned N up to this size is taken as one block


SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def supports(w: QuantizedWeight, dtype) -> str | None:
    """``None`` if this kernel handles ``w`` with activations of ``dtype``, else why not."""
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        return f"the TPU kernel supports activations of {names}, got {jnp.dtype(dtype)}"
    if w.bits == 4 and w.group_size % 32:
        return f"the TPU int4 kernel needs group_size to be a multiple of 32, got {w.group_size}"
    return None


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _divisor_block(extent: int, target: int, align: int) -> int | None:
    """Largest multiple of ``align`` that divides ``extent`` and is <= ``target``."""
    best = None
    for b in range(align, min(extent, max(target, align)) + 1, align):
        if extent % b == 0:
            best = b
    return best


def _block_n(n: int, target: int) -> int:
    if n % _LANES == 0:
        return _divisor_block(n, target, _LANES) or _LANES
    if n <= _FULL_N_LIMIT:
        return n
    return max(target // _LANES, 1) * _LANES


def _dot(a, b):
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _int4_kernel(xe_ref, xo_ref, w_ref, s_ref, z_ref, *refs, gs, gpb, nk):
    # xe_ref / xo_ref [bm, bk/2] even / odd columns of x; w_ref uint8 [bk/2, bn];
    # s_ref / z_ref [gpb, bn]; refs = (optional poisoned alias,) o_ref [bm, bn], acc [bm, bn]
    o_ref, acc_ref = refs[-2], refs[-1]
    kstep = pl.program_id(2)
    half = gs // 2
    bn = w_ref.shape[1]

    @pl.when(kstep == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def per_row(v):  # [gpb, bn] -> [bk/2, bn]: each group's row repeated gs/2 times
        v = v.astype(jnp.float32)
        return jnp.broadcast_to(v[:, None, :], (gpb, half, bn)).reshape(gpb * half, bn)

    s = per_row(s_ref[...])
    z = per_row(z_ref[...])
    p = w_ref[...].astype(jnp.int32)  # [bk/2, bn]
    dt = xe_ref.dtype
    w_even = (((p & 0xF).astype(jnp.float32) - z) * s).astype(dt)  # rows k = 2i
    w_odd = (((p >> 4).astype(jnp.float32) - z) * s).astype(dt)  # rows k = 2i + 1
    acc_ref[...] += _dot(xe_ref[...], w_even) + _dot(xo_ref[...], w_odd)

    @pl.when(kstep == nk - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _int8_kernel(x_ref, w_ref, s_ref, *refs, nk):
    # x_ref [bm, bk]; w_ref int8 [bk, bn]; s_ref [1, bn];
    # refs = (optional poisoned alias,) o_ref [bm, bn], acc [bm, bn]
    o_ref, acc_ref = refs[-2], refs[-1]
    kstep = pl.program_id(2)

    @pl.when(kstep == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    q = w_ref[...].astype(jnp.float32).astype(x_ref.dtype)  # exact: |q| <= 127
    acc_ref[...] += _dot(x_ref[...], q)

    @pl.when(kstep == nk - 1)
    def _():
        o_ref[...] = (acc_ref[...] * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "poison"))
def quant_matmul_tpu(
    x: jax.Array,
    w: QuantizedWeight,
    *,
    config: Config,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """``x[M, K] @ W[K, N]`` -> ``[M, N]`` in ``x.dtype`` with the Mosaic kernel.

    ``poison=True`` (a testing hook) aliases a NaN-filled buffer as the kernel's output,
    so any element the kernel fails to write comes back as NaN (in interpret mode; on
    hardware an unwritten VMEM block would hold stale data instead).
    """
    m, k = x.shape
    n = w.shape[1]
    reason = supports(w, x.dtype)
    if reason is not None:
        raise ValueError(reason)
    sublane = 16 if x.dtype.itemsize < 4 else 8
    bm = min(_round_up(config.block_m, sublane), _round_up(m, sublane))
    mp = _round_up(m, bm)
    bn = _block_n(n, config.block_n)

    if w.bits == 4:
        gs, g = w.group_size, w.num_groups
        kp = g * gs
        bk = _divisor_block(kp, config.block_k, math.lcm(8 * gs, 256)) or kp
        gpb = bk // gs
        nk = kp // bk
        xp = jnp.pad(x, ((0, mp - m), (0, kp - k)))  # [Mp, Kp]
        xr = xp.reshape(mp, kp // 2, 2)
        x_even, x_odd = xr[:, :, 0], xr[:, :, 1]  # [Mp, Kp/2] each
        operands = (x_even, x_odd, w.data, w.scales, w.zeros)
        in_specs = [
            pl.BlockSpec((bm, bk // 2), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bm, bk // 2), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk // 2, bn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((gpb, bn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((gpb, bn), lambda i, j, kk: (kk, j)),
        ]
        kernel = functools.partial(_int4_kernel, gs=gs, gpb=gpb, nk=nk)
    else:
        bk = _divisor_block(k, config.block_k, _LANES) or k
        nk = k // bk
        xp = jnp.pad(x, ((0, mp - m), (0, 0)))  # [Mp, K]
        operands = (xp, w.data, w.scales)
        in_specs = [
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
        ]
        kernel = functools.partial(_int8_kernel, nk=nk)

    out_shape = jax.ShapeDtypeStruct((mp, n), x.dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))
    aliases = {}
    if poison:
        operands = (*operands, jnp.full(out_shape.shape, jnp.nan, x.dtype))
        in_specs = [*in_specs, pl.BlockSpec(memory_space=pl.ANY)]
        aliases = {len(operands) - 1: 0}
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(mp // bm, pl.cdiv(n, bn), nk),
        in_specs=in_specs,
        out_specs=out_spec,
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n,
            transcendentals=0,
            bytes_accessed=w.nbytes + x.size * x.dtype.itemsize + m * n * x.dtype.itemsize,
        ),
        interpret=interpret,
        name=f"quant_matmul_int{w.bits}_mosaic",
    )(*operands)
    return y[:m]
