"""GPU (Pallas Triton) paged decode attention: a thin wrapper over the kernel JAX ships,
``jax.experimental.pallas.ops.gpu.paged_attention`` (flash-decoding over pages).

Letters as in ``reference.py``: B sequences, N query heads, K kv heads, H head dim, A pages
in the pool, P tokens per page, M pages per sequence.

What the shipped kernel does and lacks, and what this wrapper adds:

* No softmax scale: the wrapper multiplies ``q`` by ``scale`` first (exact in float32; one
  extra rounding of ``q`` in bfloat16 unless ``scale`` is a power of two, e.g. H = 64).
* No sliding window (``supports`` says so and ``api.paged_attention`` falls back to XLA).
* The page table must split into ``k_splits`` partitions of whole compute blocks: the
  wrapper clips both to the table and pads the table with page 0 (loaded, then masked).
* Triton constraints: ``pages_per_compute_block * P`` and ``H`` are powers of two of at
  least 16 (``tl.arange`` and ``tl.dot`` sizes); query heads are padded to ``block_h``.
* On a GPU a float32 ``q @ k`` may run in TF32 (the kernel calls ``pl.dot`` without a
  precision); in interpret mode it is exact.

Versions: present since JAX 0.5 (tested here on 0.10.2, lowered for the GPU image's 0.11.2).
From JAX 0.11.1 the Pallas Triton ops, this one included, are deprecated and will be removed
together with Pallas Triton; the import below silences that DeprecationWarning, and this file
is the one place to swap in a successor (e.g. a Mosaic GPU kernel) when it ships.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.paged_attention.config import Config

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as _triton

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MIN_DOT = 16  # smallest Triton dot dimension


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def supports(
    *, dtype, head_dim: int, page_size: int, sliding_window: int | None = None
) -> str | None:
    """``None`` if the Triton kernel handles this case, else why not."""
    if sliding_window is not None:
        return "the GPU paged-attention kernel has no sliding window"
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        return f"the GPU paged-attention kernel supports {names}, got {jnp.dtype(dtype)}"
    if not _is_pow2(head_dim) or head_dim < _MIN_DOT:
        return f"the GPU paged-attention kernel needs a power-of-two head_dim >= 16, got {head_dim}"
    if not _is_pow2(page_size):
        return f"the GPU paged-attention kernel needs a power-of-two page_size, got {page_size}"
    return None


def blocking(pages_per_seq: int, page_size: int, config: Config) -> tuple[int, int, int]:
    """``(pages_per_compute_block, k_splits, padded M)`` for a page table of width M."""
    ppcb = min(config.pages_per_compute_block, _next_pow2(pages_per_seq))
    ppcb = max(_next_pow2(ppcb), _next_pow2(-(-_MIN_DOT // page_size)))
    k_splits = max(1, min(config.k_splits, -(-pages_per_seq // ppcb)))
    chunk = k_splits * ppcb
    return ppcb, k_splits, -(-pages_per_seq // chunk) * chunk


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def paged_attention_gpu(
    q: Float[Array, "B N H"],
    k_pages: Float[Array, "K A P H"],
    v_pages: Float[Array, "K A P H"],
    lengths: Int[Array, " B"],
    page_indices: Int[Array, "B M"],
    *,
    scale: float,
    config: Config,
    interpret: bool = False,
) -> Float[Array, "B N H"]:
    """Decode attention over pages with the shipped Triton kernel; result in ``q.dtype``."""
    _, m = page_indices.shape
    page_size = k_pages.shape[2]
    ppcb, k_splits, m_padded = blocking(m, page_size, config)
    page_indices = jnp.pad(page_indices.astype(jnp.int32), ((0, 0), (0, m_padded - m)))
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    return _triton.paged_attention(
        q,
        k_pages,
        v_pages,
        page_indices,
        lengths.astype(jnp.int32),
        block_h=config.block_h,
        pages_per_compute_block=ppcb,
        k_splits=k_splits,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        interpret=interpret,
    )
