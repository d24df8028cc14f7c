"""Per-sequence sampling inside jit: greedy, temperature, top-k, top-p, seeded.

Every row carries its own settings, so one batched decode step can serve requests with
different sampling parameters. Randomness is ``fold_in(PRNGKey(seed), position)`` per row:
a request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Batched sampling settings, one entry per sequence. temperature 0 means greedy."""

    temperature: Float[Array, " B"]
    top_k: Int[Array, " B"]  # 0 = no top-k
    top_p: Float[Array, " B"]  # 1.0 = no nucleus cut
    seed: Int[Array, " B"]

    @classmethod
    def create(cls, batch: int, *, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> SamplingParams:
        validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        # built on the host, one transfer per field (the serving loop makes one per request)
        full = lambda v, dt: jnp.asarray(np.broadcast_to(np.asarray(v, dt), (batch,)))
        return cls(
            temperature=full(temperature, np.float32),
            top_k=full(top_k, np.int32),
            top_p=full(top_p, np.float32),
            seed=full(seed, np.uint32),
        )


def validate_sampling(*, temperature, top_k, top_p) -> None:
    """Raise ValueError naming the first invalid setting."""
    t, k, p = (np.asarray(v) for v in (temperature, top_k, top_p))
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"temperature={temperature} must be finite and >= 0")
    if np.any(k < 0) or not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"top_k={top_k} must be an integer >= 0")
    if not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")


def _cut(logits: Float[Array, "B V"], sp: SamplingParams) -> Float[Array, "B V"]:
    """Temperature-scaled logits with the tokens outside top-k / top-p set to -inf.

    No sort: each cut is a threshold found by bisection over the float32 values' order-keeping
    integer keys (32 halvings of the key range, each one masked reduction over the
    vocabulary), so it is exact. On the CPU a full sort of 4 x 49152 logits took 82 ms, 20x a
    tiny model's decode step; the bisection runs only when some row asks for a cut."""
    x = logits.astype(jnp.float32) / jnp.maximum(sp.temperature, 1e-6)[:, None]
    cut = jnp.any((sp.top_k > 0) | (sp.top_p < 1))
    return jax.lax.cond(cut, lambda x: _threshold_cut(x, sp), lambda x: x, x)


def _order_key(x: Float[Array, "..."]) -> Array:
    """uint32 keys in the order of the float32 values (the radix-sort key)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    flip = jnp.where(bits >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))
    return bits ^ flip


def _largest_key(keys: Array, weight: Float[Array, "B V"], need: Float[Array, " B"]) -> Array:
    """Per row, the largest key ``t`` with ``sum(weight[keys >= t]) >= need`` (the total
    weight must reach ``need``). Bisection keeps sum(>= lo) >= need > sum(>= hi)."""
    lo = jnp.min(keys, axis=-1)
    hi = jnp.max(keys, axis=-1) + 1  # no float32 maps to 0xFFFFFFFF but a NaN

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(keys >= mid[:, None], weight, 0), axis=-1) >= need
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return lo


def _threshold_cut(x: Float[Array, "B V"], sp: SamplingParams) -> Float[Array, "B V"]:
    """Keeps what a descending sort would: the ``top_k`` largest (ties at the k-th value
    kept), then the smallest set of those whose probability mass reaches ``top_p``."""
    V = x.shape[-1]
    keys = _order_key(x)
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, V), V).astype(jnp.float32)
    kth = _largest_key(keys, jnp.ones_like(x), k)[:, None]
    probs = jax.nn.softmax(jnp.where(keys >= kth, x, -jnp.inf), axis=-1)
    cutoff = _largest_key(keys, probs, sp.top_p)
    # top_p = 1 keeps everything, even where float rounding puts the total a little over 1
    cutoff = jnp.where(sp.top_p < 1, cutoff, jnp.uint32(0))[:, None]
    return jnp.where(keys >= jnp.maximum(kth, cutoff), x, -jnp.inf)


def sample(
    logits: Float[Array, "B V"], sp: SamplingParams, positions: Int[Array, " B"]
) -> Int[Array, " B"]:
    """Next token per row. Greedy rows take the argmax; the sort is skipped if all are greedy."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(_):
        x = _cut(logits, sp)
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(
            sp.seed, positions
        )
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(sp.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(sp.temperature > 0), stochastic, lambda _: greedy, None)


def sampled_logprobs(logits: Float[Array, "B V"], sp: SamplingParams) -> Float[Array, "B V"]:
    """Log-probabilities of the distribution ``sample`` draws each row from: temperature,
    top-k and top-p applied (-inf outside the cut); a greedy row reports the model's own
    distribution (``log_softmax(logits)``)."""
    raw = logits.astype(jnp.float32)

    def stochastic(_):
        return jnp.where(sp.temperature[:, None] > 0, _cut(logits, sp), raw)

    x = jax.lax.cond(jnp.any(sp.temperature > 0), stochastic, lambda _: raw, None)
    return jax.nn.log_softmax(x, axis=-1)
