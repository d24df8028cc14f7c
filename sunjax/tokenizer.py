"""Tokenizers from the same local files as the weights (GGUF file or HF directory)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """A transformers tokenizer (with its chat template) for a GGUF file or HF directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path)
        )
    return AutoTokenizer.from_pretrained(path)


def chat_prompt(tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat, formatted by the tokenizer's chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def eos_ids(tokenizer) -> Sequence[int]:
    """End-of-sequence ids: the tokenizer's EOS plus a chat end-of-turn token if it has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)
