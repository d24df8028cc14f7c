"""The serving engine: ``prefill`` / ``insert`` / ``generate``, params passed on every call.

Letters: B decode slots, T bucketed prompt length, S cache positions, V vocab.

* ``prefill(params, tokens, true_length, sampling) -> Prefix``: a task's prefill tree reads one
  prompt (right-padded to a ``sunjax.generate.bucket`` length) and returns its batch-1 KV
  cache and first token.
* ``insert(prefix, state, slot) -> state``: copies a prefix into a free decode slot (jitted,
  the decode state donated).
* ``generate(params, state) -> (state, tokens [B])``: one decode step of every slot with the
  decode tree, each slot sampled with its own settings (jitted, donated).
  ``generate_logprobs`` is the same step that also returns each new token's log-probability
  and the top ``TOP_LOGPROBS`` alternatives (``Logprobs``), computed inside the step from the
  distribution the token was drawn from (``sunjax.sampling.sampled_logprobs``).

Paged cache (``EngineConfig(page_size=..., num_pages=...)``): prefill stays dense and
bucketed; ``insert`` writes the batch-1 prefix onto the slot's pages (``page_row`` from the
caller's ``PageAllocator``, ``Engine.allocator``) and ``generate`` writes and attends
through the page table (``sunjax.paged``, ``kernels_pallas.paged_attention``). The caller
extends each live sequence's pages before a step and keeps freed slots' rows null
(``serve.scheduler`` does both); ``read_prefix`` copies a slot back out (preemption).

Compiled shapes depend only on the prompt bucket and the slot count, never on a request, so
serving many requests of varied lengths compiles ``prefill`` once per bucket and the rest once
(``sunjax.count_compiles`` checks it). The steps are ``sunjax.steps``' prefill-and-sample and
decode-and-sample; the decode pool (``serve.pool``) runs the same ``decode_step`` inside
``shard_map`` over its workers and ``Engine.insert`` on one worker's shard.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from sunjax.cache import KVCache
from sunjax.config import ModelConfig
from sunjax.generate import bucket
from sunjax.paged import PageAllocator, PagedKVCache, pages_for
from sunjax.sampling import SamplingParams, sample, sampled_logprobs
from sunjax.steps import decode_and_sample, prefill_logits

Params = dict  # a model's plain nested parameter dict
TOP_LOGPROBS = 5  # alternatives computed per token (the OpenAI completions maximum)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """The decode slots and the cache: one config for an engine and for a decode pool.

    ``workers`` decode workers (1 for a lone engine) of ``slots_per_worker`` slots each, every
    slot a cache of ``max_len`` positions; prompts pad to buckets of at least ``min_bucket``.

    ``page_size`` None: a dense cache (``[B, K, max_len, H]`` per layer).  Otherwise a
    ``PagedKVCache``: each worker owns a pool of ``num_pages`` pages of ``page_size`` tokens
    (page 0 the null page; default: enough for every slot at ``max_len``) that its slots
    share, so fewer pages than that admit more slots than dense memory would, and the
    scheduler preempts when they run out."""

    workers: int = 1
    slots_per_worker: int = 8
    max_len: int = 256
    min_bucket: int = 8
    page_size: int | None = None
    num_pages: int | None = None

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")
        if self.slots_per_worker < 1:
            raise ValueError(f"slots_per_worker={self.slots_per_worker} must be >= 1")
        if self.min_bucket < 1 or self.max_len < self.min_bucket:
            raise ValueError(f"need 1 <= min_bucket={self.min_bucket} <= max_len={self.max_len}")
        if self.page_size is None:
            if self.num_pages is not None:
                raise ValueError(f"num_pages={self.num_pages} needs a page_size (None: dense)")
            return
        if self.page_size < 1:
            raise ValueError(f"page_size={self.page_size} must be >= 1")
        if self.num_pages is None:  # room for every slot at max_len: never preempts
            object.__setattr__(self, "num_pages", self.slots_per_worker * self.pages_per_seq + 1)
        if self.num_pages - 1 < self.pages_per_seq:
            raise ValueError(
                f"num_pages={self.num_pages} cannot hold one sequence of max_len={self.max_len} "
                f"({self.pages_per_seq} pages of {self.page_size} + the null page)"
            )

    @property
    def slots(self) -> int:
        """Slots over all workers."""
        return self.workers * self.slots_per_worker

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @property
    def pages_per_seq(self) -> int:
        """Page-table width M (paged only)."""
        return pages_for(self.max_len, self.page_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Each row's new token scored under the distribution it was sampled from."""

    logprob: Float[Array, " B"]  # of the sampled token
    top_ids: Int[Array, "B L"]  # the L = TOP_LOGPROBS most likely tokens, best first
    top_logprobs: Float[Array, "B L"]


def token_logprobs(
    logits: Float[Array, "B V"], sampling: SamplingParams, tokens: Int[Array, " B"]
) -> Logprobs:
    lp = sampled_logprobs(logits, sampling)
    top_lp, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    return Logprobs(logprob=chosen, top_ids=top_ids.astype(jnp.int32), top_logprobs=top_lp)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
    """One prefilled prompt, ready to hand to a decode slot."""

    cache: KVCache  # batch 1, [1, K, T, H] per layer, lengths [1] = true prompt length
    token: Int[Array, ""]  # first generated token (sampled from the prefill tree's logits)
    length: Int[Array, ""]  # true prompt length
    sampling: SamplingParams  # batch 1: the request's settings, carried into its slot
    logprobs: Logprobs | None = None  # batch 1: the first token's log-probabilities
    model: str = dataclasses.field(default="", metadata={"static": True})  # host metadata


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything one decode step reads and writes, one row per slot."""

    cache: KVCache | PagedKVCache  # [B, K, S, H] per layer or pools [K, A, P, H]; lengths [B]
    tokens: Int[Array, " B"]  # each slot's last token: the input of the next step
    sampling: SamplingParams  # [B] per-slot settings
    active: Bool[Array, " B"]  # slots holding a live request


def init_cache(cfg: ModelConfig, config: EngineConfig) -> KVCache | PagedKVCache:
    """The decode cache of all ``config.slots`` slots.  Paged: worker ``w``'s pool is rows
    ``w * K .. (w + 1) * K - 1`` of each ``[W * K, A, P, H]`` layer array, so sharding
    every leaf's first axis over the workers gives each its own ``[K, A, P, H]`` pool."""
    if not config.paged:
        return cfg.init_cache(config.slots, config.max_len)
    one = cfg.init_paged_cache(
        config.slots, config.max_len, num_pages=config.num_pages, page_size=config.page_size
    )
    tile = lambda pages: jnp.tile(pages, (config.workers, 1, 1, 1))
    return dataclasses.replace(one, k=tuple(map(tile, one.k)), v=tuple(map(tile, one.v)))


def init_decode_state(cfg: ModelConfig, config: EngineConfig) -> DecodeState:
    """Empty decode state of all ``config.slots`` slots."""
    slots = config.slots
    return DecodeState(
        cache=init_cache(cfg, config),
        tokens=jnp.zeros((slots,), jnp.int32),
        sampling=SamplingParams.create(slots),
        active=jnp.zeros((slots,), bool),
    )


def sampling_params(
    *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0
) -> SamplingParams:
    """Batch-1 ``SamplingParams`` for one request; invalid values raise ValueError."""
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed={seed} must lie in [0, 2**32)")
    return SamplingParams.create(1, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


# -- pure steps (jitted below, and inside shard_map by the pool) ---------------------------
def prefill_step(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "B T"],
    length: Int[Array, " B"],
    sampling: SamplingParams,
    prior: KVCache | None = None,
    size: int | None = None,
) -> tuple[KVCache, Int[Array, " B"], Logprobs]:
    """Right-padded prompts (true lengths ``length``) after ``prior`` (a dense cache of the
    tokens before them, ``prior.lengths`` each, with room for ``T`` more; None: an empty cache
    of ``size`` positions, default ``T``): the cache with them appended and the first new
    token, sampled from the logits at the last true position (its key folds in the total
    length, so a prompt prefilled in pieces samples what one pass would)."""
    if prior is None:
        prior = cfg.init_cache(tokens.shape[0], size or tokens.shape[1])
    logits, cache = prefill_logits(cfg, params, tokens, length, prior)
    token = sample(logits, sampling, cache.lengths)
    return cache, token, token_logprobs(logits, sampling, token)


def insert_step(
    prefix: Prefix,
    state: DecodeState,
    slot: Int[Array, ""],
    page_row: Int[Array, " M"] | None = None,
    shared: Int[Array, ""] | int = 0,
) -> DecodeState:
    """Put ``prefix`` into ``slot`` (paged: onto the pages ``page_row``, of which the first
    ``shared`` are prefix-cache pages that already hold its leading blocks and are not
    written) and activate it."""
    put = lambda dst, src: jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), (slot,))
    if isinstance(state.cache, PagedKVCache):
        if page_row is None:
            raise ValueError("inserting into a paged cache needs the slot's page_row")
        cache = state.cache.insert(prefix.cache, slot, page_row, shared)
    else:
        cache = state.cache.insert(prefix.cache, slot)
    return DecodeState(
        cache=cache,
        tokens=state.tokens.at[slot].set(prefix.token),
        sampling=jax.tree.map(put, state.sampling, prefix.sampling),
        active=state.active.at[slot].set(True),
    )


def decode_step_logprobs(
    cfg: ModelConfig, params: Params, state: DecodeState
) -> tuple[DecodeState, tuple[Int[Array, " B"], Logprobs]]:
    """Advance every active slot by one token (inactive slots keep their length); returns
    the new tokens and their log-probabilities."""
    nxt, logits, cache = decode_and_sample(
        cfg, params, state.tokens, state.cache, state.sampling, state.active
    )
    lp = token_logprobs(logits, state.sampling, nxt)
    return dataclasses.replace(state, cache=cache, tokens=nxt), (nxt, lp)


def decode_step(
    cfg: ModelConfig, params: Params, state: DecodeState
) -> tuple[DecodeState, Int[Array, " B"]]:
    """``decode_step_logprobs`` without the log-probabilities (XLA drops their work)."""
    state, (nxt, _) = decode_step_logprobs(cfg, params, state)
    return state, nxt


_prefill = jax.jit(prefill_step, static_argnums=0, static_argnames="size")
_insert = jax.jit(insert_step, donate_argnums=1)


@functools.partial(jax.jit, static_argnums=3)
def _split_rows(cache: KVCache, tokens, lp: Logprobs, n: int):
    """The first ``n`` rows of a batched prefill, each as batch-1 pieces."""
    row = lambda i: lambda x: x[i : i + 1]
    return [(jax.tree.map(row(i), cache), tokens[i], jax.tree.map(row(i), lp)) for i in range(n)]


def _truncate(cache: KVCache, n: int) -> KVCache:
    """The first ``n`` positions of a dense cache whose later positions are padding."""
    cut = lambda x: x[:, :, :n]
    return KVCache(k=tuple(map(cut, cache.k)), v=tuple(map(cut, cache.v)), lengths=cache.lengths)


def _device_of(params: Params) -> jax.Device | None:
    """The one device ``params`` live on (None: several, or none committed)."""
    leaf = jax.tree.leaves(params)[0]
    devices = getattr(leaf, "devices", lambda: set())()
    return next(iter(devices)) if len(devices) == 1 else None


_read_prefix = jax.jit(PagedKVCache.read_prefix, static_argnums=3)
_generate = jax.jit(decode_step, static_argnums=0, donate_argnums=2)
_generate_logprobs = jax.jit(decode_step_logprobs, static_argnums=0, donate_argnums=2)


class Engine:
    """Prefill / insert / generate for one model config on one device.

    >>> eng = Engine(cfg, EngineConfig(slots_per_worker=4, max_len=64))
    >>> state = eng.init_decode_state()
    >>> prefix = eng.prefill(task_params, [5, 6, 7], sampling_params())
    >>> state = eng.insert(prefix, state, slot=0)
    >>> state, tokens = eng.generate(decode_params, state)  # tokens [4]
    """

    def __init__(self, cfg: ModelConfig, config: EngineConfig):
        self.cfg = cfg
        self.config = config
        if config.max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={config.max_len} exceeds "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )

    def init_decode_state(self) -> DecodeState:
        """The decode state of one worker (``slots_per_worker`` slots)."""
        return init_decode_state(self.cfg, dataclasses.replace(self.config, workers=1))

    def allocator(self) -> PageAllocator:
        """A host page allocator for one worker's pool (paged configs only)."""
        c = self.config
        if not c.paged:
            raise ValueError("allocator() needs a paged EngineConfig (page_size is None)")
        return PageAllocator(c.num_pages, c.page_size, c.pages_per_seq)

    def bucket(self, n: int) -> int:
        return min(bucket(n, self.config.min_bucket), self.config.max_len)

    def check_prompt(self, tokens: Sequence[int], max_tokens: int) -> None:
        """ValueError naming the value when a request can never be served."""
        n = len(tokens)
        if n == 0:
            raise ValueError("prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        bad = [t for t in tokens if not 0 <= int(t) < self.cfg.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})"
            )
        if n + max_tokens > self.config.max_len:
            raise ValueError(
                f"prompt of {n} tokens + max_tokens={max_tokens} exceeds the decode cache "
                f"length max_len={self.config.max_len}"
            )

    def prefill(
        self,
        params: Params,
        tokens: Sequence[int],
        sampling: SamplingParams,
        *,
        model: str = "",
        prior: KVCache | None = None,
        size: int | None = None,
    ) -> Prefix:
        """Prefill one prompt (a token-id list) with ``params``; the first token is sampled.

        ``prior``: a batch-1 dense cache already holding the prompt's first
        ``prior.lengths[0]`` tokens (prefix-cache pages read back, or earlier chunks), with
        room for ``tokens`` (the rest) padded to its bucket (``prefill_size``); ``size``: the
        positions of the new cache when there is no prior (default the prompt's bucket)."""
        n = len(tokens)
        padded = np.zeros((1, self.bucket(n)), np.int32)
        padded[0, :n] = tokens
        length = jnp.full((1,), n, jnp.int32)
        if prior is not None:
            device = _device_of(params)
            if device is not None:
                prior = jax.device_put(prior, device)
        cache, token, lp = _prefill(
            self.cfg, params, jnp.asarray(padded), length, sampling, prior, size=size
        )
        return Prefix(
            cache=cache,
            token=token[0],
            length=cache.lengths[0],
            sampling=sampling,
            logprobs=lp,
            model=model,
        )

    def prefill_size(self, pieces: Sequence[tuple[int, int]]) -> int:
        """The dense cache length that prefilling a prompt in ``pieces`` ``(start, n)``
        needs (each piece padded to its bucket), rounded up to a bucket to bound compiles."""
        return bucket(max(s + self.bucket(n) for s, n in pieces), self.config.min_bucket)

    def prefill_batch(
        self,
        params: Params,
        prompts: Sequence[Sequence[int]],
        samplings: Sequence[SamplingParams],
        *,
        model: str = "",
    ) -> list[Prefix]:
        """Prefill several prompts of one model in one call: rows padded to a common bucket
        length and the batch to a power of two (compiles per (batch, length) bucket).
        Returns one batch-1 ``Prefix`` per prompt, as ``prefill`` would."""
        n = len(prompts)
        if n == 0 or len(samplings) != n:
            raise ValueError(f"prefill_batch needs prompts and samplings alike, got {n}")
        rows = 1 << (n - 1).bit_length()
        T = self.bucket(max(len(p) for p in prompts))
        padded = np.zeros((rows, T), np.int32)
        lengths = np.ones((rows,), np.int32)  # padding rows: one token, never read
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = p
            lengths[i] = len(p)
        pad = [SamplingParams.create(1)] * (rows - n)
        sampling = jax.tree.map(lambda *x: jnp.concatenate(x), *samplings, *pad)
        cache, tokens, lp = _prefill(
            self.cfg, params, jnp.asarray(padded), jnp.asarray(lengths), sampling, None
        )
        parts = _split_rows(cache, tokens, lp, n)
        return [
            Prefix(cache=c, token=t, length=c.lengths[0], sampling=s, logprobs=lpi, model=model)
            for (c, t, lpi), s in zip(parts, samplings, strict=True)
        ]

    def read_pages(self, state: DecodeState, page_row: np.ndarray, length: int, size: int):
        """A batch-1 dense cache of ``size`` positions holding the ``length`` tokens on the
        pages ``page_row`` (prefix-cache hits; positions past its pages read the null page
        and lie past ``length``)."""
        cache = _read_prefix(state.cache, jnp.int32(0), jnp.asarray(page_row, jnp.int32), size)
        return dataclasses.replace(cache, lengths=jnp.full((1,), length, jnp.int32))

    def insert(
        self,
        prefix: Prefix,
        state: DecodeState,
        slot: int,
        page_row: np.ndarray | None = None,
        shared: int = 0,
    ) -> DecodeState:
        """Put ``prefix`` into decode slot ``slot`` (paged: onto the pages ``page_row``
        [M], from ``PageAllocator.page_row``, not writing its first ``shared``: prefix-cache
        pages); ``state`` is donated."""
        row = None if page_row is None else jnp.asarray(page_row, jnp.int32)
        if not self.config.paged and prefix.cache.max_len > self.config.max_len:
            prefix = dataclasses.replace(prefix, cache=_truncate(prefix.cache, self.config.max_len))
        prefix = dataclasses.replace(prefix, model="")
        return _insert(prefix, state, jnp.int32(slot), row, jnp.int32(shared))

    def read_prefix(
        self, state: DecodeState, slot: int, page_row: np.ndarray, length: int
    ) -> KVCache:
        """Slot ``slot``'s ``length`` cached tokens (on pages ``page_row``) as a batch-1
        dense cache padded to a prompt bucket: what preemption swaps to the host and
        ``insert`` writes back (one compile per bucket, as prefill)."""
        n = self.bucket(length)
        return _read_prefix(state.cache, jnp.int32(slot), jnp.asarray(page_row, jnp.int32), n)

    def generate(self, params: Params, state: DecodeState) -> tuple[DecodeState, jax.Array]:
        """One decode step of every slot with ``params``; ``state`` is donated."""
        return _generate(self.cfg, params, state)

    def generate_logprobs(
        self, params: Params, state: DecodeState
    ) -> tuple[DecodeState, tuple[jax.Array, Logprobs]]:
        """``generate`` that also returns the new tokens' ``Logprobs``."""
        return _generate_logprobs(self.cfg, params, state)
