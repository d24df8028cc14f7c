"""Evaluation through the real SUN path: a task's prefill module, the shared decode module,
greedy ``sunjax.generate``, and the task's programmatic checker.

``evaluate`` scores whole completions; ``token_metrics`` splits the teacher-forced loss into the
first response token (scored by the prefill module) and the later ones (scored by the decode
module over the prefill module's KV), to see where a pairing loses accuracy.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from sunjax.config import ModelConfig
from sunjax.generate import generate
from sunjax.sun import sun_loss
from sunjax.tokenizer import chat_prompt, eos_ids
from train.data import encode
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
    """Exact-match / pass@1 accuracy (greedy) of the pairing on ``examples``.

    Returns ``accuracy``, ``n``, ``correct`` (one bool per example, in order), ``completions``
    (the decoded text of each, in order), ``first_token``
    (the fraction whose first generated token is the first token of the target, the token the
    prefill module picks) and three ``samples``."""
    prompts = [chat_prompt(tokenizer, ex.messages) for ex in examples]
    completions: list[str] = []
    first_ok: list[bool] = []
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
        for ex, t in zip(examples[i : i + batch_size], out.tokens, strict=True):
            first_ok.append(
                bool(t) and t[0] == tokenizer.encode(ex.target, add_special_tokens=False)[0]
            )
    correct = np.array([check(ex, c) for ex, c in zip(examples, completions, strict=True)])
    return {
        "accuracy": float(correct.mean()),
        "n": len(examples),
        "correct": [bool(c) for c in correct],
        "completions": completions,
        "first_token": float(np.mean(first_ok)),
        "samples": [
            {"prompt": ex.user_text, "completion": c, "correct": bool(ok)}
            for ex, c, ok in list(zip(examples, completions, correct, strict=True))[:3]
        ],
    }


@functools.partial(jax.jit, static_argnums=0)
def _metrics(cfg, prefill_params, decode_params, batch):
    return sun_loss(cfg, prefill_params, decode_params, batch)[1]


def token_metrics(
    cfg: ModelConfig,
    prefill_params,
    decode_params,
    tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 16,
) -> dict:
    """Teacher-forced NLL and argmax accuracy of the targets of ``examples`` under the pairing,
    for the first response token and for the later ones: ``first_nll``, ``rest_nll``,
    ``first_acc``, ``rest_acc`` (averages over tokens), as in the training history."""
    enc = encode(tokenizer, examples, prompt_len=None, response_len=None)
    sums = {"first_nll": 0.0, "rest_nll": 0.0, "first_acc": 0.0, "rest_acc": 0.0}
    n_first = n_rest = 0.0
    for i in range(0, len(enc.pairs), batch_size):
        idx = np.arange(i, min(i + batch_size, len(enc.pairs)))
        m = {k: float(v) for k, v in _metrics(cfg, prefill_params, decode_params,
                                               enc.batch(idx)).items()}  # fmt: skip
        first, rest = len(idx), m["tokens"] - len(idx)
        for k in sums:
            sums[k] += m[k] * (first if k.startswith("first") else rest)
        n_first, n_rest = n_first + first, n_rest + rest
    return {k: v / max(n_first if k.startswith("first") else n_rest, 1.0) for k, v in sums.items()}
