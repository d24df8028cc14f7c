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


def sun_logits(
    cfg: ModelConfig, prefill_params, decode_params, batch: Batch
) -> Float[Array, "B R V"]:
    """Teacher-forced scores of every response token: ``[:, 0]`` (y_1) from the prefill tree's
    last prompt position, ``[:, j]`` (y_{j+1}) from the decode tree over the prefill tree's KV."""
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
    return logits


def _token_nll(logits: Float[Array, "B R V"], batch: Batch):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch.response[..., None], axis=-1)[..., 0]
    R = batch.response.shape[1]
    mask = (jnp.arange(R)[None, :] < batch.response_len[:, None]).astype(jnp.float32)
    return nll * mask, mask


def sun_token_nll(
    cfg: ModelConfig, prefill_params, decode_params, batch: Batch
) -> tuple[Float[Array, "B R"], Float[Array, "B R"]]:
    """Per-token negative log-likelihood of each response, and its validity mask."""
    return _token_nll(sun_logits(cfg, prefill_params, decode_params, batch), batch)


def sun_loss(cfg: ModelConfig, prefill_params, decode_params, batch: Batch):
    """Mean response-token NLL and metrics: ``(loss, metrics)``.

    Metrics: ``loss``; ``first_nll`` / ``rest_nll``, the mean NLL of the first response token
    (scored by the prefill tree) and of the later ones (scored by the decode tree);
    ``first_acc`` / ``rest_acc``, the fraction of those tokens that are the argmax
    (teacher-forced); ``tokens``, the number of response tokens."""
    logits = sun_logits(cfg, prefill_params, decode_params, batch)
    nll, mask = _token_nll(logits, batch)
    hit = (jnp.argmax(logits, axis=-1) == batch.response).astype(jnp.float32) * mask
    tokens = jnp.maximum(mask.sum(), 1.0)
    n_first = jnp.maximum(mask[:, 0].sum(), 1.0)
    n_rest = jnp.maximum(mask[:, 1:].sum(), 1.0)
    loss = nll.sum() / tokens
    return loss, {
        "loss": loss,
        "first_nll": nll[:, 0].sum() / n_first,
        "rest_nll": nll[:, 1:].sum() / n_rest,
        "first_acc": hit[:, 0].sum() / n_first,
        "rest_acc": hit[:, 1:].sum() / n_rest,
        "tokens": mask.sum(),
    }


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
