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

``--columns`` picks columns (only the modules they need are trained), ``--quant`` overlays the
quantization, ``--train-seed`` changes the batch order alone. ``--sweep '{"g32": {"group_size":
32}}' --tasks tool`` trains one SUN module and pairs it with each quantized decode module
(accuracy, held-out perplexity, bytes per parameter).

Writes ``DIR/report.json`` and ``DIR/report.md`` (``DIR/sweep.json`` with ``--sweep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Mapping

import jax.numpy as jnp
from tqdm import tqdm

from sunjax.params import stack_layers, unstack_layers
from sunjax.quant import QUANT_DEFAULTS, bytes_report, normalize_quant, perplexity, read_text
from sunjax.sun import SunParams
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


def _per_task(value: float | Mapping[str, float], task: str) -> float:
    if isinstance(value, Mapping):
        if task not in value:
            raise ValueError(f"learning_rate has no entry for task {task!r}: {dict(value)}")
        return float(value[task])
    return float(value)


def _needs(columns) -> set[str]:
    """Which modules the columns need trained: "full", "sun", "qsun"."""
    need = set()
    for col in columns:
        need |= {"full": {"full"}, "naive": {"full"}, "sun": {"sun"}, "sun+q": {"sun"}}.get(
            col, {"qsun"} if col == "qsun" else set()
        )
    return need


def run_report(
    *,
    out: str,
    steps: int,
    n_train: int,
    n_test: int,
    seed: int,
    base=None,
    qsun: bool = False,
    columns: tuple[str, ...] | None = None,
    quant: dict | None = None,
    train_seed: int | None = None,
    batch_size: int = 16,
    learning_rate: float | Mapping[str, float] = 2e-3,
    difficulty: str = "tiny",
    tasks: tuple[str, ...] | None = None,
    scan_train: bool = False,
    progress: bool = True,
) -> dict:
    """Train what the columns need on each task and evaluate every column on the same test set.

    ``columns`` defaults to ``COLUMNS`` (+ ``QSUN_COLUMNS`` with ``qsun``); only the modules the
    columns need are trained. ``quant`` overlays ``QUANT_DEFAULTS`` for the quantized decode
    module. ``seed`` fixes data, test set and calibration; ``train_seed`` (default ``seed``)
    the batch order of training. ``learning_rate`` may be one value or one per task (every
    column of a task is trained at its task's rate). ``scan_train`` trains in the scanned
    layer layout (faster to compile; the trees come back unrolled)."""
    for t in tasks or ():
        get_task(t)  # ValueError naming an unknown one
    columns = tuple(columns or COLUMNS + (QSUN_COLUMNS if qsun else ()))
    bad = [c for c in columns if c not in TITLES]
    if bad:
        raise ValueError(f"unknown report columns {bad}; choose from {list(TITLES)}")
    quant = normalize_quant({**QUANT_DEFAULTS, **(quant or {})})
    train_seed = seed if train_seed is None else train_seed
    cfg, base_params, tok = base or tiny_base(progress=progress)
    quantized = {"sun+q", "qsun"} & set(columns)
    qdec = quantize_base(cfg, base_params, tok, quant, seed=seed) if quantized else None
    need = _needs(columns)
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
            learning_rate=_per_task(learning_rate, name),
            warmup_steps=steps // 10,
            seed=train_seed,
        )
        t0 = time.perf_counter()

        def fit(mode: str, decode, desc: str, tc=tc, enc=enc, name=name):
            tc = dataclasses.replace(tc, mode=mode)
            if not scan_train:
                return train(
                    cfg, tc, base_params, enc.batch, len(enc.pairs), decode_params=decode,
                    desc=f"{name}: {desc}", progress=progress,
                )[0]  # fmt: skip
            # the scanned layout compiles a train step in about half the time (one layer
            # traced, not L); the trained tree comes back in the caller's layout
            scfg = cfg.replace(scan_layers=True)
            stacked = None if decode is None else stack_layers(cfg, decode)
            params = train(
                scfg, tc, stack_layers(cfg, base_params), enc.batch, len(enc.pairs),
                decode_params=stacked, desc=f"{name}: {desc}", progress=progress,
            )[0]  # fmt: skip
            return unstack_layers(cfg, params)

        full = fit("full", None, "full FT") if "full" in need else None
        sun = fit("sun", base_params, "SUN") if "sun" in need else None
        qs = fit("sun", qdec, "QSUN") if "qsun" in need else None
        pairs = {
            "base": SunParams(base_params, base_params),
            "full": SunParams(full, full),
            "naive": SunParams(full, base_params),
            "sun": SunParams(sun, base_params),
            "sun+q": SunParams(sun, qdec),
            "qsun": SunParams(qs, qdec),
        }
        evals = tqdm(columns, desc=f"{name}: evaluate", disable=not progress, mininterval=1)
        rows[name] = {
            col: evaluate(cfg, *pairs[col], tok, test, max_new_tokens=enc.response_len)
            for col in evals
        }
        rows[name]["seconds"] = time.perf_counter() - t0
        trained[name] = {k: v for k, v in (("sun", sun), ("full", full), ("qsun", qs)) if v}
    report = {
        "model": cfg.to_dict(),
        "steps": steps,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "train_seed": train_seed,
        "batch_size": batch_size,
        "learning_rate": {t: _per_task(learning_rate, t) for t in rows},
        "difficulty": difficulty,
        "decode_quant": quant if quantized else None,
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


def quant_sweep(
    *,
    out: str,
    sweep: dict[str, dict],
    steps: int,
    n_train: int,
    n_test: int,
    seed: int,
    base,
    task: str,
    batch_size: int,
    learning_rate: float,
    train_seed: int | None = None,
    progress: bool = True,
) -> dict:
    """One SUN module paired with several quantized decode modules (``{name: overlay of
    QUANT_DEFAULTS}``; ``"sun"`` is the plain decode module): accuracy, perplexity on
    ``sunjax/data/heldout.txt`` (windows of 256 tokens) and linear bytes per parameter."""
    cfg, base_params, tok = base
    report = run_report(
        out=out, steps=steps, n_train=n_train, n_test=n_test, seed=seed, base=base,
        columns=("sun",), train_seed=train_seed, batch_size=batch_size,
        learning_rate=learning_rate, tasks=(task,), progress=progress,
    )  # fmt: skip
    sun = report["_trained"][task]["sun"]
    test = get_task(task).generate(n_test, split="test", seed=seed)
    length = encode(
        tok, get_task(task).generate(n_train, split="train", seed=seed), prompt_len=None,
        response_len=None,
    ).response_len  # fmt: skip
    held = jnp.asarray(tok.encode(read_text("heldout"), add_special_tokens=False))
    result = {}
    for name, overlay in {"sun": None, **sweep}.items():
        q = None if overlay is None else normalize_quant({**QUANT_DEFAULTS, **overlay})
        dec = base_params if q is None else quantize_base(cfg, base_params, tok, q, seed=seed)
        acc = evaluate(cfg, sun, dec, tok, test, max_new_tokens=length)["accuracy"]
        r = result[name] = {
            "decode_quant": q,
            "accuracy": acc,
            "perplexity": perplexity(cfg, dec, held, 256),
            "bytes_per_param": bytes_report(dec)["linear_bytes_per_param"],
        }
        print(f"{name:16s} acc {100 * acc:.2f}  ppl {r['perplexity']:.2f}  "
              f"linear B/param {r['bytes_per_param']:.3f}", flush=True)  # fmt: skip
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"task": task, "n_test": n_test, "steps": steps, **result}, f, indent=1)
    return result


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
    p.add_argument("--columns", nargs="+", help=f"a subset of {list(TITLES)} (trains only those)")
    p.add_argument("--quant", type=json.loads, default=None, help="JSON overlay of QUANT_DEFAULTS")
    p.add_argument("--train-seed", type=int, default=None, help="batch order (default --seed)")
    p.add_argument(
        "--sweep", type=json.loads, default=None, help="{name: quant overlay}: SUN with each"
    )
    args = p.parse_args(argv)
    base = None if args.model == "tiny" else load_base(args.model)[:3]
    if args.sweep is not None:
        if not args.tasks or len(args.tasks) != 1:
            p.error("--sweep needs exactly one --tasks")
        quant_sweep(
            out=args.out, sweep=args.sweep, steps=args.steps, n_train=args.n_train,
            n_test=args.n_test, seed=args.seed, base=base or tiny_base(), task=args.tasks[0],
            batch_size=args.batch_size, learning_rate=args.lr, train_seed=args.train_seed,
        )  # fmt: skip
        print(f"wrote {args.out}/sweep.json")
        return 0
    report = run_report(
        out=args.out,
        steps=args.steps,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        qsun=args.qsun,
        columns=tuple(args.columns) if args.columns else None,
        quant=args.quant,
        train_seed=args.train_seed,
        base=base,
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
