"""TPU (Pallas Mosaic) paged decode attention: a thin wrapper over the kernel JAX ships,
``jax.experimental.pallas.ops.tpu.paged_attention`` (double-buffered page DMAs from HBM).

Letters as in ``reference.py``: B sequences, N query heads, K kv heads, G = N / K, H head
dim, A pages in the pool, P tokens per page, M pages per sequence.

What the shipped kernel does and lacks, and what this wrapper adds:

* No softmax scale: the wrapper multiplies ``q`` by ``scale`` first.
* No sliding window (``supports`` says so and ``api.paged_attention`` falls back to XLA).
* K/V pages are rounded to bfloat16 inside the kernel (``MultiPageAsyncCopyDescriptor``
  dequantizes every loaded block to bf16), so float32 pages would lose precision silently:
  ``supports`` accepts only bfloat16 pages.  (The kernel also takes int8 pages with scales,
  ``quantization_utils.QuantizedTensor``; not exposed here.)
* The page table width must be a whole number of compute blocks: the wrapper clips
  ``pages_per_compute_block`` to the table and pads the table with page 0 (loaded, masked).
* Mosaic tiling: the kernel's max / sum outputs use a ``[G, H]`` block over a ``[.., 1]``
  array, which lowers only when H is a multiple of 128; P should be a multiple of 8.
* ``interpret=True`` runs it on the CPU under ``pltpu.force_tpu_interpret_mode()`` (the
  TPU interpreter, which simulates HBM, VMEM, DMAs and semaphores).

Versions: the kernel is present since JAX 0.4.26, ``force_tpu_interpret_mode`` since 0.7;
tested here on 0.10.2 (interpret mode and ``jax.export`` to Mosaic); the GPU image's 0.11.2
ships the same kernel.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import paged_attention as _mosaic
from jaxtyping import Array, Float, Int

from kernels_pallas.paged_attention.config import Config

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16),)
_LANES = 128
_SUBLANES = 8


def supports(
    *, dtype, head_dim: int, page_size: int, sliding_window: int | None = None
) -> str | None:
    """``None`` if the Mosaic kernel handles this case on a TPU, else why not."""
    if sliding_window is not None:
        return "the TPU paged-attention kernel has no sliding window"
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return (
            "the TPU paged-attention kernel rounds K/V to bfloat16 inside, so it takes only "
            f"bfloat16 pages, got {jnp.dtype(dtype)}"
        )
    if head_dim % _LANES:
        return f"the TPU paged-attention kernel needs head_dim a multiple of 128, got {head_dim}"
    if page_size % _SUBLANES:
        return f"the TPU paged-attention kernel needs page_size a multiple of 8, got {page_size}"
    return None


def blocking(pages_per_seq: int, config: Config) -> tuple[int, int]:
    """``(pages_per_compute_block, padded M)`` for a page table of width M."""
    ppcb = min(config.pages_per_compute_block, pages_per_seq)
    return ppcb, -(-pages_per_seq // ppcb) * ppcb


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def paged_attention_tpu(
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
    """Decode attention over pages with the shipped Mosaic kernel; result in ``q.dtype``.

    ``megacore_mode="kv_head"`` needs an even K, ``"batch"`` an even B (ValueError else).
    """
    b, n, _ = q.shape
    kh = k_pages.shape[0]
    if config.megacore_mode == "kv_head" and kh % 2:
        raise ValueError(f"megacore_mode='kv_head' needs an even number of kv heads, got {kh}")
    if config.megacore_mode == "batch" and b % 2:
        raise ValueError(f"megacore_mode='batch' needs an even batch, got {b}")
    ppcb, m_padded = blocking(page_indices.shape[1], config)
    page_indices = jnp.pad(
        page_indices.astype(jnp.int32), ((0, 0), (0, m_padded - page_indices.shape[1]))
    )
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with mode:
        return _mosaic.paged_attention(
            q,
            k_pages,
            v_pages,
            lengths.astype(jnp.int32),
            page_indices,
            pages_per_compute_block=ppcb,
            megacore_mode=config.megacore_mode,
            inline_seq_dim=config.inline_seq_dim,
        )
