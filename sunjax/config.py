"""Model configuration: one frozen dataclass for the Llama / Mistral / Qwen2 / Qwen3 family.

Built from a Hugging Face ``config.json`` (``ModelConfig.from_hf``), from a GGUF header
(``sunjax.weights_gguf``) or from a YAML overlay in ``configs/models``. Anything the model code
does not implement raises ``ValueError`` naming the option: never a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture and dtype policy of a decoder-only Transformer.

    ``param_dtype`` is what parameters are stored in, ``dtype`` what matmuls compute in;
    norms, softmax and logits are always float32. ``scan_layers`` selects ``lax.scan`` over
    stacked layer parameters (fast to compile) or unrolled layers (fast decode on GPU).
    """

    model_type: str = "llama"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = False

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; "
                f"supported: {SUPPORTED_MODEL_TYPES}"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a float dtype name")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    # -- derived ---------------------------------------------------------------------------
    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}")
        return cls(**d)

    def init_cache(self, batch: int, max_len: int, dtype: str | None = None):
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions."""
        from sunjax.cache import KVCache

        return KVCache.create(self, batch, max_len, dtype or self.dtype)

    def init_paged_cache(
        self,
        batch: int,
        max_len: int,
        *,
        num_pages: int,
        page_size: int = 16,
        dtype: str | None = None,
    ):
        """An empty paged KV cache: ``batch`` slots of up to ``max_len`` positions sharing a
        pool of ``num_pages`` pages of ``page_size`` tokens (page 0 reserved as the null page)."""
        from sunjax.paged import PagedKVCache

        return PagedKVCache.create(
            self,
            batch,
            max_len,
            num_pages=num_pages,
            page_size=page_size,
            dtype=dtype or self.dtype,
        )

    # -- Hugging Face ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike, **overrides: Any) -> ModelConfig:
        """From a Hugging Face ``config.json`` (dict, file, or model directory)."""
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"config file {path!r} does not exist")
            with open(path) as f:
                try:
                    hf = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"config file {path!r} is not valid JSON: {e}") from e
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        prf = hf.get("partial_rotary_factor", 1.0)
        if prf not in (None, 1.0):
            raise ValueError(f"partial_rotary_factor={prf} is not supported")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported for qwen2/qwen3")

        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        rope_theta, rope_scaling = _hf_rope(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window") if model_type == "mistral" else None
        kwargs = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            ffn_dim=hf["intermediate_size"],
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def _hf_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE settings from transformers v4 (rope_theta, rope_scaling) or v5 (rope_parameters)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3')")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
