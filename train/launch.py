"""``sunjax train --config configs/train/<run>.yaml``: fine-tune one task's module.

Thin: reads a ``RunConfig`` (YAML overlay), loads the base, calls ``train.trainer.train``
(Orbax checkpoints every ``checkpoint_every`` steps; rerunning resumes), evaluates through the
SUN path, and writes ``<out>/params`` (Orbax) and ``<out>/run.json``.

QSUN: ``decode_quant: {bits: 4, group_size: 64, method: awq, int8: [down_proj, v_proj]}`` (keys
and defaults: ``QUANT_DEFAULTS``; with ``mode: sun``) trains the prefill module through the base
quantized once by ``quantize_base``; that decode tree is saved as ``<out>/decode`` and
``sunjax export`` ships it as the shared decode module.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os

import jax
import orbax.checkpoint as ocp

from sunjax.configs import overlay, read_yaml
from sunjax.sun import fingerprint
from train.data import encode
from train.evaluate import evaluate
from train.export import abstract_decode, normalize_quant
from train.tasks import get_task
from train.trainer import TrainConfig, train

# int4 AWQ, but v_proj and down_proj int8 (as llama.cpp's Q4_K_M keeps attn_v / ffn_down at
# higher precision): on SmolLM2's tool task (400 test examples, one SUN module) the decode module
# at all-int4 cost 3.5 points, with these two int8 (28% of the linear weights, 0.73 vs 0.63
# B/param) 1.5; group 128 cost 13 (reports/qsun/README.md).
QUANT_DEFAULTS = {
    "bits": 4,
    "group_size": 64,
    "method": "awq",
    "scale_dtype": "float32",
    "int8": ["down_proj", "v_proj"],
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    task: str
    base: str = "tiny"  # "tiny" (pretrained here, cached) or a model name / path for sunjax.hub
    difficulty: str = "tiny"
    n_train: int = 2000
    n_eval: int = 100
    prompt_len: int = 96
    response_len: int = 48
    out: str = "runs/run"
    train: TrainConfig = TrainConfig()
    # QSUN: how the shared decode module is quantized (keys of QUANT_DEFAULTS); None = plain
    decode_quant: dict | None = None

    def __post_init__(self):
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", overlay(TrainConfig, self.train))
        get_task(self.task)
        if self.decode_quant is not None:
            if not isinstance(self.decode_quant, dict):
                raise ValueError(
                    f"decode_quant must be a mapping or null, got {self.decode_quant!r}"
                )
            if self.train.mode != "sun":
                raise ValueError(
                    f"decode_quant needs train.mode 'sun' (QSUN), got mode {self.train.mode!r}: "
                    "full fine-tuning has no separate decode module to quantize"
                )
            object.__setattr__(
                self, "decode_quant", normalize_quant({**QUANT_DEFAULTS, **self.decode_quant})
            )


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
    ``rows`` x ``row_len`` tokens of the general pretraining mixture, chat-formatted: no task
    data, since one decode module serves every task."""
    import jax.numpy as jnp

    from sunjax.quant import quantize_tree
    from train.pretrain import corpus

    quant = normalize_quant({**QUANT_DEFAULTS, **quant})
    calib = None
    if quant["method"] == "awq":
        ids, n = [], 64
        while len(ids) < rows * row_len:
            text = "".join(
                tok.apply_chat_template(
                    list(m) + [{"role": "assistant", "content": r}], tokenize=False
                )
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
def _quantized_base(base: str, quant_json: str, seed: int):
    cfg, params, tok, _ = load_base(base)
    return quantize_base(cfg, params, tok, json.loads(quant_json), seed=seed)


def run(rc: RunConfig, *, progress: bool = True) -> dict:
    cfg, base, tok, tok_source = load_base(rc.base)
    sun = rc.train.mode == "sun"
    if rc.decode_quant is None:
        decode = base
    else:
        decode = _quantized_base(
            rc.base, json.dumps(rc.decode_quant, sort_keys=True), rc.train.seed
        )
    task = get_task(rc.task)
    enc = encode(
        tok,
        task.generate(rc.n_train, split="train", seed=rc.train.seed, difficulty=rc.difficulty),
        prompt_len=rc.prompt_len,
        response_len=rc.response_len,
    )
    params, history = train(
        cfg,
        rc.train,
        base,
        enc.batch,
        len(enc.pairs),
        decode_params=decode if sun else None,
        checkpoint_dir=os.path.join(rc.out, "checkpoints") if rc.train.checkpoint_every else None,
        desc=f"{rc.task} ({rc.train.mode})",
        progress=progress,
    )
    decode = decode if sun else params
    test = task.generate(rc.n_eval, split="test", seed=rc.train.seed, difficulty=rc.difficulty)
    result = evaluate(cfg, params, decode, tok, test, max_new_tokens=rc.response_len)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(os.path.join(rc.out, "params")), params, force=True)
    if rc.decode_quant is not None:
        ckpt.save(os.path.abspath(os.path.join(rc.out, "decode")), decode, force=True)
    ckpt.wait_until_finished()
    meta = {
        "task": rc.task,
        "mode": rc.train.mode,
        "base": rc.base,
        "tokenizer_source": tok_source,
        "decode_fingerprint": fingerprint(decode),
        "decode_quant": rc.decode_quant,
        "accuracy": result["accuracy"],
        "final_loss": history[-1]["loss"] if history else None,
        "config": dataclasses.asdict(rc),
    }
    with open(os.path.join(rc.out, "run.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def load_run(out: str) -> dict:
    """A finished run: ``{"cfg", "params", "decode", "tokenizer", "meta"}``."""
    with open(os.path.join(out, "run.json")) as f:
        meta = json.load(f)
    cfg, base, tok, _ = load_base(meta["base"])
    abstract = jax.eval_shape(lambda: base)
    params = ocp.StandardCheckpointer().restore(
        os.path.abspath(os.path.join(out, "params")), abstract
    )
    if meta.get("decode_quant"):  # QSUN: the quantized decode tree the run trained through
        decode = ocp.StandardCheckpointer().restore(
            os.path.abspath(os.path.join(out, "decode")), abstract_decode(cfg, meta["decode_quant"])
        )
    else:
        decode = base if meta["mode"] == "sun" else params
    if fingerprint(decode) != meta["decode_fingerprint"]:
        raise ValueError(
            f"run {out!r} was trained against decode tree {meta['decode_fingerprint'][:12]}, "
            f"but that decode tree now loads as {fingerprint(decode)[:12]}"
        )
    return {"cfg": cfg, "params": params, "decode": decode, "tokenizer": tok, "meta": meta}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sunjax train", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None, help="override the run directory")
    args = p.parse_args(argv)
    data = read_yaml(args.config)
    if args.out:
        data["out"] = args.out
    meta = run(overlay(RunConfig, data))
    print(json.dumps({k: meta[k] for k in ("task", "mode", "accuracy", "final_loss")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
