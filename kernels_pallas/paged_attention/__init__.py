"""Decode attention over a paged KV cache, for GPU and TPU.

``o = paged_attention(q, k_pages, v_pages, lengths, page_indices)``: one decode query per
sequence attends to that sequence's tokens, stored in fixed-size pages of a shared pool.
``gpu.py`` / ``tpu.py`` wrap the Pallas kernels JAX ships, ``reference.py`` is the plain-XLA
gather beside them, ``config.py`` the block sizes and ``bench.py`` the benchmark.
"""

from kernels_pallas.paged_attention.api import paged_attention
from kernels_pallas.paged_attention.config import Config, get_config
from kernels_pallas.paged_attention.reference import (
    gather_pages,
    key_mask,
    paged_attention_reference,
)

__all__ = [
    "Config",
    "gather_pages",
    "get_config",
    "key_mask",
    "paged_attention",
    "paged_attention_reference",
]
