"""The accuracy report: base zero-shot, full FT, naive pairing, SUN — same data, steps, seeds.

    python -m train.report --out DIR [--steps 200] [--n-test 100]

* base   — the base model, prefill and decode;
* full   — conventional full fine-tuning, the fine-tuned tree as prefill and decode module;
* naive  — the full-FT tree as prefill module paired with the untouched base as decode module;
* sun    — a prefill module trained through the frozen base decode module (SUN).

With ``--qsun`` two columns more (QSUN: the decode module is the base quantized as
``sunjax.quant.QUANT_DEFAULTS`` says: AWQ int4, group 64, with v_proj and down_proj int8):

* sun+q  — the SUN prefill module paired with the quantized decode module, no retraining;
* qsun   — a prefill module trained through the quantized decode module.

Writes ``DIR/report.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from sunjax.quant import QUANT_DEFAULTS
from train.base import load_base, quantize_base
from train.data import encode
from train.evaluate import evaluate
from train.pretrain import tiny_base
from train.tasks import TASKS, get_task
from train.trainer import TrainConfig, train

COLUMNS = ("base", "full", "naive", "sun")
QSUN_COLUMNS = ("sun+q", "qsun")
TITLES = {
    "base": "base zero-shot",
    "full": "full FT",
    "naive": "naive pairing",
    "sun": "SUN",
    "sun+q": "SUN + int4 decode (no retraining)",
    "qsun": "QSUN",
}


def run_report(
    *,
    out: str,
    steps: int,
    n_train: int,
    n_test: int,
    seed: int,
    base=None,
    qsun: bool = False,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    difficulty: str = "tiny",
    tasks: tuple[str, ...] | None = None,
    progress: bool = True,
) -> dict:
    for t in tasks or ():
        get_task(t)  # ValueError naming an unknown one
    cfg, base_params, tok = base or tiny_base(progress=progress)
    columns = COLUMNS + (QSUN_COLUMNS if qsun else ())
    qdec = quantize_base(cfg, base_params, tok, QUANT_DEFAULTS, seed=seed) if qsun else None
    rows = {}
    trained = {}
    for name, task in TASKS.items():
        if tasks and name not in tasks:
            continue
        enc = encode(
            tok,
            task.generate(n_train, split="train", seed=seed, difficulty=difficulty),
            prompt_len=None,
            response_len=None,
        )
        test = task.generate(n_test, split="test", seed=seed, difficulty=difficulty)
        tc = TrainConfig(
            mode="sun",
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=steps // 10,
            seed=seed,
        )
        t0 = time.perf_counter()
        full, _ = train(
            cfg,
            dataclasses.replace(tc, mode="full"),
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
        if qsun:
            qs, _ = train(
                cfg,
                tc,
                base_params,
                enc.batch,
                len(enc.pairs),
                decode_params=qdec,
                desc=f"{name}: QSUN",
                progress=progress,
            )
            pairs.update({"sun+q": (sun, qdec), "qsun": (qs, qdec)})
        rows[name] = {
            col: evaluate(cfg, pre, dec, tok, test, max_new_tokens=enc.response_len)
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
        "columns": list(columns),
        "accuracy": {t: {c: rows[t][c]["accuracy"] for c in columns} for t in rows},
        "samples": {t: {c: rows[t][c]["samples"] for c in columns} for t in rows},
        "seconds": {t: rows[t]["seconds"] for t in rows},
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
        "| task | " + " | ".join(TITLES[c] for c in report["columns"]) + " |",
        "|---" * (len(report["columns"]) + 1) + "|",
    ]
    for task, acc in report["accuracy"].items():
        cells = " | ".join(f"{100 * acc[c]:.1f}" for c in report["columns"])
        lines.append(f"| {task} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sunjax report", description=__doc__)
    p.add_argument("--out", default="out/report")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qsun", action="store_true", help="add the QSUN columns")
    p.add_argument("--model", default="tiny", help="'tiny' (pretrained here) or 'smollm2'")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--difficulty", default="tiny")
    p.add_argument("--tasks", nargs="+", help=f"a subset of {sorted(TASKS)} (default: all)")
    args = p.parse_args(argv)
    report = run_report(
        out=args.out,
        steps=args.steps,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        qsun=args.qsun,
        base=None if args.model == "tiny" else load_base(args.model)[:3],
        batch_size=args.batch_size,
        learning_rate=args.lr,
        difficulty=args.difficulty,
        tasks=tuple(args.tasks) if args.tasks else None,
    )
    print(markdown(report))
    print(f"wrote {args.out}/report.json and report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
