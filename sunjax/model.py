"""One decoder-only Transformer (Llama / Mistral / Qwen2 / Qwen3) in Flax linen.

Letters: B batch, T query length, S key (cache) length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, D model dim, F ffn dim, V vocab, L layers.

The module writes new tokens into the KV cache at each sequence's current length and lets
them attend to everything in the cache up to their own position. Every way of running it
(full-sequence logits, prefill, decode, extend; sampling) lives in ``sunjax.steps``.

Parameters are the plain ``params`` pytree (the inner dict of linen's ``{"params": ...}``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from kernels_pallas.paged_attention import paged_attention
from sunjax.config import ModelConfig
from sunjax.linear import matmul
from sunjax.paged import write_token

_NEG_INF = -1e30


# -- building blocks ------------------------------------------------------------------------
class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Linear(nn.Module):
    """``x @ kernel (+ bias)``; the kernel may be a plain array or a ``QuantizedWeight``."""

    features: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        if self.is_initializing():
            init = nn.initializers.normal(0.02)
            self.param("kernel", init, (x.shape[-1], self.features), self.param_dtype)
        kernel = self.get_variable("params", "kernel")  # [in, out] or QuantizedWeight
        y = matmul(x.astype(self.dtype), kernel)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float64 numpy), with Llama-3 scaling when configured."""
    h = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    old = rs.original_max_position_embeddings
    low_wavelen = old / rs.low_freq_factor
    high_wavelen = old / rs.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def apply_rope(x: Float[Array, "B T n H"], positions: Int[Array, "B T"], inv_freq: np.ndarray):
    """Rotary embedding in the Hugging Face (rotate-half) layout, computed in float32."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def write_cache(
    buf: Float[Array, "B K S H"], new: Float[Array, "B T K H"], start: Int[Array, " B"]
) -> Float[Array, "B K S H"]:
    """Write ``new`` at positions ``start[b] ...`` of each sequence (in place when donated)."""
    new = new.swapaxes(1, 2).astype(buf.dtype)  # [B, K, T, H]
    put = lambda b, n, s: jax.lax.dynamic_update_slice(b, n, (0, s, 0))
    return jax.vmap(put)(buf, new, start)


def dense_attention(
    cfg: ModelConfig,
    q: Float[Array, "B T N H"],
    k_cache: Float[Array, "B K S H"],
    v_cache: Float[Array, "B K S H"],
    positions: Int[Array, "B T"],
) -> Float[Array, "B T N H"]:
    """Each query attends to the cached keys at positions ``<= positions`` (and inside the
    sliding window)."""
    B, T, N, H = q.shape
    K, S = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum(
        "btkgh,bksh->bkgts", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32
    ) * (H**-0.5)
    key_pos = jnp.arange(S)[None, None, :]  # [1, 1, S]
    mask = key_pos <= positions[:, :, None]  # [B, T, S]
    if cfg.sliding_window is not None:
        mask &= key_pos > positions[:, :, None] - cfg.sliding_window
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.jnp_dtype)
    # Batch dims (b, k) leading in the output as in the operands, then one transpose: XLA:CPU
    # ran this as a plain batched matmul (SmolLM2 decode, B=16: 0.18 vs 0.34 ms per layer).
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v_cache.astype(cfg.jnp_dtype))
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


class Attention(nn.Module):
    """Self-attention over a KV cache, dense or paged.

    Dense (``page_table`` None): ``k_cache`` / ``v_cache`` are ``[B, K, S, H]``; ``T`` new
    tokens go in at ``start`` (``write_cache``).  Paged (``page_table`` ``[B, M]``): they are
    one layer's page pools ``[K, A, P, H]`` (``sunjax.paged``); one decode token per slot
    (``T = 1``) goes in at ``start`` (``write_token``) and attends through
    ``kernels_pallas.paged_attention`` (the Pallas kernel on GPU/TPU, XLA on CPU).  The
    projections, RoPE and GQA are shared by both.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, k_cache, v_cache, start, page_table=None):
        # x: [B, T, D]; positions: [B, T]; start: [B]; caches and page_table: see above
        cfg = self.cfg
        B, T, _ = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dense = functools.partial(
            Linear, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, use_bias=cfg.qkv_bias
        )
        q = dense(N * H, name="q_proj")(x).reshape(B, T, N, H)
        k = dense(K * H, name="k_proj")(x).reshape(B, T, K, H)
        v = dense(K * H, name="v_proj")(x).reshape(B, T, K, H)
        if cfg.qk_norm:
            norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
            q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
        inv_freq = rope_frequencies(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        if page_table is None:
            k_cache = write_cache(k_cache, k, start)
            v_cache = write_cache(v_cache, v, start)
            out = dense_attention(cfg, q, k_cache, v_cache, positions)
        else:
            if T != 1:
                raise ValueError(f"the paged cache takes one decode token per slot, got T={T}")
            k_cache = write_token(k_cache, k[:, 0], page_table, start)
            v_cache = write_token(v_cache, v[:, 0], page_table, start)
            out = paged_attention(
                q[:, 0].astype(k_cache.dtype),
                k_cache,
                v_cache,
                start + 1,
                page_table,
                sliding_window=cfg.sliding_window,
            )  # [B, N, H]
        out = out.astype(cfg.jnp_dtype).reshape(B, T, N * H)
        out = Linear(
            cfg.d_model,
            use_bias=cfg.o_bias,
            dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_param_dtype,
            name="o_proj",
        )(out)
        return out, k_cache, v_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = functools.partial(
            Linear, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype
        )
        gate = dense(cfg.ffn_dim, name="gate_proj")(x)
        up = dense(cfg.ffn_dim, name="up_proj")(x)
        return dense(cfg.d_model, name="down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, kv, positions, start, page_table=None):
        # x: [B, T, D]; kv: ([B, K, S, H], [B, K, S, H]) or paged ([K, A, P, H], ...);
        # positions: [B, T]; start: [B]; page_table: None or [B, M]
        cfg = self.cfg
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
        h, k_cache, v_cache = Attention(cfg, name="attn")(
            norm(name="input_norm")(x), positions, *kv, start, page_table
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(norm(name="post_attn_norm")(x))
        return x, (k_cache, v_cache)


class Transformer(nn.Module):
    """Token ids + KV cache -> hidden states or logits, and the updated per-layer K/V."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nn.initializers.normal(0.02),
            param_dtype=cfg.jnp_param_dtype,
            dtype=cfg.jnp_dtype,
        )
        if cfg.scan_layers:
            stack = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
            )
            self.layers = stack(cfg)
        else:
            self.blocks = [Block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.jnp_dtype,
                param_dtype=cfg.jnp_param_dtype,
            )

    def __call__(self, tokens, positions, ks, vs, start, logits_at=None, page_table=None):
        # tokens, positions: [B, T]; ks, vs: L x [B, K, S, H] (dense) or L x [K, A, P, H]
        # (paged, with page_table [B, M]); start: [B];
        # logits_at: None (all T positions) or [B] index of the one position to score.
        x = self.embed(tokens)
        if self.cfg.scan_layers:
            # Stacking the per-layer caches copies them once per call: scan is the fast-compiling
            # layout for training, unrolled layers the in-place one for decode.
            x, (ks, vs) = self.layers(
                x, (jnp.stack(ks), jnp.stack(vs)), positions, start, page_table
            )
            ks, vs = tuple(ks), tuple(vs)
        else:
            new_k, new_v = [], []
            for block, k, v in zip(self.blocks, ks, vs, strict=True):
                x, (k, v) = block(x, (k, v), positions, start, page_table)
                new_k.append(k)
                new_v.append(v)
            ks, vs = tuple(new_k), tuple(new_v)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # [B, 1, D]
        x = self.final_norm(x)
        if self.cfg.tie_word_embeddings:
            table = self.embed.embedding
            logits = jnp.einsum(
                "btd,vd->btv", x, table.astype(x.dtype), preferred_element_type=jnp.float32
            )
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        return logits, ks, vs


# -- entry points ---------------------------------------------------------------------------
def init_params(cfg: ModelConfig, key: jax.Array):
    """Random parameters (normal(0.02) weights, unit norms) for ``cfg``."""
    cache = cfg.init_cache(1, 1)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(cfg).init(key, tokens, tokens, cache.k, cache.v, cache.lengths)
    return variables["params"]


def check_tokens(cfg: ModelConfig, tokens, *, lengths=None, cache=None, max_len=None) -> None:
    """Host-side validation of concrete inputs (skipped under tracing). Raises ValueError."""
    if isinstance(tokens, jax.core.Tracer) or isinstance(lengths, jax.core.Tracer):
        return
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {cfg.vocab_size})")
    T = tokens.shape[1]
    if max_len is not None and T > max_len:
        raise ValueError(f"sequence length {T} exceeds max_position_embeddings={max_len}")
    if cache is not None:
        used = np.asarray(cache.lengths)
        if lengths is not None:
            lengths = np.asarray(lengths)
            if lengths.shape != (tokens.shape[0],):
                raise ValueError(f"lengths shape {lengths.shape} != ({tokens.shape[0]},)")
            if lengths.min() < 1 or lengths.max() > T:
                raise ValueError(f"lengths {lengths.tolist()} must lie in [1, {T}]")
        end = int((used + T).max())
        if end > cache.max_len:
            raise ValueError(
                f"prompt of {T} tokens after {int(used.max())} cached does not fit a cache of "
                f"max_len={cache.max_len}"
            )
        end = int((used + (T if lengths is None else lengths)).max())
        if end > cfg.max_position_embeddings:
            raise ValueError(
                f"position {end} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
