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
        full = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (batch,))
        return cls(
            temperature=full(temperature, jnp.float32),
            top_k=full(top_k, jnp.int32),
            top_p=full(top_p, jnp.float32),
            seed=full(seed, jnp.uint32),
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
    """Temperature-scaled logits with the tokens outside top-k / top-p set to -inf. The sort
    runs only when some row asks for top-k or top-p: on the CPU, sorting 4 x 49152 logits
    took 82 ms, 20x a tiny model's whole decode step."""
    x = logits.astype(jnp.float32) / jnp.maximum(sp.temperature, 1e-6)[:, None]
    cut = jnp.any((sp.top_k > 0) | (sp.top_p < 1))
    return jax.lax.cond(cut, lambda x: _sorted_cut(x, sp), lambda x: x, x)


def _sorted_cut(x: Float[Array, "B V"], sp: SamplingParams) -> Float[Array, "B V"]:
    V = x.shape[-1]
    desc = jnp.sort(x, axis=-1)[:, ::-1]  # [B, V]
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < sp.top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= jnp.maximum(cutoff, kth), x, -jnp.inf)


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
