"""SUN vs QSUN on one task with many test examples (the report's settings, fewer columns).

    .venv/bin/python scripts/qsun_vs_sun.py --task tool --n-test 400 [--steps 60] [--out F]
        [--quant '{"int8": []}'] [--seed 0]
    .venv/bin/python scripts/qsun_vs_sun.py --task tool --sweep '{"g32": {"group_size": 32}}'

Trains a SUN and a QSUN prefill module on SmolLM2 (as ``sunjax report --model smollm2
--steps 60 --batch-size 8 --lr 1e-4 --n-train 1000 --qsun``) and evaluates SUN, SUN + int4
decode without retraining, and QSUN; prints and writes the accuracies as JSON. ``--quant``
overlays ``QUANT_DEFAULTS`` (``'{"int8": []}'``: all-int4, no int8 linears). ``--seed`` is the
training seed (batch order) of both modules; data, test set and quantization stay fixed.
``--sweep`` (``{name: overlay}``) trains only the SUN module and evaluates it paired with each
quantized decode module (the "SUN + int4 decode" column per quantization), with perplexity on
``sunjax/data/heldout.txt`` (windows of 256 tokens).
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
from train.export import normalize_quant

from sunjax.quant import bytes_report, perplexity, read_text
from train.data import encode
from train.evaluate import evaluate
from train.launch import QUANT_DEFAULTS, load_base, quantize_base
from train.tasks import TASKS
from train.trainer import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="tool", choices=sorted(TASKS))
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", type=json.loads, default={}, help="JSON overlay of QUANT_DEFAULTS")
    p.add_argument("--sweep", type=json.loads, default=None, help="{name: overlay}: SUN+q only")
    args = p.parse_args()
    quant = normalize_quant({**QUANT_DEFAULTS, **args.quant})
    sweep = {k: normalize_quant({**QUANT_DEFAULTS, **v}) for k, v in (args.sweep or {}).items()}
    cfg, base, tok, _ = load_base("smollm2")
    task = TASKS[args.task]
    test = task.generate(args.n_test, split="test", seed=0, difficulty="tiny")
    pairs = task.generate(1000, split="train", seed=0, difficulty="tiny")
    enc = encode(tok, pairs, prompt_len=None, response_len=None)
    tc = TrainConfig(
        mode="sun", steps=args.steps, batch_size=8, learning_rate=1e-4,
        warmup_steps=args.steps // 10, seed=args.seed,
    )  # fmt: skip
    fit = lambda dec, desc: train(cfg, tc, base, enc.batch, len(enc.pairs), decode_params=dec,
                                  desc=desc)[0]  # fmt: skip

    def accuracy(pre, dec) -> float:
        return evaluate(cfg, pre, dec, tok, test, max_new_tokens=enc.response_len)["accuracy"]

    sun = fit(base, "SUN")
    if sweep:
        held = tok.encode(read_text("heldout"), add_special_tokens=False)
        result = {}
        for name, q in {"sun": None, **sweep}.items():  # "sun": the unquantized decode module
            dec = base if q is None else quantize_base(cfg, base, tok, q, seed=0)
            r = result[name] = {"decode_quant": q, "accuracy": accuracy(sun, dec)}
            r["perplexity"] = perplexity(cfg, dec, jnp.asarray(held), 256)
            r["bytes_per_param"] = bytes_report(dec)["linear_bytes_per_param"]
            print(f"{name:16s} acc {100 * r['accuracy']:.2f}  ppl {r['perplexity']:.2f}  "
                  f"linear B/param {r['bytes_per_param']:.3f}", flush=True)  # fmt: skip
    else:
        qdec = quantize_base(cfg, base, tok, quant, seed=0)
        qsun = fit(qdec, "QSUN")
        result = {"decode_quant": quant}
        for col, (pre, dec) in {
            "sun": (sun, base),
            "sun+q": (sun, qdec),
            "qsun": (qsun, qdec),
        }.items():
            result[col] = accuracy(pre, dec)
            print(f"{col:6s} {100 * result[col]:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": args.task, "n_test": len(test), "steps": args.steps,
                       "seed": args.seed, **result}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
