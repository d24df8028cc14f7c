"""The public step layer: every way sunjax runs the model over a KV cache.

Letters: B batch, T new tokens per sequence, S cache positions, V vocab.

Pure functions (no jit; call them inside your own ``jax.jit``, ``jax.grad`` or ``shard_map``):

* ``run(cfg, params, tokens, cache, advance, logits_at)``   the one forward over a cache;
* ``prefill_and_sample(cfg, params, tokens, lengths, cache, sampling)``
  right-padded prompts -> first sampled token, its logits, the cache with the prompts' K/V;
* ``decode_and_sample(cfg, params, tokens, cache, sampling, active)``
  one token per sequence -> next sampled token, its logits, the cache (dense ``KVCache``
  or ``PagedKVCache``: the model's attention dispatches on the cache type);
* ``extend(cfg, params, tokens, cache, lengths)``  ``T`` tokens after a cache -> all logits
  (the SUN loss runs the decode tree this way over a response, attending to the prefill
  tree's KV; so does teacher-forced evaluation).

``sunjax.generate``, the serving engine, the SUN loss and AWQ calibration all call these.
The jitted, input-checked entry points for users are ``forward``, ``prefill`` and
``decode_step`` (cache donated). ``count_compiles`` counts XLA compilations in a block
(benchmarks and tests assert that serving does not recompile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sunjax.cache import KVCache
from sunjax.config import ModelConfig
from sunjax.model import Transformer, check_tokens
from sunjax.paged import PagedKVCache
from sunjax.sampling import SamplingParams, sample

Cache = KVCache | PagedKVCache


def run(
    cfg: ModelConfig,
    params,
    tokens: Int[Array, "B T"],
    cache: Cache,
    advance: Int[Array, " B"],
    logits_at: Int[Array, " B"] | None = None,
) -> tuple[Float[Array, "B T V"], Cache]:
    """Write ``tokens`` at each sequence's ``cache.lengths`` and return their logits.

    The cache's lengths grow by ``advance`` (a right-padded row's true length, or 0 for a
    slot that must not move). ``logits_at`` [B] scores one position per row (``[B, 1, V]``)
    instead of all ``T``. A ``PagedKVCache`` takes one token per slot (``T = 1``, a decode
    step); its slots' pages must already hold position ``lengths`` (``PageAllocator.extend``).
    """
    T = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    paged = isinstance(cache, PagedKVCache)
    if paged and T != 1:
        raise ValueError(f"a PagedKVCache takes one token per slot, got tokens {tokens.shape}")
    logits, ks, vs = Transformer(cfg).apply(
        {"params": params},
        tokens,
        positions,
        cache.k,
        cache.v,
        cache.lengths,
        logits_at,
        cache.page_table if paged else None,
    )
    return logits, dataclasses.replace(cache, k=ks, v=vs, lengths=cache.lengths + advance)


def prefill_logits(
    cfg: ModelConfig,
    params,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
    cache: KVCache,
) -> tuple[Float[Array, "B V"], KVCache]:
    """Right-padded prompts (true lengths ``lengths``) after ``cache``: logits at each prompt's
    last true position, and the cache with the prompts appended."""
    logits, cache = run(cfg, params, tokens, cache, lengths, jnp.maximum(lengths - 1, 0))
    return logits[:, 0], cache


def prefill_and_sample(
    cfg: ModelConfig,
    params,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
    cache: KVCache,
    sampling: SamplingParams,
) -> tuple[Int[Array, " B"], Float[Array, "B V"], KVCache]:
    """``prefill_logits``, then each prompt's first new token sampled with its own settings."""
    logits, cache = prefill_logits(cfg, params, tokens, lengths, cache)
    return sample(logits, sampling, lengths), logits, cache


def decode_and_sample(
    cfg: ModelConfig,
    params,
    tokens: Int[Array, " B"],
    cache: Cache,
    sampling: SamplingParams,
    active: jax.Array | None = None,
) -> tuple[Int[Array, " B"], Float[Array, "B V"], Cache]:
    """One decode step: ``tokens`` [B] go in at ``cache.lengths``; returns the next token of
    every row (0 where ``active`` is False: those rows' lengths do not move), its logits and
    the cache."""
    advance = jnp.ones_like(cache.lengths) if active is None else active.astype(jnp.int32)
    logits, cache = run(cfg, params, tokens[:, None], cache, advance)
    nxt = sample(logits[:, 0], sampling, cache.lengths)
    if active is not None:
        nxt = jnp.where(active, nxt, 0)
    return nxt, logits[:, 0], cache


def extend(
    cfg: ModelConfig,
    params,
    tokens: Int[Array, "B T"],
    cache: KVCache,
    lengths: Int[Array, " B"] | None = None,
) -> tuple[Float[Array, "B T V"], KVCache]:
    """Logits of ``T`` new tokens per sequence that attend to ``cache`` and to each other;
    the cache grows by ``lengths`` (default ``T``)."""
    if lengths is None:
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    return run(cfg, params, tokens, cache, lengths)


# -- jitted, checked entry points ---------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens):
    B, T = tokens.shape
    logits, _ = extend(cfg, params, tokens, cfg.init_cache(B, T))
    return logits


_prefill = jax.jit(prefill_logits, static_argnums=0, donate_argnames="cache")


@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def _decode_step(cfg, params, tokens, cache):
    logits, cache = run(cfg, params, tokens[:, None], cache, jnp.ones_like(cache.lengths))
    return logits[:, 0], cache


def forward(cfg: ModelConfig, params, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    """Causal logits for every position of ``tokens`` (no cache in or out)."""
    check_tokens(cfg, tokens, max_len=cfg.max_position_embeddings)
    return _forward(cfg, params, jnp.asarray(tokens, jnp.int32))


def prefill(
    cfg: ModelConfig,
    params,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
    cache: KVCache,
) -> tuple[Float[Array, "B V"], KVCache]:
    """Jitted ``prefill_logits`` with checked inputs. Padding positions are written but lie
    past the new lengths, so they are masked and overwritten. ``cache`` is donated."""
    check_tokens(cfg, tokens, lengths=lengths, cache=cache)
    tokens = jnp.asarray(tokens, jnp.int32)
    return _prefill(cfg, params, tokens, jnp.asarray(lengths, jnp.int32), cache)


def decode_step(
    cfg: ModelConfig, params, tokens: Int[Array, " B"], cache: KVCache
) -> tuple[Float[Array, "B V"], KVCache]:
    """One new token per sequence at position ``cache.lengths``; returns its logits.
    ``cache`` is donated: use the returned cache, not the argument."""
    return _decode_step(cfg, params, jnp.asarray(tokens, jnp.int32), cache)


# -- compilation counting ------------------------------------------------------------------
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class CompileCount:
    n: int = 0


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """Count XLA backend compilations inside the block (any function, any thread).

    >>> with count_compiles() as c:
    ...     serve_requests()
    >>> c.n  # 0 once every shape is warm
    """
    count = CompileCount()

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE:
            count.n += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
