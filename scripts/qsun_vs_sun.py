"""SUN vs QSUN on one task with many test examples (the report's settings, fewer columns).

    .venv/bin/python scripts/qsun_vs_sun.py --task tool --n-test 400 [--steps 60] [--out F]
        [--quant '{"int8": []}'] [--seed 0]

Trains a SUN and a QSUN prefill module on SmolLM2 (as ``sunjax report --model smollm2
--steps 60 --batch-size 8 --lr 1e-4 --n-train 1000 --qsun``) and evaluates SUN, SUN + int4
decode without retraining, and QSUN; prints and writes the accuracies as JSON. ``--quant``
overlays ``QUANT_DEFAULTS`` (``'{"int8": []}'``: all-int4, no int8 linears). ``--seed`` is the
training seed (batch order) of both modules; data, test set and quantization stay fixed.
"""

from __future__ import annotations

import argparse
import json

from train.data import encode
from train.evaluate import evaluate
from train.export import normalize_quant
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
    args = p.parse_args()
    quant = normalize_quant({**QUANT_DEFAULTS, **args.quant})
    cfg, base, tok, _ = load_base("smollm2")
    task = TASKS[args.task]
    test = task.generate(args.n_test, split="test", seed=0, difficulty="tiny")
    qdec = quantize_base(cfg, base, tok, quant, seed=0)
    pairs = task.generate(1000, split="train", seed=0, difficulty="tiny")
    enc = encode(tok, pairs, prompt_len=None, response_len=None)
    tc = TrainConfig(
        mode="sun", steps=args.steps, batch_size=8, learning_rate=1e-4,
        warmup_steps=args.steps // 10, seed=args.seed,
    )  # fmt: skip
    fit = lambda dec, desc: train(cfg, tc, base, enc.batch, len(enc.pairs), decode_params=dec,
                                  desc=desc)[0]  # fmt: skip
    sun, qsun = fit(base, "SUN"), fit(qdec, "QSUN")
    acc = {}
    for col, (pre, dec) in {"sun": (sun, base), "sun+q": (sun, qdec), "qsun": (qsun, qdec)}.items():
        acc[col] = evaluate(cfg, pre, dec, tok, test, max_new_tokens=enc.response_len)["accuracy"]
        print(f"{col:6s} {100 * acc[col]:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": args.task, "n_test": len(test), "steps": args.steps,
                       "seed": args.seed, "decode_quant": quant, **acc}, f)  # fmt: skip


if __name__ == "__main__":
    main()
