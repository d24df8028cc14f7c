"""``sunjax train --config configs/train/<run>.yaml``: fine-tune one task's module.

Thin: reads a ``RunConfig`` (YAML overlay), loads the base, calls ``train.trainer.train``
(Orbax checkpoints every ``checkpoint_every`` steps; rerunning resumes), evaluates through the
SUN path, and writes ``<out>/params`` (Orbax) and ``<out>/run.json``.

QSUN: ``decode_quant: {bits: 4, group_size: 64, method: awq, int8: [down_proj, v_proj]}`` (keys
and defaults: ``sunjax.quant.QUANT_DEFAULTS``; with ``mode: sun``) trains the prefill module
through the base quantized once by ``train.base.quantize_base``; that decode tree is saved as
``<out>/decode`` and ``sunjax export`` ships it as the shared decode module.

``sunjax export --runs DIR... --out ROOT`` (``export_main``) writes finished runs as one
export (``sunjax.export``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from sunjax.configs import overlay, read_yaml
from sunjax.export import export, fingerprint
from sunjax.quant import QUANT_DEFAULTS, abstract_decode, normalize_quant
from train.base import load_base, quantized_base
from train.data import encode
from train.evaluate import evaluate
from train.tasks import get_task
from train.trainer import TrainConfig, eval_step, train


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


def run(rc: RunConfig, *, progress: bool = True) -> dict:
    cfg, base, tok, tok_source = load_base(rc.base)
    sun = rc.train.mode == "sun"
    decode = base
    if rc.decode_quant is not None:
        decode = quantized_base(rc.base, rc.decode_quant, rc.train.seed)
    task = get_task(rc.task)
    enc = encode(
        tok,
        task.generate(rc.n_train, split="train", seed=rc.train.seed, difficulty=rc.difficulty),
        prompt_len=rc.prompt_len,
        response_len=rc.response_len,
    )
    val = encode(
        tok,
        task.generate(rc.n_eval, split="val", seed=rc.train.seed, difficulty=rc.difficulty),
        prompt_len=rc.prompt_len,
        response_len=rc.response_len,
    )
    val_batch = val.batch(np.arange(len(val.pairs)))

    def eval_fn(params, step: int) -> dict:  # every eval_every steps: loss on the val split
        metrics = eval_step(cfg, rc.train, params, decode, val_batch)
        return {k: float(v) for k, v in metrics.items()}

    params, history = train(
        cfg,
        rc.train,
        base,
        enc.batch,
        len(enc.pairs),
        decode_params=decode if sun else None,
        eval_fn=eval_fn if rc.train.eval_every else None,
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
        "params_fingerprint": fingerprint(params),
        "decode_quant": rc.decode_quant,
        "accuracy": result["accuracy"],
        "final_loss": history[-1]["loss"] if history else None,
        "eval_history": [
            {k: v for k, v in h.items() if k == "step" or k.startswith("eval_")}
            for h in history
            if "eval_loss" in h
        ],
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
    if fingerprint(params) != meta["params_fingerprint"]:
        raise ValueError(
            f"run {out!r}: the saved module does not match run.json's params_fingerprint "
            f"{meta['params_fingerprint'][:12]}: the checkpoint is corrupted or replaced"
        )
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


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sunjax export", description="export finished runs: one decode tree + task modules"
    )
    p.add_argument("--runs", nargs="+", required=True, help="run directories of `sunjax train`")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = [load_run(r) for r in args.runs]
    decode_fp = {r["meta"]["decode_fingerprint"] for r in runs}
    if len(decode_fp) != 1:
        raise SystemExit(f"runs were trained against different decode trees: {decode_fp}")
    first = runs[0]
    vdir = export(
        args.out,
        first["cfg"],
        first["decode"],
        {r["meta"]["task"]: r["params"] for r in runs},
        tokenizer_source=first["meta"]["tokenizer_source"],
        tokenizer=first["tokenizer"],
        metadata={r["meta"]["task"]: r["meta"] for r in runs},
    )
    print(f"exported {len(runs)} task(s) to {vdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
