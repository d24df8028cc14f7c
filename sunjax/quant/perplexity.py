"""Held-out perplexity of a tree (how much a quantized decode module loses)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sunjax.config import ModelConfig
from sunjax.steps import forward

DATA_DIR = pathlib.Path(__file__).parent.parent / "data"


def read_text(name: str) -> str:
    """``sunjax/data/{name}.txt``: ``"heldout"`` (evaluation) or ``"calib"`` (AWQ calibration)."""
    path = DATA_DIR / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in DATA_DIR.glob("*.txt"))
        raise ValueError(f"no text named {name!r} in {DATA_DIR} (known: {known})")
    return path.read_text(encoding="utf-8")


def perplexity(cfg: ModelConfig, params, tokens: Int[Array, " T"], window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``window`` tokens.

    Each window is scored on its own (its first token is context only); a trailing partial
    window is dropped.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if not 2 <= window <= cfg.max_position_embeddings:
        raise ValueError(f"{window=} must lie in [2, {cfg.max_position_embeddings}]")
    n = tokens.shape[0] // window
    if n == 0:
        raise ValueError(f"{tokens.shape[0]} tokens are fewer than one {window=}")
    batch = tokens[: n * window].reshape(n, window)
    logits = forward(cfg, params, batch)  # [n, window, V]
    return float(jnp.exp(_mean_nll(logits, jnp.asarray(batch, jnp.int32))))


@jax.jit
def _mean_nll(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"]) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return jnp.mean(nll)
