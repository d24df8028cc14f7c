"""Evaluation through the real SUN path: a task's prefill module, the shared decode module,
greedy ``sunjax.generate``, and the task's programmatic checker."""

from __future__ import annotations

import numpy as np

from sunjax.config import ModelConfig
from sunjax.generate import generate
from sunjax.tokenizer import chat_prompt, eos_ids
from train.tasks import Example, check


def evaluate(
    cfg: ModelConfig,
    prefill_params,
    decode_params,
    tokenizer,
    examples: list[Example],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
) -> dict:
    """Exact-match / pass@1 accuracy (greedy) of the pairing on ``examples``."""
    prompts = [chat_prompt(tokenizer, ex.messages) for ex in examples]
    completions: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        out = generate(
            cfg,
            prefill_params,
            chunk,
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids(tokenizer),
            decode_params=decode_params,
        )
        completions += [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    correct = np.array([check(ex, c) for ex, c in zip(examples, completions, strict=True)])
    return {
        "accuracy": float(correct.mean()),
        "n": len(examples),
        "samples": [
            {"prompt": ex.user_text, "completion": c, "correct": bool(ok)}
            for ex, c, ok in list(zip(examples, completions, correct, strict=True))[:3]
        ],
    }
