"""The accuracy report: base zero-shot, full FT, naive pairing, SUN — same data, steps, seeds.

    python -m train.report --out DIR [--steps 200] [--n-test 100]

* base   — the base model, prefill and decode;
* full   — conventional full fine-tuning, the fine-tuned tree as prefill and decode module;
* naive  — the full-FT tree as prefill module paired with the untouched base as decode module;
* sun    — a prefill module trained through the frozen base decode module (SUN).

Writes ``DIR/report.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from train.data import encode
from train.evaluate import evaluate
from train.pretrain import tiny_base
from train.tasks import TASKS
from train.trainer import TrainConfig, train

COLUMNS = ("base", "full", "naive", "sun")
SHAPES = {"arith": (64, 32), "code": (64, 32), "tool": (96, 48)}  # prompt_len, response_len


def run_report(
    *,
    out: str,
    steps: int,
    n_train: int,
    n_test: int,
    seed: int,
    base=None,
    progress: bool = True,
) -> dict:
    cfg, base_params, tok = base or tiny_base(progress=progress)
    rows = {}
    trained = {}
    for name, task in TASKS.items():
        p_len, r_len = SHAPES[name]
        enc = encode(
            tok,
            task.generate(n_train, split="train", seed=seed, difficulty="tiny"),
            prompt_len=p_len,
            response_len=r_len,
        )
        test = task.generate(n_test, split="test", seed=seed, difficulty="tiny")
        tc = TrainConfig(
            mode="sun",
            steps=steps,
            batch_size=16,
            learning_rate=2e-3,
            warmup_steps=steps // 10,
            seed=seed,
        )
        t0 = time.perf_counter()
        full, _ = train(
            cfg,
            tc.__class__(**{**tc.__dict__, "mode": "full"}),
            base_params,
            enc.batch,
            len(enc.pairs),
            desc=f"{name}: full FT",
            progress=progress,
        )
        sun, _ = train(
            cfg,
            tc,
            base_params,
            enc.batch,
            len(enc.pairs),
            decode_params=base_params,
            desc=f"{name}: SUN",
            progress=progress,
        )
        pairs = {
            "base": (base_params, base_params),
            "full": (full, full),
            "naive": (full, base_params),
            "sun": (sun, base_params),
        }
        rows[name] = {
            col: evaluate(cfg, pre, dec, tok, test, max_new_tokens=r_len)
            for col, (pre, dec) in pairs.items()
        }
        rows[name]["seconds"] = time.perf_counter() - t0
        trained[name] = {"sun": sun, "full": full}
    report = {
        "model": cfg.to_dict(),
        "steps": steps,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "accuracy": {t: {c: rows[t][c]["accuracy"] for c in COLUMNS} for t in rows},
        "samples": {t: {c: rows[t][c]["samples"] for c in COLUMNS} for t in rows},
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    report["_trained"] = trained
    report["_base"] = (cfg, base_params, tok)
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Accuracy (%, greedy, {report['n_test']} test examples per task; {report['steps']} "
        f"steps of fine-tuning, seed {report['seed']})",
        "",
        "| task | base zero-shot | full FT | naive pairing | SUN |",
        "|---|---|---|---|---|",
    ]
    for task, acc in report["accuracy"].items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * acc[c]:.1f}" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sunjax report", description=__doc__)
    p.add_argument("--out", default="out/report")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    report = run_report(
        out=args.out, steps=args.steps, n_train=args.n_train, n_test=args.n_test, seed=args.seed
    )
    print(markdown(report))
    print(f"wrote {args.out}/report.json and report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
