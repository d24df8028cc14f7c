"""The SUN split and loss.

A task's **prefill module** reads the prompt (KV cache + first-token logits); the shared,
frozen **decode module** generates the rest, attending to the prefill module's KV. Both are
parameter trees of the same structure (the decode tree's leaves may be quantized).

    L(phi) = -log p_phi(y_1 | x) - sum_{j>=1} log p_theta(y_{j+1} | KV_phi(x), y_<=j)

``sun_loss`` is that loss, on the same code path as serving: ``prefill`` with ``phi``, then
``extend`` (teacher-forced decode) with ``theta``. Gradients reach ``phi`` only through the KV
cache and the first-token logits. Conventional full fine-tuning is the same loss with one
tree in both places: ``sun_loss(cfg, params, params, batch)``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sunjax.config import ModelConfig
from sunjax.steps import extend, prefill_logits


class SunParams(NamedTuple):
    """A pairing: the tree that reads the prompt and the tree that generates the rest.

    SUN pairs a task's prefill module with the shared decode module; full fine-tuning pairs a
    tree with itself; the naive pairing is a full fine-tune with the base as decode module.

    >>> pair = SunParams(prefill=task_tree, decode=base)
    >>> loss, metrics = sun_loss(cfg, *pair, batch)
    """

    prefill: dict
    decode: dict


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Right-padded (prompt, response) pairs. The response ends with the EOS id to learn."""

    prompt: Int[Array, "B P"]
    prompt_len: Int[Array, " B"]
    response: Int[Array, "B R"]
    response_len: Int[Array, " B"]


def sun_token_nll(
    cfg: ModelConfig, prefill_params, decode_params, batch: Batch
) -> tuple[Float[Array, "B R"], Float[Array, "B R"]]:
    """Per-token negative log-likelihood of each response, and its validity mask."""
    B, P = batch.prompt.shape
    R = batch.response.shape[1]
    cache = cfg.init_cache(B, P + R)
    first, cache = prefill_logits(cfg, prefill_params, batch.prompt, batch.prompt_len, cache)
    logits = first[:, None]  # [B, 1, V] scores y_1
    if R > 1:
        rest, _ = extend(
            cfg, decode_params, batch.response[:, :-1], cache, jnp.full((B,), R - 1)
        )  # [B, R-1, V] scores y_2..y_R
        logits = jnp.concatenate([logits, rest], axis=1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch.response[..., None], axis=-1)[..., 0]
    mask = (jnp.arange(R)[None, :] < batch.response_len[:, None]).astype(jnp.float32)
    return nll * mask, mask


def sun_loss(cfg: ModelConfig, prefill_params, decode_params, batch: Batch):
    """Mean response-token NLL and metrics: ``(loss, {"loss", "first_nll", "tokens"})``."""
    nll, mask = sun_token_nll(cfg, prefill_params, decode_params, batch)
    tokens = jnp.maximum(mask.sum(), 1.0)
    loss = nll.sum() / tokens
    first = nll[:, 0].sum() / jnp.maximum(mask[:, 0].sum(), 1.0)
    return loss, {"loss": loss, "first_nll": first, "tokens": mask.sum()}


def make_batch(
    pairs: list[tuple[list[int], list[int]]], prompt_len: int, response_len: int
) -> Batch:
    """Pad ``(prompt_ids, response_ids)`` pairs to fixed shapes; too-long ones raise."""
    B = len(pairs)
    prompt = np.zeros((B, prompt_len), np.int32)
    response = np.zeros((B, response_len), np.int32)
    plen, rlen = np.zeros(B, np.int32), np.zeros(B, np.int32)
    for i, (p, r) in enumerate(pairs):
        if not 1 <= len(p) <= prompt_len:
            raise ValueError(f"prompt of {len(p)} tokens does not fit prompt_len={prompt_len}")
        if not 1 <= len(r) <= response_len:
            raise ValueError(
                f"response of {len(r)} tokens does not fit response_len={response_len}"
            )
        prompt[i, : len(p)], response[i, : len(r)] = p, r
        plen[i], rlen[i] = len(p), len(r)
    return Batch(
        prompt=jnp.asarray(prompt),
        prompt_len=jnp.asarray(plen),
        response=jnp.asarray(response),
        response_len=jnp.asarray(rlen),
    )
