"""Plain-XLA reference: gather each sequence's pages, then masked softmax attention.

Letters: B sequences (one decode query each), N query heads, K kv heads, G = N / K query
heads per kv head, H head dim, A pages in the pool, P tokens per page, M pages per
sequence (page-table width), S = M * P key positions.

Layout (the one both shipped Pallas kernels take): ``k_pages`` / ``v_pages`` are
``[K, A, P, H]``; token ``t`` of sequence ``b`` lives at page ``page_indices[b, t // P]``,
row ``t % P``.  Sequence ``b`` attends to its tokens ``[lo, lengths[b])`` with
``lo = max(0, lengths[b] - sliding_window)`` (``lo = 0`` without a window): the query is
the token at position ``lengths[b] - 1``, whose K/V is already in the pages, and the window
keeps the positions ``j > pos - sliding_window``, as ``sunjax.model`` does.  A sequence of
length 0 gets a zero output.  Page-table entries past a sequence's length are never used
but must be valid page numbers (the kernels load whole blocks of pages).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _precision(dtype) -> jax.lax.Precision:
    # float32 must not be silently demoted to TF32 (GPU) or one bf16 pass (TPU).
    return (
        jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
    )


def gather_pages(
    pages: Float[Array, "K A P H"], page_indices: Int[Array, "B M"]
) -> Float[Array, "K B S H"]:
    """Each sequence's pages laid end to end: ``[K, B, M * P, H]``."""
    k, _, p, h = pages.shape
    b, m = page_indices.shape
    return pages[:, page_indices].reshape(k, b, m * p, h)  # [K, B, M, P, H] -> [K, B, S, H]


def key_mask(
    lengths: Int[Array, " B"], num_keys: int, sliding_window: int | None = None
) -> jax.Array:
    """``[B, S]`` bool: which key positions each sequence's decode query attends to."""
    pos = jnp.arange(num_keys)[None, :]  # [1, S]
    valid = pos < lengths[:, None]
    if sliding_window is not None:
        valid &= pos >= lengths[:, None] - sliding_window
    return valid


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window"))
def paged_attention_reference(
    q: Float[Array, "B N H"],
    k_pages: Float[Array, "K A P H"],
    v_pages: Float[Array, "K A P H"],
    lengths: Int[Array, " B"],
    page_indices: Int[Array, "B M"],
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> Float[Array, "B N H"]:
    """Decode attention over pages in plain XLA; softmax in float32, result in ``q.dtype``.

    ``scale`` multiplies the logits (default ``H ** -0.5``).  Probabilities are cast to the
    pages' dtype for the value product (as ``sunjax.model`` does), which accumulates in
    float32 and is normalized afterwards.
    """
    b, n, h = q.shape
    kh = k_pages.shape[0]
    scale = h**-0.5 if scale is None else scale
    k = gather_pages(k_pages, page_indices)  # [K, B, S, H]
    v = gather_pages(v_pages, page_indices)  # [K, B, S, H]
    qg = q.reshape(b, kh, n // kh, h)  # [B, K, G, H]
    precision = _precision(q.dtype)
    logits = jnp.einsum(
        "bkgh,kbsh->bkgs", qg, k, precision=precision, preferred_element_type=jnp.float32
    )
    logits = logits * scale  # [B, K, G, S]
    valid = key_mask(lengths, k.shape[2], sliding_window)[:, None, None, :]  # [B, 1, 1, S]
    logits = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a length-0 sequence: every key masked
    p = jnp.exp(logits - m)  # [B, K, G, S], exactly 0 where masked
    denom = jnp.sum(p, axis=-1, keepdims=True)  # [B, K, G, 1]
    out = jnp.einsum(
        "bkgs,kbsh->bkgh",
        p.astype(v.dtype),
        v,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    out = out / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, H]
    return out.reshape(b, n, h).astype(q.dtype)
