"""The tiny base model for CPU experiments: a byte-level BPE tokenizer and a small Llama,
both trained here on a general synthetic mixture, reproducibly, and cached.

The mixture teaches the chat format, equations, Python snippets and JSON objects in general,
but never the three tasks' prompt -> answer mappings, so the tasks are learnable by
fine-tuning and not solved zero-shot.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np

from sunjax import hub
from sunjax.configs import load_model_config
from sunjax.model import init_params
from train.tasks import TASKS
from train.trainer import TrainConfig, train

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "apple river stone cloud green small quick house light music paper garden window "
    "table friend happy yellow ocean winter summer market bread coffee silver forest "
    "mountain city train letter bottle orange number answer list value item word count"
).split()
NAMES = "Ana Ben Cal Dia Eli Fay Gus Hal Ivy Jon Kim Lea Max Ned Oli Pam Raj Sue Tom Uma".split()


def _general_pair(rng: random.Random) -> tuple[list[dict], str]:
    """One chat exchange of the general mixture (no task prompt formats)."""
    kind = rng.randrange(6)
    if kind == 0:
        w = rng.sample(WORDS, rng.randint(1, 4))
        return [{"role": "user", "content": f"Repeat: {' '.join(w)}"}], " ".join(w)
    if kind == 1:
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        op = rng.choice("+-")
        c = a + b if op == "+" else a - b
        return [
            {"role": "user", "content": f"Compute {a} {op} {b}."}
        ], f"{a} {op} {b} = {c}\n#### {c}"
    if kind == 2:
        name = rng.choice(WORDS) + "_" + str(rng.randint(0, 99))
        arg = rng.choice(["x", "n", "value", "values", "word", "text"])
        body = rng.choice([f"{arg} * 2", f"{arg} + 1", f"len({arg})", f"{arg}[0]", f"-{arg}"])
        return [{"role": "user", "content": "Show a Python function."}], (
            f"def {name}({arg}):\n    return {body}"
        )
    if kind == 3:
        keys = rng.sample(WORDS, rng.randint(1, 3))
        obj = {
            k: rng.choice([rng.randint(0, 99), rng.choice(WORDS), round(rng.random() * 50, 1)])
            for k in keys
        }
        name = rng.choice(WORDS) + "_" + rng.choice(WORDS)
        return [{"role": "user", "content": f"Make a JSON call to {name}."}], json.dumps(
            {"name": name, "arguments": obj}
        )
    if kind == 4:
        n, w = rng.choice(NAMES), rng.choice(WORDS)
        k = rng.randint(1, 20)
        return [{"role": "user", "content": f"How many {w}s does {n} have?"}], (
            f"{n} has {k} {w}s.\n#### {k}"
        )
    w = rng.sample(WORDS, 3)
    return [{"role": "user", "content": f"Sort: {' '.join(w)}"}], " ".join(sorted(w))


def corpus(n: int, seed: int = 0) -> list[tuple[list[dict], str]]:
    rng = random.Random(seed)
    return [_general_pair(rng) for _ in range(n)]


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE over the general mixture plus task *prompts and targets' text* (the
    tokenizer only sees text statistics, no prompt -> answer pairing is learned from it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m[-1]["content"] + "\n" + r for m, r in corpus(4000, seed)]
    for task in TASKS.values():
        for ex in task.generate(500, split="train", seed=seed, difficulty="tiny"):
            texts.append("\n".join(m["content"] for m in ex.messages) + "\n" + ex.target)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


# Bump when the corpus, the tokenizer recipe or the task generators change.
RECIPE_VERSION = 1


def _fingerprint(model_cfg_path: str, tc: TrainConfig, n_docs: int) -> str:
    with open(model_cfg_path) as f:
        src = f.read()
    return hashlib.sha256(f"{RECIPE_VERSION}{src}{tc}{n_docs}".encode()).hexdigest()[:12]


def tiny_base(
    *,
    model_config: str = "configs/models/tiny.yaml",
    steps: int = 600,
    n_docs: int = 20000,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = True,
):
    """``(cfg, params, tokenizer)`` of the tiny base, trained once and cached by content hash."""
    import orbax.checkpoint as ocp
    from transformers import PreTrainedTokenizerFast

    from train.data import encode_pairs

    tc = TrainConfig(
        mode="full", steps=steps, batch_size=32, learning_rate=3e-3, warmup_steps=30, seed=seed
    )
    root = cache_dir or os.path.join(hub.home(), "tiny-base")
    out = os.path.join(root, _fingerprint(model_config, tc, n_docs))
    done = os.path.join(out, "DONE")
    tok_dir = os.path.join(out, "tokenizer")
    if os.path.exists(done):
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        cfg = load_model_config(model_config, vocab_size=len(tok))
        like = init_params(cfg, _key(seed))
        params = ocp.StandardCheckpointer().restore(os.path.join(out, "params"), like)
        return cfg, params, tok

    tok = train_tokenizer(vocab_size=1024, seed=seed)
    cfg = load_model_config(model_config, vocab_size=len(tok))
    docs = corpus(n_docs, seed)
    enc = encode_pairs(tok, docs, prompt_len=48, response_len=48)
    params, _ = train(
        cfg,
        tc,
        init_params(cfg, _key(seed)),
        enc.batch,
        len(enc.pairs),
        desc="pretrain tiny base",
        progress=progress,
    )
    os.makedirs(out, exist_ok=True)
    tok.save_pretrained(tok_dir)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(os.path.join(out, "params")), params, force=True)
    ckpt.wait_until_finished()
    with open(done, "w") as f:
        f.write(json.dumps({"steps": steps, "n_docs": n_docs, "seed": seed}))
    return cfg, params, tok


def _key(seed: int):
    import jax

    return jax.random.PRNGKey(seed)


def tokens_per_example(tok, n: int = 200) -> dict[str, float]:
    """Mean prompt/target token counts per task (to size prompt_len / response_len)."""
    out = {}
    for name, task in TASKS.items():
        exs = task.generate(n, split="train", seed=0, difficulty="tiny")
        out[name] = float(np.mean([len(tok.encode(e.target)) for e in exs]))
    return out
