"""Pallas Triton (GPU) weight-only quantized matmul: ``y[M, N] = x[M, K] @ W[K, N]``.

Letters: M rows, K input dim, N output dim, gs group size, G groups, Kp = G * gs;
bm / bn tile of the output per program, S split-K factor.

Design (for small-M, memory-bound decode shapes):

* Grid ``(cdiv(N, bn), cdiv(M, bm), S)``; each program owns one ``[bm, bn]`` output tile
  and one K slice and walks it in a ``fori_loop`` (software-pipelined by Triton with
  ``num_stages``).  All refs are whole arrays (no BlockSpec); tiles are addressed by hand
  and loads/stores are masked only where M, K or N are not multiples of the tile, so the
  aligned (production) shapes carry no mask work.  No padding copy is ever made.
* int4: one inner step handles ``groups_per_iter`` whole groups.  Per group the packed
  bytes ``[gs/2, bn]`` are split into low / high nibbles (even / odd ``k``) and turned into
  the exact integers ``q - z`` directly in the compute dtype with the float trick
  ``bitcast(MAGIC | q) = BASE + q`` (an AND / shift, an OR and one subtract per weight;
  no int->float convert).  ``x`` is loaded contiguously and de-interleaved into its even
  / odd columns in registers.  The per-group scale multiplies a float32 partial sum, not
  every weight.
* Two inner-product engines, chosen by ``block_m``:
  ``block_m >= 16`` -- tensor-core dots of ``x`` (activation dtype) with ``q - z`` (exact
  in that dtype), float32 accumulation; M is covered by masked 16-row tiles.
  ``block_m == 1`` -- CUDA-core GEMV for M = 1 (as TensorRT-LLM / gemlite do for tiny
  batches): float32 FMAs into a ``[gs/2, bn]`` accumulator that is reduced once at the
  end, so there is no dot-operand layout shuffle and no 16x padding of M.
* int8: ``q`` is cast to the activation dtype (exact: |q| <= 127) and accumulated; the
  per-column scale multiplies the float32 accumulator once at the end.
* Split-K writes float32 partials ``[S, M, N]`` that XLA sums; ``S = 1`` writes ``x.dtype``
  directly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # deprecated since JAX 0.11 (Pallas CHANGELOG); a JAX without it keeps the XLA path
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - no such JAX yet
    plgpu = None

from kernels_pallas.quant_matmul.config import Config
from kernels_pallas.quant_matmul.format import QuantizedWeight

_MIN_DOT = 16  # Triton's smallest tensor-core dot extent along M, N and K.
_DEFAULT_SM_COUNT = 132  # H100 / H200 SXM
_MAX_SPLIT = 8
_GEMV_MAX_BLOCK_K = 128  # int8 GEMV: cap on the K step (register budget)
# dtype -> (same-width int type, bit pattern of BASE, BASE) with ulp(BASE) == 1, so that
# ``bitcast(pattern | q) == BASE + q`` for 0 <= q < 16.
_MAGIC = {
    jnp.dtype(jnp.float32): (jnp.int32, 0x4B000000, 2.0**23),
    jnp.dtype(jnp.bfloat16): (jnp.int16, 0x4300, 128.0),
    jnp.dtype(jnp.float16): (jnp.int16, 0x6400, 1024.0),
}
SUPPORTED_DTYPES = tuple(_MAGIC)


def supports(w: QuantizedWeight, dtype) -> str | None:
    """``None`` if this kernel handles ``w`` with activations of ``dtype``, else why not."""
    if plgpu is None:
        return f"this JAX ({jax.__version__}) has no Pallas Triton backend"
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        return f"the Triton kernel supports activations of {names}, got {jnp.dtype(dtype)}"
    if w.bits == 4:
        gs = w.group_size
        if gs < 2 * _MIN_DOT or gs & (gs - 1):
            return f"the Triton int4 kernel needs a power-of-two group_size >= 32, got {gs}"
    return None


def _pow2_at_most(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


def _tile(requested: int, extent: int) -> int:
    """Power-of-two tile <= requested, no larger than needed for ``extent``, >= 16."""
    t = min(_pow2_at_most(requested), pl.next_power_of_2(extent))
    return max(t, _MIN_DOT)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(min(n, cap), 1) + 1) if n % d == 0)


def _sm_count() -> int:
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return _DEFAULT_SM_COUNT
    return int(getattr(dev, "core_count", None) or _DEFAULT_SM_COUNT)


def _choose_split(requested: int | None, programs: int, k_iters: int) -> int:
    if requested is not None:
        return _largest_divisor_at_most(k_iters, requested)
    split = 1
    target = _sm_count()
    while (
        programs * split < target
        and split * 2 <= _MAX_SPLIT
        and k_iters % (split * 2) == 0
        and k_iters // (split * 2) >= 2
    ):
        split *= 2
    return split


def _dot(a, b, precision):
    return jax.lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _load(ref, mask):
    """Loads ``ref``; masked-off elements read as 0 (no mask: everything is in bounds)."""
    if mask is None:
        return ref[...]
    return plgpu.load(ref, mask=mask, other=0)


def _store_out(o_ref, acc, *, split, m0, n0, bm, bn, store_mask):
    if split == 1:
        dst = o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)]
        val = acc.astype(o_ref.dtype)
    else:
        dst = o_ref.at[pl.program_id(2), pl.ds(m0, bm), pl.ds(n0, bn)]
        val = acc
    if store_mask is None:
        dst[...] = val
    else:
        plgpu.store(dst, val, mask=store_mask)


def _masks(m0, n0, *, m, n, bm, bn, mask_m, mask_n):
    """Row / column validity of the output tile (``None`` where no mask is needed).

    Returns ``row_ok [bm, 1]``, ``col_ok [1, bn]``, ``col_ok_1d [bn]`` and the store mask.
    """
    rows = m0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)  # [bm, 1]
    cols = n0 + jax.lax.iota(jnp.int32, bn)  # [bn]
    row_ok = rows < m if mask_m else None
    col_ok_1d = cols < n if mask_n else None
    col_ok = None if col_ok_1d is None else col_ok_1d[None, :]
    if row_ok is not None and col_ok is not None:
        store = row_ok & col_ok
    elif row_ok is not None:
        store = jnp.broadcast_to(row_ok, (bm, bn))
    elif col_ok is not None:
        store = jnp.broadcast_to(col_ok, (bm, bn))
    else:
        store = None
    return row_ok, col_ok, col_ok_1d, store


def _x_mask(row_ok, k0, *, k, bm, bk, mask_k):
    """Mask of the ``[bm, bk]`` x tile starting at column ``k0`` (None: all in bounds)."""
    col_ok = None
    if mask_k:
        col_ok = (k0 + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < k  # [1, bk]
    if row_ok is not None and col_ok is not None:
        return row_ok & col_ok
    if row_ok is not None:
        return jnp.broadcast_to(row_ok, (bm, bk))
    if col_ok is not None:
        return jnp.broadcast_to(col_ok, (bm, bk))
    return None


def _exact_q_minus_z(p, z, dtype):
    """Low / high nibbles of ``p`` minus the zero point, as exact integers in ``dtype``.

    ``bitcast(MAGIC | q)`` is the float ``BASE + q`` (q < 16 fits in the mantissa), and
    ``(BASE + q) - (BASE + z)`` is exact (Sterbenz), so this costs an AND / shift, an OR
    and one subtract per weight -- no int->float conversion and no rounding.
    p uint8 [gs/2, bn]; z [bn] -> two [gs/2, bn] arrays (even k, odd k).
    """
    itype, magic, base = _MAGIC[jnp.dtype(dtype)]
    zb = (z.astype(jnp.float32) + base).astype(dtype)[None, :]  # [1, bn] = BASE + z
    lo = jax.lax.bitcast_convert_type((p & 0xF).astype(itype) | magic, dtype) - zb
    hi = jax.lax.bitcast_convert_type((p >> 4).astype(itype) | magic, dtype) - zb
    return lo, hi


def _int4_kernel(
    x_ref,  # [M, K]
    w_ref,  # uint8 [Kp/2, N]
    s_ref,  # [G, N]
    z_ref,  # [G, N]
    *refs,  # (optional poisoned output alias,) output [M, N] or f32 [S, M, N]
    m,
    k,
    n,
    gs,
    bm,
    bn,
    groups_per_iter,
    iters_per_split,
    split,
    mask_m,
    mask_k,
    mask_n,
    precision,
):
    o_ref = refs[-1]
    half = gs // 2
    m0 = pl.program_id(1) * bm
    n0 = pl.program_id(0) * bn
    k_first = pl.program_id(2) * iters_per_split  # first inner step of this K slice
    row_ok, col_ok, v_mask, store_mask = _masks(
        m0, n0, m=m, n=n, bm=bm, bn=bn, mask_m=mask_m, mask_n=mask_n
    )
    w_mask = None if col_ok is None else jnp.broadcast_to(col_ok, (half, bn))
    gemv = bm == 1

    def load_group(g):
        k0 = g * gs
        x_mask = _x_mask(row_ok, k0, k=k, bm=bm, bk=gs, mask_k=mask_k)
        x = _load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, gs)], x_mask)  # [bm, gs]
        x_even, x_odd = jax.lax.unstack(x.reshape(bm, half, 2), axis=2)  # [bm, gs/2] each
        p = _load(w_ref.at[pl.ds(g * half, half), pl.ds(n0, bn)], w_mask)  # uint8 [gs/2, bn]
        s = _load(s_ref.at[g, pl.ds(n0, bn)], v_mask).astype(jnp.float32)  # [bn]
        z = _load(z_ref.at[g, pl.ds(n0, bn)], v_mask)  # [bn]
        return x_even, x_odd, p, s, z

    if gemv:
        # CUDA-core GEMV: float32 FMAs into a [gs/2, bn] accumulator, one reduction at the end.
        def group_step(g, acc):  # acc [gs/2, bn]
            x_even, x_odd, p, s, z = load_group(g)
            lo, hi = _exact_q_minus_z(p, z, jnp.float32)
            xe = x_even.reshape(half, 1).astype(jnp.float32)  # [gs/2, 1]
            xo = x_odd.reshape(half, 1).astype(jnp.float32)
            return acc + (lo * xe + hi * xo) * s[None, :]

        acc0 = jnp.zeros((half, bn), jnp.float32)
    else:
        # Tensor cores: integer-valued q - z in the activation dtype, scale on the partial sum.
        def group_step(g, acc):  # acc [bm, bn]
            x_even, x_odd, p, s, z = load_group(g)
            lo, hi = _exact_q_minus_z(p, z, x_ref.dtype)
            part = _dot(x_even, lo, precision) + _dot(x_odd, hi, precision)  # [bm, bn]
            return acc + part * s[None, :]

        acc0 = jnp.zeros((bm, bn), jnp.float32)

    def body(it, acc):
        g0 = (k_first + it) * groups_per_iter
        for j in range(groups_per_iter):
            acc = group_step(g0 + j, acc)
        return acc

    acc = jax.lax.fori_loop(0, iters_per_split, body, acc0)
    if gemv:
        acc = jnp.sum(acc, axis=0, keepdims=True)  # [1, bn]
    _store_out(o_ref, acc, split=split, m0=m0, n0=n0, bm=bm, bn=bn, store_mask=store_mask)


def _int8_kernel(
    x_ref,  # [M, K]
    w_ref,  # int8 [K, N]
    s_ref,  # [1, N]
    *refs,  # (optional poisoned output alias,) output [M, N] or f32 [S, M, N]
    m,
    k,
    n,
    bm,
    bn,
    bk,
    iters_per_split,
    split,
    mask_m,
    mask_k,
    mask_n,
    precision,
):
    o_ref = refs[-1]
    m0 = pl.program_id(1) * bm
    n0 = pl.program_id(0) * bn
    k_first = pl.program_id(2) * iters_per_split  # first inner step of this K slice
    row_ok, col_ok, v_mask, store_mask = _masks(
        m0, n0, m=m, n=n, bm=bm, bn=bn, mask_m=mask_m, mask_n=mask_n
    )
    gemv = bm == 1

    def body(it, acc):  # acc [bm, bn]
        k0 = (k_first + it) * bk
        x_mask = _x_mask(row_ok, k0, k=k, bm=bm, bk=bk, mask_k=mask_k)
        x = _load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], x_mask)  # [bm, bk]
        w_mask = None
        if mask_k:
            w_mask = (k0 + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) < k  # [bk, 1]
            w_mask = w_mask & col_ok if col_ok is not None else jnp.broadcast_to(w_mask, (bk, bn))
        elif col_ok is not None:
            w_mask = jnp.broadcast_to(col_ok, (bk, bn))
        q = _load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], w_mask)  # int8 [bk, bn]
        if gemv:  # CUDA-core GEMV: broadcast-multiply and reduce over this K step
            xc = x.reshape(bk, 1).astype(jnp.float32)  # [bk, 1]
            return acc + jnp.sum(xc * q.astype(jnp.float32), axis=0, keepdims=True)
        return acc + _dot(x, q.astype(x_ref.dtype), precision)  # exact cast: |q| <= 127

    acc = jax.lax.fori_loop(0, iters_per_split, body, jnp.zeros((bm, bn), jnp.float32))
    s = _load(s_ref.at[jnp.int32(0), pl.ds(n0, bn)], v_mask)  # [bn]
    acc = acc * s.astype(jnp.float32)[None, :]
    _store_out(o_ref, acc, split=split, m0=m0, n0=n0, bm=bm, bn=bn, store_mask=store_mask)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "poison"))
def quant_matmul_gpu(
    x: jax.Array,
    w: QuantizedWeight,
    *,
    config: Config,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """``x[M, K] @ W[K, N]`` -> ``[M, N]`` in ``x.dtype`` with the Triton kernel.

    ``poison=True`` (a testing hook) aliases a NaN-filled buffer as the kernel's output,
    so any element the kernel fails to write comes back as NaN.
    """
    m, k = x.shape
    n = w.shape[1]
    reason = supports(w, x.dtype)
    if reason is not None:
        raise ValueError(reason)
    # block_m == 1 selects the CUDA-core GEMV path; otherwise tensor-core dots (M >= 16).
    bm = 1 if config.block_m == 1 else _tile(config.block_m, m)
    bn = _tile(config.block_n, n)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    common = dict(
        m=m, k=k, n=n, bm=bm, bn=bn, mask_m=m % bm != 0, mask_n=n % bn != 0, precision=precision
    )
    programs = pl.cdiv(n, bn) * pl.cdiv(m, bm)
    if w.bits == 4:
        gs = w.group_size
        g = w.num_groups
        groups_per_iter = _largest_divisor_at_most(g, max(config.block_k // gs, 1))
        k_iters = g // groups_per_iter
        split = _choose_split(config.split_k, programs, k_iters)
        kernel = functools.partial(
            _int4_kernel,
            gs=gs,
            groups_per_iter=groups_per_iter,
            iters_per_split=k_iters // split,
            split=split,
            mask_k=k % gs != 0,
            **common,
        )
        operands = (x, w.data, w.scales, w.zeros)
    else:
        bk = max(min(_pow2_at_most(config.block_k), pl.next_power_of_2(k)), _MIN_DOT)
        if bm == 1:  # the GEMV step holds a [bk, bn] float32 product in registers
            bk = min(bk, _GEMV_MAX_BLOCK_K)
        k_iters = pl.cdiv(k, bk)
        split = _choose_split(config.split_k, programs, k_iters)
        kernel = functools.partial(
            _int8_kernel,
            bk=bk,
            iters_per_split=k_iters // split,
            split=split,
            mask_k=k % bk != 0,
            **common,
        )
        operands = (x, w.data, w.scales)

    if split == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((split, m, n), jnp.float32)
    aliases = {}
    if poison:
        operands = (*operands, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        aliases = {len(operands) - 1: 0}
    out_bytes = math.prod(out_shape.shape) * jnp.dtype(out_shape.dtype).itemsize
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, bn), pl.cdiv(m, bm), split),
        in_specs=[pl.no_block_spec] * len(operands),
        out_specs=pl.no_block_spec,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n,
            transcendentals=0,
            bytes_accessed=w.nbytes + x.size * x.dtype.itemsize + out_bytes,
        ),
        interpret=interpret,
        name=f"quant_matmul_int{w.bits}_triton",
    )(*operands)
    if split > 1:
        y = jnp.sum(y, axis=0).astype(x.dtype)
    return y
