"""Storage format of a weight-only quantized matrix, and round-to-nearest quantization.

Letters used in shape comments throughout this package:

* ``M`` rows of the activation ``x`` (all leading dims flattened), ``K`` input dim,
  ``N`` output dim, so that ``y[M, N] = x[M, K] @ W[K, N]``.
* ``gs`` the group size along ``K`` (int4 only), ``G = ceil(K / gs)`` groups,
  ``Kp = G * gs`` the group-padded ``K``.

Two schemes:

``bits=8`` -- per-output-channel symmetric.
    ``data``   int8  [K, N]   ``q`` in -127..127
    ``scales`` [1, N]         ``W[k, n] ~= q[k, n] * scales[0, n]``
    ``zeros``  ``None``
    ``group_size`` is recorded as ``K`` (one group spans all of ``K``).

``bits=4`` -- group-wise along ``K``, asymmetric, ``q`` in 0..15.
    ``data``   uint8 [Kp/2, N]   two ``q`` per byte, packed along ``K``:
               ``data[i, n] = q[2i, n] | (q[2i + 1, n] << 4)``
               (low nibble = even ``k``, high nibble = odd ``k``).
    ``scales`` [G, N]
    ``zeros``  [G, N]   integer zero points 0..15, stored in the scale dtype
    ``W[k, n] ~= (q[k, n] - zeros[k // gs, n]) * scales[k // gs, n]``

    ``K`` need not be a multiple of ``gs``: storage is padded to ``Kp`` rows, the pad rows
    hold ``q = zero`` (so they dequantize to exactly 0) and the logical shape stays
    ``(K, N)``.  ``gs`` must be even (a byte never straddles two groups); the Triton
    kernel further needs a power of two >= 32 and the TPU kernel a multiple of 32 (other
    sizes run on the XLA path).

Scales and zero points default to float32, so the stored scale is the scale the
round-to-nearest bound ``|W - dequantize(W)| <= s / 2`` refers to (up to float32
rounding), and ``(q - z) * s`` rounds once, in float32, wherever it is formed.
``scale_dtype=jnp.bfloat16`` halves the metadata (float32 scale + zero is 8 bytes per 64
packed bytes at ``gs = 128``, i.e. 12.5 % on top of the int4 payload; bfloat16 makes it
6.25 %); the bound still holds because the bfloat16 scale is rounded *up* before ``q`` is
computed from it.  Zero points are kept in the scale dtype (not uint8) so that scales and
zeros share one block shape and tiling in the TPU kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (4, 8)
_SCALE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``W[K, N]`` (see the module docstring for the exact layout).

    A pytree: ``data``, ``scales`` and ``zeros`` are leaves (``zeros`` is ``None`` for
    int8); ``bits``, ``group_size`` and ``shape`` (the logical ``(K, N)``) are static.
    Leaves may carry extra leading dims (e.g. layers stacked for ``lax.scan``); the
    matmul itself needs the un-stacked 2-D leaves.
    """

    data: jax.Array  # int4: uint8 [Kp/2, N]; int8: int8 [K, N]
    scales: jax.Array  # int4: [G, N]; int8: [1, N]
    zeros: jax.Array | None  # int4: [G, N] integer-valued; int8: None
    bits: int
    group_size: int
    shape: tuple[int, int]

    @property
    def num_groups(self) -> int:
        """``G``: number of quantization groups along ``K``."""
        return -(-self.shape[0] // self.group_size)

    @property
    def padded_k(self) -> int:
        """``Kp``: ``K`` rounded up to a whole number of groups (``K`` for int8)."""
        return self.num_groups * self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes of storage: payload plus scales plus zero points."""
        leaves = (self.data, self.scales, self.zeros)
        return int(
            sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves if a is not None)
        )


jax.tree_util.register_dataclass(
    QuantizedWeight,
    data_fields=["data", "scales", "zeros"],
    meta_fields=["bits", "group_size", "shape"],
)


def bytes_per_param(qw: QuantizedWeight) -> float:
    """Storage bytes per logical weight, metadata included (bf16 is 2.0)."""
    k, n = qw.shape
    return qw.nbytes / (k * n)


def _check_scale_dtype(scale_dtype) -> jnp.dtype:
    dt = jnp.dtype(scale_dtype)
    if dt not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be float32 or bfloat16, got {dt}")
    return dt


def _round_up_to_dtype(s: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Casts positive float32 ``s`` to ``dtype`` rounding towards +inf (so it never shrinks)."""
    if dtype == jnp.float32:
        return s
    r = s.astype(dtype)
    bumped = jnp.nextafter(r, jnp.array(jnp.inf, dtype))
    return jnp.where(r.astype(jnp.float32) < s, bumped, r)


def check_group_size(group_size: int) -> None:
    """Raises ValueError unless ``group_size`` is a valid int4 group size (even, >= 2)."""
    if not isinstance(group_size, (int, np.integer)) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")


def quantize(
    w: jax.Array,
    *,
    bits: int = 4,
    group_size: int = 128,
    scale_dtype=jnp.float32,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w[K, N]`` (``y = x @ w``).

    ``bits=4``: asymmetric per (group of ``group_size`` rows of ``K``, column ``n``); the
    range always contains 0.  ``bits=8``: symmetric per output column; ``group_size`` is
    ignored.  Every element satisfies ``|w - dequantize(qw)| <= scale / 2`` (its own
    group's / column's scale), up to one float32 rounding of the dequantized product.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [K, N], got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be floating point, got dtype {w.dtype}")
    sdt = _check_scale_dtype(scale_dtype)
    if bits == 4:
        check_group_size(group_size)
    return _quantize(w, bits=bits, group_size=int(group_size), scale_dtype=sdt)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def _quantize(w: jax.Array, *, bits: int, group_size: int, scale_dtype) -> QuantizedWeight:
    sdt = scale_dtype
    k, n = w.shape
    w = w.astype(jnp.float32)

    if bits == 8:
        amax = jnp.max(jnp.abs(w), axis=0, keepdims=True)  # [1, N]
        scale = _round_up_to_dtype(jnp.where(amax > 0, amax / 127.0, 1.0), sdt)
        q = jnp.clip(jnp.round(w / scale.astype(jnp.float32)), -127, 127).astype(jnp.int8)
        return QuantizedWeight(q, scale, None, bits=8, group_size=k, shape=(k, n))

    g = -(-k // group_size)
    kp = g * group_size
    # Pad rows copy the last real row so they do not widen the last group's range;
    # their ``q`` is then replaced by the zero point below.
    wp = jnp.concatenate([w, jnp.broadcast_to(w[-1:], (kp - k, n))], axis=0) if kp > k else w
    wg = wp.reshape(g, group_size, n)  # [G, gs, N]
    lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)  # [G, N]
    hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)  # [G, N]
    scale = _round_up_to_dtype(jnp.where(hi > lo, (hi - lo) / 15.0, 1.0), sdt)  # [G, N]
    s32 = scale.astype(jnp.float32)
    zero = jnp.clip(jnp.round(-lo / s32), 0, 15)  # [G, N]
    q = jnp.clip(jnp.round(wg / s32[:, None, :]) + zero[:, None, :], 0, 15)  # [G, gs, N]
    q = q.reshape(kp, n)
    if kp > k:
        pad_zero = jnp.broadcast_to(zero[-1:], (kp - k, n))
        q = jnp.concatenate([q[:k], pad_zero], axis=0)
    return QuantizedWeight(
        pack_int4(q.astype(jnp.uint8)),
        scale,
        zero.astype(sdt),
        bits=4,
        group_size=group_size,
        shape=(k, n),
    )


def pack_int4(q: jax.Array) -> jax.Array:
    """``q`` uint8 [2R, N] with values 0..15 -> uint8 [R, N], low nibble = even row."""
    if q.shape[0] % 2:
        raise ValueError(f"pack_int4 needs an even number of rows, got {q.shape[0]}")
    pairs = q.astype(jnp.uint8).reshape(q.shape[0] // 2, 2, *q.shape[1:])
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(p: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_int4`: uint8 [R, N] -> uint8 [2R, N] with values 0..15."""
    lo = p & 0xF
    hi = p >> 4
    return jnp.stack([lo, hi], axis=1).reshape(2 * p.shape[0], *p.shape[1:])


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """``W[K, N]`` in ``dtype``: ``(q - zero) * scale`` in float32, then one cast."""
    if qw.bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {qw.bits!r}")
    return _dequantize(qw, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(qw: QuantizedWeight, dtype) -> jax.Array:
    k, n = qw.shape
    if qw.bits == 8:
        w = qw.data.astype(jnp.float32) * qw.scales.astype(jnp.float32).reshape(1, n)
        return w.astype(dtype)
    g, gs = qw.num_groups, qw.group_size
    q = unpack_int4(qw.data).reshape(g, gs, n).astype(jnp.float32)  # [G, gs, N]
    z = qw.zeros.astype(jnp.float32)[:, None, :]  # [G, 1, N]
    s = qw.scales.astype(jnp.float32)[:, None, :]  # [G, 1, N]
    w = ((q - z) * s).reshape(g * gs, n)[:k]  # [K, N]
    return w.astype(dtype)
