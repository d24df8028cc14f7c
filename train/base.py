"""The base model every task starts from, and its quantized decode tree (QSUN).

``load_base("tiny" | hub name | path)`` loads once per process; ``quantize_base`` quantizes
the shared decode module once, calibrated on general chat text (never task data, since one
decode module serves every task).
"""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp

from sunjax.quant import QUANT_DEFAULTS, normalize_quant, quantize_tree
from sunjax.tokenizer import chat_transcript


@functools.lru_cache(maxsize=2)
def load_base(base: str):
    """``(cfg, params, tokenizer, tokenizer_source)``, loaded once per process."""
    if base == "tiny":
        from train.pretrain import tiny_base

        cfg, params, tok = tiny_base()
        return cfg, params, tok, "tiny"
    from sunjax import hub

    cfg, params, tok = hub.load(base)
    return cfg, params, tok, hub.resolve(base)


def quantize_base(
    cfg, params, tok, quant: dict, *, seed: int = 0, rows: int = 4, row_len: int = 512
):
    """The decode tree quantized as ``quant`` (``QUANT_DEFAULTS`` keys). AWQ calibrates on
    ``rows`` x ``row_len`` tokens of the general pretraining mixture, chat-formatted."""
    from train.pretrain import corpus

    quant = normalize_quant({**QUANT_DEFAULTS, **quant})
    calib = None
    if quant["method"] == "awq":
        ids, n = [], 64
        while len(ids) < rows * row_len:
            text = "".join(
                chat_transcript(tok, list(m) + [{"role": "assistant", "content": r}])
                for m, r in corpus(n, seed + 1)
            )
            ids, n = tok.encode(text, add_special_tokens=False), 2 * n
        calib = jnp.asarray(ids[: rows * row_len]).reshape(rows, row_len)
    return quantize_tree(
        cfg,
        params,
        bits=quant["bits"],
        group_size=quant["group_size"] or 128,
        method=quant["method"],
        calib_tokens=calib,
        scale_dtype=jnp.dtype(quant["scale_dtype"]),
        int8=tuple(quant["int8"]),
    )


@functools.lru_cache(maxsize=2)
def _quantized(base: str, quant_json: str, seed: int):
    cfg, params, tok, _ = load_base(base)
    return quantize_base(cfg, params, tok, json.loads(quant_json), seed=seed)


def quantized_base(base: str, quant: dict, seed: int = 0):
    """``quantize_base`` of ``load_base(base)``, computed once per process."""
    return _quantized(base, json.dumps(normalize_quant(quant), sort_keys=True), seed)
