"""``sunjax train --config configs/train/<run>.yaml``: fine-tune one task's module.

Thin: reads a ``RunConfig`` (YAML overlay), loads the base, calls ``train.trainer.train``
(Orbax checkpoints every ``checkpoint_every`` steps; rerunning resumes), evaluates through the
SUN path, and writes ``<out>/params`` (Orbax) and ``<out>/run.json``.
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
from train.tasks import get_task
from train.trainer import TrainConfig, train


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

    def __post_init__(self):
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", overlay(TrainConfig, self.train))
        get_task(self.task)


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


def run(rc: RunConfig, *, progress: bool = True) -> dict:
    cfg, base, tok, tok_source = load_base(rc.base)
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
        decode_params=base if rc.train.mode == "sun" else None,
        checkpoint_dir=os.path.join(rc.out, "checkpoints") if rc.train.checkpoint_every else None,
        desc=f"{rc.task} ({rc.train.mode})",
        progress=progress,
    )
    decode = base if rc.train.mode == "sun" else params
    test = task.generate(rc.n_eval, split="test", seed=rc.train.seed, difficulty=rc.difficulty)
    result = evaluate(cfg, params, decode, tok, test, max_new_tokens=rc.response_len)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(os.path.join(rc.out, "params")), params, force=True)
    ckpt.wait_until_finished()
    meta = {
        "task": rc.task,
        "mode": rc.train.mode,
        "base": rc.base,
        "tokenizer_source": tok_source,
        "decode_fingerprint": fingerprint(decode),
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
    decode = base if meta["mode"] == "sun" else params
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
