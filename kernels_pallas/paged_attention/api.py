"""Public entry point: ``paged_attention(q, k_pages, v_pages, lengths, page_indices)``.

Letters as in ``reference.py``: B sequences, N query heads, K kv heads, H head dim, A pages
in the pool, P tokens per page, M pages per sequence.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.paged_attention import gpu, tpu
from kernels_pallas.paged_attention.config import Config, get_config
from kernels_pallas.paged_attention.reference import paged_attention_reference

Implementation = Literal["xla", "pallas"] | None
_IMPLEMENTATIONS = (None, "xla", "pallas")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _check(q, k_pages, v_pages, lengths, page_indices, scale, sliding_window) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [B, N, H] (one decode token per sequence), got {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be [K, A, P, H], got {k_pages.shape} and "
            f"{v_pages.shape}"
        )
    b, n, h = q.shape
    kh, _, _, hk = k_pages.shape
    if hk != h:
        raise ValueError(f"q head_dim={h} does not match the pages' head_dim={hk}")
    if n % kh:
        raise ValueError(f"query heads N={n} are not a multiple of kv heads K={kh}")
    if not q.dtype == k_pages.dtype == v_pages.dtype:
        raise ValueError(
            f"q, k_pages and v_pages must share one dtype, got {q.dtype}, {k_pages.dtype}, "
            f"{v_pages.dtype}"
        )
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be floating point, got dtype {q.dtype}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integer [B={b}], got {lengths.dtype}{lengths.shape}")
    if (
        page_indices.ndim != 2
        or page_indices.shape[0] != b
        or not jnp.issubdtype(page_indices.dtype, jnp.integer)
    ):
        raise ValueError(
            f"page_indices must be integer [B={b}, M], got {page_indices.dtype}{page_indices.shape}"
        )
    bad_window = isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
    if sliding_window is not None and (bad_window or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if scale is not None and not (isinstance(scale, float | int) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


def paged_attention(
    q: Float[Array, "B N H"],
    k_pages: Float[Array, "K A P H"],
    v_pages: Float[Array, "K A P H"],
    lengths: Int[Array, " B"],
    page_indices: Int[Array, "B M"],
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    implementation: Implementation = None,
    config: Config | None = None,
    interpret: bool = False,
) -> Float[Array, "B N H"]:
    """Attention of one decode query per sequence over its paged K/V; ``[B, N, H]``.

    Sequence ``b`` attends to its tokens ``[max(0, lengths[b] - sliding_window),
    lengths[b])``, token ``t`` stored at ``k_pages[:, page_indices[b, t // P], t % P]``
    (see ``reference.py``).  GQA / MQA: query head ``i`` reads kv head ``i // (N // K)``.
    ``scale`` multiplies the logits (default ``H ** -0.5``).  Jittable.

    implementation:
        ``None``: the shipped Pallas kernel on GPU (Triton) and TPU (Mosaic) where it
        supports the case, otherwise the XLA reference.  The fallbacks: CPU; any
        ``sliding_window`` (neither kernel has one); on GPU a head_dim or page_size that is
        not a power of two; on TPU pages that are not bfloat16 (the kernel rounds K/V to
        bf16), a head_dim that is not a multiple of 128 or a page_size not a multiple of 8.
        ``"xla"``: gather the pages, masked softmax (``reference.py``); any JAX.
        ``"pallas"``: the kernel for the default backend; on CPU the Triton kernel in
        interpret mode.  Raises ValueError where it does not support the case.
    config: block sizes; ``None`` looks up ``config.TABLE`` for this device.
    interpret: run the Pallas kernel in interpret mode (implies ``"pallas"`` when
        ``implementation`` is ``None`` and the kernel supports the case).

    JAX versions: the XLA path runs on any JAX; the GPU kernel ships since 0.5 and is
    deprecated from 0.11.1 (still present in 0.11.2, the GPU image); the TPU kernel ships
    since 0.4.26, its CPU interpret mode needs 0.7.  Tested here on 0.10.2.
    """
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    lengths, page_indices = jnp.asarray(lengths), jnp.asarray(page_indices)
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}"
        )
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config must be a Config or None, got {type(config).__name__}")
    _check(q, k_pages, v_pages, lengths, page_indices, scale, sliding_window)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)

    platform = jax.default_backend()
    on_tpu = platform == "tpu"
    on_accelerator = on_tpu or platform in _GPU_PLATFORMS
    kernel = tpu if on_tpu else gpu
    unsupported = kernel.supports(
        dtype=q.dtype,
        head_dim=q.shape[-1],
        page_size=k_pages.shape[2],
        sliding_window=sliding_window,
    )
    if implementation is None:
        implementation = "pallas" if (interpret or on_accelerator) and not unsupported else "xla"
    if implementation == "xla":
        return paged_attention_reference(
            q, k_pages, v_pages, lengths, page_indices, scale=scale, sliding_window=sliding_window
        )
    if unsupported:
        raise ValueError(unsupported)
    if config is None:
        config = get_config(platform="tpu" if on_tpu else "gpu")
    run = tpu.paged_attention_tpu if on_tpu else gpu.paged_attention_gpu
    return run(
        q,
        k_pages,
        v_pages,
        lengths,
        page_indices,
        scale=scale,
        config=config,
        interpret=interpret or not on_accelerator,
    )
