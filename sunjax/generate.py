"""Simple batched generation on prefill + decode_step: the reference path of the engine.

``decode_params`` lets the prompt and the response run through different trees: the SUN
pairing (task prefill module, shared decode module). The whole loop is one jitted
``lax.while_loop``: no host round trip per token and no recompilation per step (shapes are
bucketed: prompts to a power of two, the cache to prompt bucket + max_new_tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sunjax.config import ModelConfig
from sunjax.model import _run, check_tokens
from sunjax.sampling import SamplingParams, sample


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, EOS included when hit
    finish_reason: list[str]  # "stop" (an EOS id) or "length" (max_new_tokens)


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest power of two >= max(n, minimum): the padded length shapes are compiled for."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ``prompts`` with zeros to ``length``; returns ``(tokens [B, T], lengths [B])``."""
    tokens = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def generate(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    decode_params=None,
) -> Generation:
    """Generate up to ``max_new_tokens`` after each prompt (a list of token-id lists)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens=} exceeds "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )
    tokens, lengths = pad_prompts(prompts, bucket(longest))
    check_tokens(cfg, tokens)
    sp = SamplingParams.create(
        len(prompts), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    out, n = _generate(
        cfg,
        max_new_tokens,
        tuple(int(e) for e in eos_ids),
        params,
        params if decode_params is None else decode_params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        sp,
    )
    out, n = np.asarray(out), np.asarray(n)
    eos = set(int(e) for e in eos_ids)
    seqs = [out[i, : n[i]].tolist() for i in range(len(prompts))]
    reasons = ["stop" if s and s[-1] in eos else "length" for s in seqs]
    return Generation(tokens=seqs, finish_reason=reasons)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(cfg, max_new, eos_ids, prefill_params, decode_params, tokens, lengths, sp):
    B, T = tokens.shape
    cache = cfg.init_cache(B, T + max_new)
    logits, cache = _run(cfg, prefill_params, tokens, cache, lengths, lengths - 1)
    tok = sample(logits[:, 0], sp, lengths)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    out = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)
    count = jnp.ones((B,), jnp.int32)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        i, tok, cache, out, done, count = state
        logits, cache = _run(cfg, decode_params, tok[:, None], cache, jnp.ones_like(lengths), None)
        tok = sample(logits[:, 0], sp, cache.lengths)
        out = out.at[:, i].set(jnp.where(done, 0, tok))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        return i + 1, tok, cache, out, done, count

    state = (jnp.int32(1), tok, cache, out, done, count)
    _, _, _, out, _, count = jax.lax.while_loop(cond, body, state)
    return out, count
