"""The KV cache: an explicit pytree with one key and one value buffer per layer.

Letters: B batch (sequence slots), S cache positions, K kv heads, H head dim, L layers.

Each layer owns its own ``[B, K, S, H]`` buffer (a tuple over layers rather than one stacked
``[L, ...]`` array), so a decode step updates every layer in place with a donated cache and
never copies a layer's slice. ``lengths[b]`` is how many positions of slot ``b`` are valid.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, K, S, H]: head-major, so attention reads it as is
    v: tuple[jax.Array, ...]  # L x [B, K, S, H]
    lengths: Int[Array, " B"]  # valid positions per slot

    @classmethod
    def create(cls, cfg, batch: int, max_len: int, dtype: str) -> KVCache:
        if batch < 1 or max_len < 1:
            raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch=} {max_len=}")
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        return cls(k=zeros(), v=zeros(), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def insert(self, other: KVCache, slot) -> KVCache:
        """Copy ``other`` (batch 1, max_len <= self.max_len) into slot ``slot``. Jittable."""
        if other.batch != 1 or other.max_len > self.max_len:
            raise ValueError(
                f"insert needs a batch-1 cache no longer than {self.max_len} positions, got "
                f"batch={other.batch} max_len={other.max_len}"
            )
        put = lambda dst, src: jax.lax.dynamic_update_slice(
            dst, src.astype(dst.dtype), (slot, 0, 0, 0)
        )
        return KVCache(
            k=tuple(map(put, self.k, other.k)),
            v=tuple(map(put, self.v, other.v)),
            lengths=self.lengths.at[slot].set(other.lengths[0]),
        )
