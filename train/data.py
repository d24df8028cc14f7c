"""Task examples -> token ids -> fixed-shape ``Batch`` es for the SUN loss."""

from __future__ import annotations

import dataclasses

import numpy as np

from sunjax.sun import Batch, make_batch
from sunjax.tokenizer import chat_prompt, eos_ids
from train.tasks import Example


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Examples as (prompt ids, response ids + EOS) pairs, with the shapes they pad to."""

    pairs: list[tuple[list[int], list[int]]]
    prompt_len: int
    response_len: int

    def batch(self, indices: np.ndarray) -> Batch:
        return make_batch([self.pairs[i] for i in indices], self.prompt_len, self.response_len)


def _fit(n: int) -> int:
    """``n`` rounded up to a multiple of 16 (fewer distinct compiled shapes)."""
    return -(-n // 16) * 16


def encode_pairs(
    tokenizer, pairs: list[tuple], *, prompt_len: int | None, response_len: int | None
) -> Encoded:
    """Tokenize ``(chat messages, target text)`` pairs: prompt = ``sunjax.tokenizer.chat_prompt``
    (the one prompt format, shared with evaluation and serving), response = target + EOS.
    Examples that do not fit raise ValueError; a length of None means the longest example's,
    rounded up to a multiple of 16."""
    eos = eos_ids(tokenizer)[0]
    out = []
    for messages, target in pairs:
        prompt = chat_prompt(tokenizer, messages)
        out.append((prompt, tokenizer.encode(target, add_special_tokens=False) + [eos]))
    longest_p = max(len(p) for p, _ in out)
    longest_r = max(len(r) for _, r in out)
    prompt_len = _fit(longest_p) if prompt_len is None else prompt_len
    response_len = _fit(longest_r) if response_len is None else response_len
    if longest_p > prompt_len or longest_r > response_len:
        raise ValueError(
            f"examples need prompt_len >= {longest_p} and response_len >= {longest_r}, "
            f"got {prompt_len=} {response_len=}"
        )
    return Encoded(pairs=out, prompt_len=prompt_len, response_len=response_len)


def encode(
    tokenizer, examples: list[Example], *, prompt_len: int | None, response_len: int | None
) -> Encoded:
    """``encode_pairs`` over task examples."""
    return encode_pairs(
        tokenizer,
        [(ex.messages, ex.target) for ex in examples],
        prompt_len=prompt_len,
        response_len=response_len,
    )
