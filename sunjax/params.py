"""Parameter trees: built from Hugging Face-named tensors, converted between layer layouts.

The tree mirrors the linen modules in ``sunjax.model``::

    {"embed": {"embedding": [V, D]},
     "layers_0": {"input_norm": {"scale"}, "attn": {"q_proj": {"kernel": [D, N*H], "bias"?}, ...},
                  "post_attn_norm": {"scale"}, "mlp": {"gate_proj": {"kernel": [D, F]}, ...}},
     ..., "final_norm": {"scale": [D]}, "lm_head": {"kernel": [D, V]}}   # lm_head if untied

With ``cfg.scan_layers`` the per-layer subtrees are stacked on a leading axis under "layers".
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sunjax.config import ModelConfig

# Hugging Face tensor name (without "model.layers.{i}.") -> path in one layer's subtree.
_LAYER_MAP = {
    "input_layernorm.weight": ("input_norm", "scale"),
    "post_attention_layernorm.weight": ("post_attn_norm", "scale"),
    "self_attn.q_proj.weight": ("attn", "q_proj", "kernel"),
    "self_attn.k_proj.weight": ("attn", "k_proj", "kernel"),
    "self_attn.v_proj.weight": ("attn", "v_proj", "kernel"),
    "self_attn.o_proj.weight": ("attn", "o_proj", "kernel"),
    "self_attn.q_proj.bias": ("attn", "q_proj", "bias"),
    "self_attn.k_proj.bias": ("attn", "k_proj", "bias"),
    "self_attn.v_proj.bias": ("attn", "v_proj", "bias"),
    "self_attn.o_proj.bias": ("attn", "o_proj", "bias"),
    "self_attn.q_norm.weight": ("attn", "q_norm", "scale"),
    "self_attn.k_norm.weight": ("attn", "k_norm", "scale"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"),
    "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a Hugging Face checkpoint of ``cfg`` must contain."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    if cfg.qkv_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if cfg.o_bias:
        per_layer.append("self_attn.o_proj.bias")
    if cfg.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for i in range(cfg.n_layers):
        names += [f"model.layers.{i}.{n}" for n in per_layer]
    return names


def from_hf_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], source: str = ""):
    """Build the params tree from Hugging Face-named tensors (torch ``[out, in]`` layout)."""
    expected = expected_hf_names(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(
            f"{source or 'checkpoint'} is missing tensors {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    unexpected = sorted(
        n for n in set(tensors) - set(expected) if not n.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        raise ValueError(
            f"{source or 'checkpoint'} has tensors this config does not use: {unexpected[:5]}"
        )
    dtype = cfg.jnp_param_dtype

    def leaf(name: str, path: tuple[str, ...]):
        t = np.asarray(tensors[name])
        if path[-1] == "kernel":
            t = t.T
        return jnp.asarray(t, dtype=dtype)

    params: dict = {
        "embed": {"embedding": leaf("model.embed_tokens.weight", ("embedding",))},
        "final_norm": {"scale": leaf("model.norm.weight", ("scale",))},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": leaf("lm_head.weight", ("kernel",))}
    for i in range(cfg.n_layers):
        layer: dict = {}
        for hf_name, path in _LAYER_MAP.items():
            full = f"model.layers.{i}.{hf_name}"
            if full in tensors:
                node = layer
                for p in path[:-1]:
                    node = node.setdefault(p, {})
                node[path[-1]] = leaf(full, path)
        params[f"layers_{i}"] = layer
    return stack_layers(cfg, params) if cfg.scan_layers else params


def stack_layers(cfg: ModelConfig, params):
    """Unrolled tree (``layers_0..``) -> scanned tree (``layers`` with a leading L axis)."""
    layers = [params[f"layers_{i}"] for i in range(cfg.n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(cfg: ModelConfig, params):
    """Scanned tree -> unrolled tree; inverse of ``stack_layers``."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
