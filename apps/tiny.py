"""A tiny random SUN export with SmolLM2's tokenizer: real text, millisecond decode steps.

The server tests, the soak script and ``sunjax bench http`` serve it on the CPU.
"""

from __future__ import annotations

import zlib

import jax

from sunjax import hub
from sunjax.config import ModelConfig
from sunjax.export import export
from sunjax.model import init_params
from sunjax.quant.rtn import quantize_tree
from sunjax.tokenizer import load_tokenizer

TINY = ModelConfig(
    vocab_size=49152,  # SmolLM2's vocabulary, so its tokenizer and chat template apply
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)


def tiny_export(
    root: str, tasks: tuple[str, ...] = ("math", "code"), seed: int = 0, *, qsun: bool = False
) -> str:
    """Write an export under ``root``: decode tree ``PRNGKey(seed)``, every task module its
    own random init keyed by its name (so a test can tell which tree ran). ``qsun`` quantizes
    the decode tree to int4 (round-to-nearest, groups of 32): a QSUN export. Returns the
    version directory."""
    decode = init_params(TINY, jax.random.PRNGKey(seed))
    if qsun:
        decode = quantize_tree(TINY, decode, bits=4, group_size=32)
    prefill = {t: init_params(TINY, jax.random.PRNGKey(zlib.crc32(t.encode()))) for t in tasks}
    tok = load_tokenizer(hub.resolve("smollm2"))
    return export(root, TINY, decode, prefill, tokenizer_source="smollm2", tokenizer=tok)
