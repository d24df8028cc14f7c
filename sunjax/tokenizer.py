"""Tokenizers from the same local files as the weights (GGUF file or HF directory)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence


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


def chat_prompt(
    tokenizer, messages: str | Sequence[Mapping[str, str]], system: str | None = None
) -> list[int]:
    """Token ids of a chat prompt, formatted by the tokenizer's chat template and ending
    where the assistant's response starts. The one prompt format of sunjax: training pairs,
    evaluation, AWQ calibration and the server all build prompts here.

    ``messages`` is one user turn (a string) or chat messages (``{"role", "content"}``);
    ``system`` prepends a system message.

    >>> ids = chat_prompt(tok, "Name three primary colors.")
    >>> ids = chat_prompt(tok, [{"role": "user", "content": "Hi"}], system="Be brief.")
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = ([{"role": "system", "content": system}] if system else []) + [
        dict(m) for m in messages
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def chat_transcript(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """A whole conversation (assistant turns included, no generation prompt) as text in the
    chat template: general chat-formatted text, e.g. AWQ calibration data."""
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)


def eos_ids(tokenizer) -> Sequence[int]:
    """End-of-sequence ids: the tokenizer's EOS plus a chat end-of-turn token if it has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)
