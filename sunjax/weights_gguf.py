"""GGUF files (llama.cpp): header -> ModelConfig, tensors dequantized to float32.

llama.cpp's converter permutes the rows of the q and k projections of Llama models to
interleave rotary pairs; ``_unpermute`` restores the Hugging Face (rotate-half) order.
"""

from __future__ import annotations

import os

import numpy as np

from sunjax.config import ModelConfig
from sunjax.params import from_hf_tensors

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated or foreign files
        raise ValueError(f"cannot read GGUF file {path!r}: {e!r}") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file lacks the metadata key {key!r}")
        return default
    return field.contents()


def config_from_gguf(reader, **overrides) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF files with rope_freqs (scaled RoPE) are not supported")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    d_model = int(_field(reader, "llama.embedding_length"))
    vocab = reader.fields.get("llama.vocab_size")
    vocab = int(vocab.contents()) if vocab else len(reader.fields["tokenizer.ggml.tokens"].data)
    kwargs = dict(
        model_type="llama",
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", d_model // n_heads)),
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, "llama.context_length")),
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation of a ``[n_heads * H, D]`` weight."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", **cfg_overrides):
    """Load ``(cfg, params)`` from a GGUF file, dequantizing every tensor to float32 first."""
    import gguf

    path = os.fspath(path)
    reader = _reader(path)
    cfg = config_from_gguf(reader, param_dtype=dtype, dtype=dtype, **cfg_overrides)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            parts = t.name.split(".", 2)
            if parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                raise ValueError(f"GGUF tensor {t.name!r} in {path!r} is not understood")
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor type {t.tensor_type.name} is not supported") from e
        w = np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg.n_kv_heads)
        tensors[name] = w
    return cfg, from_hf_tensors(cfg, tensors, source=path)
