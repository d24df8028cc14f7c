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
import glob
import json
import os
import time
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sunjax.params import stack_layers, unstack_layers
from sunjax.quant import QUANT_DEFAULTS, bytes_report, normalize_quant, perplexity, read_text
from sunjax.sun import SunParams
from train import stats
from train.base import load_base, quantize_base
from train.data import encode
from train.evaluate import evaluate, token_metrics
from train.pretrain import tiny_base
from train.tasks import TASKS, Example, get_task
from train.tasks.arith import ERROR_KINDS, equation_accuracy, error_kind
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


# The trained module each column's prefill side is ("base": none).
MODULE_OF = {"base": None, "full": "full", "naive": "full", "sun": "sun", "sun+q": "sun",
             "qsun": "qsun"}  # fmt: skip


def pairing(column: str, module, base_params, quantized_decode) -> SunParams:
    """The (prefill, decode) trees of a report column, given the column's trained module (see
    ``MODULE_OF``), the base tree and the quantized decode tree."""
    if column not in TITLES:
        raise ValueError(f"unknown report column {column!r}; choose from {list(TITLES)}")
    decode = {"base": base_params, "full": module, "naive": base_params, "sun": base_params,
              "sun+q": quantized_decode, "qsun": quantized_decode}[column]  # fmt: skip
    return SunParams(base_params if column == "base" else module, decode)


SCRATCH = " _"  # one token in the SmolLM2 and Llama-3 vocabularies


def with_scratch(examples: list[Example], k: int) -> list[Example]:
    """``examples`` with ``k`` filler tokens (``SCRATCH``) after the last message's text."""
    if k < 0:
        raise ValueError(f"scratch_tokens must be >= 0, got {k}")
    if k == 0:
        return examples
    out = []
    for ex in examples:
        *head, last = ex.messages
        last = {**last, "content": last["content"] + "\n" + SCRATCH * k}
        out.append(dataclasses.replace(ex, messages=(*head, last)))
    return out


def param_change(base, trained) -> dict[str, float]:
    """Relative change ``|trained - base| / |base|`` (Frobenius norms over the group) of each
    parameter group: a layer's ``attn`` and ``mlp`` (and norms), the embedding, the head:
    which parts of the model fine-tuning moved, and how far."""
    sums: dict[str, list[float]] = {}
    flat_base = dict(jax.tree_util.tree_flatten_with_path(base)[0])
    for path, new in jax.tree_util.tree_flatten_with_path(trained)[0]:
        keys = [getattr(k, "key", str(k)) for k in path]
        group = ".".join(keys[:2]) if keys[0].startswith("layers_") else keys[0]
        old = np.asarray(flat_base[path], np.float64)
        acc = sums.setdefault(group, [0.0, 0.0])
        acc[0] += float(np.sum((np.asarray(new, np.float64) - old) ** 2))
        acc[1] += float(np.sum(old**2))
    return {g: float(np.sqrt(d / max(b, 1e-30))) for g, (d, b) in sums.items()}


def _save_progress(out: str, results: dict) -> None:
    """The points evaluated so far (``DIR/progress.json``), so an interrupted run on a slow
    machine still leaves its curve behind."""
    os.makedirs(out, exist_ok=True)
    keep = ("accuracy", "first_token", "first_acc", "rest_acc", "first_nll", "rest_nll")
    point = lambda r: {k: r[k] for k in keep if k in r}  # token metrics may be off
    done = {
        t: {c: {s: point(r) for s, r in cs.items()} for c, cs in by.items()}
        for t, by in results.items()
    }
    with open(os.path.join(out, "progress.json"), "w") as f:
        json.dump(done, f, indent=1)


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
    token_stats: bool = True,
    eval_at: tuple[int, ...] = (),
    scratch_tokens: int = 0,
    progress: bool = True,
) -> dict:
    """Train what the columns need on each task and evaluate every column on the same test set.

    ``columns`` defaults to ``COLUMNS`` (+ ``QSUN_COLUMNS`` with ``qsun``); only the modules the
    columns need are trained. ``quant`` overlays ``QUANT_DEFAULTS`` for the quantized decode
    module. ``seed`` fixes data, test set and calibration; ``train_seed`` (default ``seed``)
    the batch order of training. ``learning_rate`` may be one value or one per task (every
    column of a task is trained at its task's rate). ``scan_train`` trains in the scanned
    layer layout (faster to compile; the trees come back unrolled). ``token_stats=False``
    skips the teacher-forced token metrics (a pass per evaluation; the demo's time budget).
    ``scratch_tokens`` appends that many filler tokens to every prompt, train and test
    (``with_scratch``): prompt positions whose KV the prefill module can learn to fill, i.e. more
    prefill-side capacity for the frozen decode module to read.

    Every trained column is evaluated after each step in ``eval_at`` and after the last step,
    during the one training run (a learning curve, not a run per step count):
    ``accuracy_curve[task][column][step]`` (the base column at step 0), ``correct_curve`` the
    per-example results behind it, and ``token_curve`` the teacher-forced first-token /
    later-token NLL and accuracy on the test targets (``train.evaluate.token_metrics``).
    ``accuracy[task][column]`` and ``correct`` are the last step's. ``history[task][module]``
    is the training loss per step (with ``first_nll``, ``rest_nll``, ``first_acc``,
    ``rest_acc``)."""
    for t in tasks or ():
        get_task(t)  # ValueError naming an unknown one
    columns = tuple(columns or COLUMNS + (QSUN_COLUMNS if qsun else ()))
    bad = [c for c in columns if c not in TITLES]
    if bad:
        raise ValueError(f"unknown report columns {bad}; choose from {list(TITLES)}")
    bad = [s for s in eval_at if not 1 <= s <= steps]
    if bad:
        raise ValueError(f"eval_at steps {bad} are outside 1..{steps=}")
    curve_steps = tuple(sorted({*eval_at, steps}))
    quant = normalize_quant({**QUANT_DEFAULTS, **(quant or {})})
    train_seed = seed if train_seed is None else train_seed
    cfg, base_params, tok = base or tiny_base(progress=progress)
    quantized = {"sun+q", "qsun"} & set(columns)
    qdec = quantize_base(cfg, base_params, tok, quant, seed=seed) if quantized else None
    need = _needs(columns)
    results: dict[str, dict] = {}  # task -> column -> step -> evaluate() + token_metrics()
    histories: dict[str, dict] = {}
    changes: dict[str, dict] = {}  # task -> trained module -> param_change()
    seconds: dict[str, float] = {}  # per task: training and evaluation
    eval_seconds: dict[str, float] = {}  # per task: evaluation alone
    trained = {}
    for name, task in TASKS.items():
        if tasks and name not in tasks:
            continue
        enc = encode(
            tok,
            with_scratch(
                task.generate(n_train, split="train", seed=seed, difficulty=difficulty),
                scratch_tokens,
            ),
            prompt_len=None,
            response_len=None,
        )
        test = with_scratch(
            task.generate(n_test, split="test", seed=seed, difficulty=difficulty), scratch_tokens
        )
        tc = TrainConfig(
            mode="sun",
            steps=steps,
            batch_size=batch_size,
            learning_rate=_per_task(learning_rate, name),
            warmup_steps=steps // 10,
            seed=train_seed,
            eval_at=curve_steps,
        )
        t0 = time.perf_counter()
        res = results[name] = {c: {} for c in columns}

        def score(col, step, prefill, decode, test=test, enc=enc, res=res, name=name) -> float:
            start = time.perf_counter()
            r = evaluate(cfg, prefill, decode, tok, test, max_new_tokens=enc.response_len)
            if name == "arith":
                kinds = [error_kind(ex, c) for ex, c in zip(test, r["completions"], strict=True)]
                r["errors"] = {k: kinds.count(k) for k in ERROR_KINDS}
            if token_stats:
                r.update(token_metrics(cfg, prefill, decode, tok, test))
            res[col][step] = r
            _save_progress(out, results)
            eval_seconds[name] = eval_seconds.get(name, 0.0) + time.perf_counter() - start
            return r["accuracy"]

        def fit(module: str, decode, desc: str, tc=tc, enc=enc, name=name):
            cols = [c for c in columns if MODULE_OF[c] == module]
            tcfg, init, dec, unroll = cfg, base_params, decode, lambda p: p
            if scan_train:  # the scanned layout compiles a train step in about half the time
                tcfg, unroll = cfg.replace(scan_layers=True), partial(unstack_layers, cfg)
                init = stack_layers(cfg, base_params)
                dec = None if decode is None else stack_layers(cfg, decode)

            def eval_fn(params, step: int) -> dict:
                params = unroll(params)
                return {c: score(c, step, *pairing(c, params, base_params, qdec)) for c in cols}

            params, history = train(
                tcfg, dataclasses.replace(tc, mode="full" if module == "full" else "sun"),
                init, enc.batch, len(enc.pairs), decode_params=dec, eval_fn=eval_fn,
                desc=f"{name}: {desc}", progress=progress,
            )  # fmt: skip
            keep = ("loss", "first_nll", "rest_nll", "first_acc", "rest_acc")
            histories.setdefault(name, {})[module] = [
                {"step": h["step"], **{k: h[k] for k in keep}} for h in history
            ]
            params = unroll(params)
            changes.setdefault(name, {})[module] = param_change(base_params, params)
            return params

        if "base" in columns:
            score("base", 0, base_params, base_params)
        full = fit("full", None, "full FT") if "full" in need else None
        sun = fit("sun", base_params, "SUN") if "sun" in need else None
        qs = fit("qsun", qdec, "QSUN") if "qsun" in need else None
        seconds[name] = time.perf_counter() - t0
        trained[name] = {k: v for k, v in (("sun", sun), ("full", full), ("qsun", qs)) if v}

    def last(task: str, col: str) -> dict:  # the result after the last step
        by_step = results[task][col]
        return by_step[max(by_step)]

    token_keys = ("first_token", "first_nll", "rest_nll", "first_acc", "rest_acc")
    report = {
        "model": cfg.to_dict(),
        "steps": steps,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "train_seed": train_seed,
        "batch_size": batch_size,
        "learning_rate": {t: _per_task(learning_rate, t) for t in results},
        "difficulty": difficulty,
        "decode_quant": quant if quantized else None,
        "columns": list(columns),
        "eval_at": list(curve_steps),
        "scratch_tokens": scratch_tokens,
        "accuracy": {t: {c: last(t, c)["accuracy"] for c in columns} for t in results},
        "correct": {t: {c: last(t, c)["correct"] for c in columns} for t in results},
        "samples": {t: {c: last(t, c)["samples"] for c in columns} for t in results},
        "completions": {t: {c: last(t, c)["completions"] for c in columns} for t in results},
        "errors": {t: {c: last(t, c)["errors"] for c in columns} for t in results if t == "arith"},
        "accuracy_curve": {
            t: {c: {s: r["accuracy"] for s, r in cs.items()} for c, cs in results[t].items()}
            for t in results
        },
        "correct_curve": {
            t: {c: {s: r["correct"] for s, r in cs.items()} for c, cs in results[t].items()}
            for t in results
        },
        "token_curve": {
            t: {
                c: {s: {k: r[k] for k in token_keys if k in r} for s, r in cs.items()}
                for c, cs in results[t].items()
            }
            for t in results
        },
        "history": histories,
        "param_change": changes,
        "seconds": seconds,
        "eval_seconds": eval_seconds,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    if len(curve_steps) > 1:
        plot_curves(report, os.path.join(out, "curve.png"))
    report["_trained"] = trained
    report["_base"] = (cfg, base_params, tok)
    report["_quantized_decode"] = qdec
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


# Differences reported with a paired interval: (column, minus column).
DIFFS = (("sun", "full"), ("naive", "full"), ("qsun", "sun"), ("sun+q", "sun"))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    """The report as markdown: accuracy with 95% Wilson intervals, paired differences, the
    learning curve and the first-token / later-token diagnostics."""
    cols = report["columns"]
    lines = [
        f"Accuracy (%, greedy, {report['n_test']} test examples per task; {report['steps']} "
        f"steps of fine-tuning, seed {report['seed']}, difficulty "
        f"{report.get('difficulty', 'tiny')}); [95% Wilson interval]",
        "",
        "| task | " + " | ".join(TITLES[c] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    correct = report.get("correct")
    for task, acc in report["accuracy"].items():
        cells = []
        for c in cols:
            text = _pct(acc[c])
            if correct:
                st = stats.cell(correct[task][c])
                text += f" [{_pct(st['low'])}, {_pct(st['high'])}]"
            cells.append(text)
        lines.append(f"| {task} | {' | '.join(cells)} |")
    if not correct:
        return "\n".join(lines) + "\n"
    diffs = [(a, b) for a, b in DIFFS if a in cols and b in cols]
    if diffs:
        lines += ["", "Paired differences (points, same test examples; 95% paired bootstrap)", ""]
        lines += ["| task | " + " | ".join(f"{a} − {b}" for a, b in diffs) + " |"]
        lines += ["|---" * (len(diffs) + 1) + "|"]
        for task in report["accuracy"]:
            cells = []
            for a, b in diffs:
                d = stats.paired_difference(correct[task][a], correct[task][b])
                cells.append(f"{_pct(d['diff'])} [{_pct(d['low'])}, {_pct(d['high'])}]")
            lines.append(f"| {task} | {' | '.join(cells)} |")
    curve = report.get("accuracy_curve", {})
    steps = report.get("eval_at", [])
    if len(steps) > 1:
        lines += ["", "Learning curve (accuracy %, one run evaluated after each step count)", ""]
        lines += ["| task | column | " + " | ".join(str(s) for s in steps) + " |"]
        lines += ["|---" * (len(steps) + 2) + "|"]
        for task, by_col in curve.items():
            for c, by_step in by_col.items():
                by_step = {int(k): v for k, v in by_step.items()}
                cells = [_pct(by_step[s]) if s in by_step else "" for s in steps]
                lines.append(f"| {task} | {c} | {' | '.join(cells)} |")
    tokens = report.get("token_curve", {})
    has_tokens = any(  # off with token_stats=False: only the greedy first token is there
        "first_acc" in point for cols in tokens.values() for steps in cols.values()
        for point in steps.values()
    )  # fmt: skip
    if has_tokens:
        lines += [
            "",
            "Where the errors are (last step, test targets): greedy first token = the first "
            "generated token is the target's; teacher-forced argmax accuracy and NLL of the "
            "first response token (prefill module) and the later ones (decode module)",
            "",
            "| task | column | greedy first token % | first acc % | later acc % | first NLL "
            "| later NLL |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, by_col in tokens.items():
            for c, by_step in by_col.items():
                m = by_step[max(by_step, key=int)]
                lines.append(
                    f"| {task} | {c} | {_pct(m['first_token'])} | {_pct(m['first_acc'])} | "
                    f"{_pct(m['rest_acc'])} | {m['first_nll']:.3f} | {m['rest_nll']:.3f} |"
                )
    for task, by_col in report.get("errors", {}).items():
        lines += ["", f"Where each {task} completion first leaves the reference working (last "
                  "step): result = right operands, wrong result; operands = another left side; "
                  "steps = a step missing or extra", ""]  # fmt: skip
        lines += ["| column | " + " | ".join(ERROR_KINDS) + " |"]
        lines += ["|---" * (len(ERROR_KINDS) + 1) + "|"]
        for c, counts in by_col.items():
            lines.append(f"| {c} | " + " | ".join(str(counts[k]) for k in ERROR_KINDS) + " |")
        eqs = {c: equation_accuracy(done) for c, done in report["completions"][task].items()}
        kinds = sorted({k for e in eqs.values() for k in e})
        lines += ["", "Equations the model wrote that are right (right / written), by operation "
                  "and size (large: an operand or the true result >= 100)", ""]  # fmt: skip
        lines += ["| column | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        for c, e in eqs.items():
            cells = [f"{e[k][0]}/{e[k][1]}" if k in e else "" for k in kinds]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    for task, by_module in report.get("param_change", {}).items():
        lines += _change_table(task, by_module)
    return "\n".join(lines) + "\n"


def _change_table(task: str, by_module: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: per layer, how far each trained module moved its attention and MLP."""
    mods = list(by_module)
    layers = sorted({g.split(".")[0] for ch in by_module.values() for g in ch
                     if g.startswith("layers_")}, key=lambda g: int(g.split("_")[1]))  # fmt: skip
    head = " | ".join(f"{m} {part}" for m in mods for part in ("attn", "mlp"))
    lines = ["", f"Relative weight change |Δ|/|W| (%) of the trained modules, {task}", ""]
    lines += [f"| layer | {head} |", "|---" * (2 * len(mods) + 1) + "|"]
    for layer in layers:
        cells = [_pct(by_module[m].get(f"{layer}.{part}", 0.0)) for m in mods
                 for part in ("attn", "mlp")]  # fmt: skip
        lines.append(f"| {layer.split('_')[1]} | {' | '.join(cells)} |")
    other = sorted({g for ch in by_module.values() for g in ch if not g.startswith("layers_")})
    for g in other:
        cells = [text for m in mods for text in (_pct(by_module[m].get(g, 0.0)), "")]
        lines.append(f"| {g} | {' | '.join(cells)} |")
    return lines


def summarize(reports: list[dict]) -> dict:
    """Aggregate reports that differ only in ``train_seed`` (same data, test set, columns):
    per cell the mean over seeds with a Student-t interval over the seeds and a bootstrap
    interval over the test examples (``stats.over_seeds``); per difference in ``DIFFS`` the
    mean over seeds with the same two intervals (the example bootstrap is paired: the per-example
    mean over seeds of one column minus the other's); the mean learning curve over the steps
    that every seed evaluated (seeds may differ in ``eval_at``, so a seed without the
    intermediate evaluations still counts at the last step)."""
    if not reports:
        raise ValueError("summarize needs at least one report")
    keys = ("columns", "n_test", "seed", "steps", "difficulty")
    first = reports[0]
    for r in reports[1:]:
        bad = {k: (first.get(k), r.get(k)) for k in keys if r.get(k) != first.get(k)}
        if r.get("scratch_tokens", 0) != first.get("scratch_tokens", 0):  # 0 before it existed
            bad["scratch_tokens"] = (first.get("scratch_tokens", 0), r.get("scratch_tokens", 0))
        if bad or set(r["accuracy"]) != set(first["accuracy"]):
            raise ValueError(f"reports differ beyond train_seed: {bad or 'tasks'}")
    cols = first["columns"]
    out = {k: first.get(k) for k in keys}
    out["train_seeds"] = [r["train_seed"] for r in reports]
    out["cells"], out["diffs"], out["curve"] = {}, {}, {}
    for task in first["accuracy"]:
        per = {c: np.array([r["correct"][task][c] for r in reports], float) for c in cols}
        out["cells"][task] = {c: stats.over_seeds(per[c]) for c in cols}
        out["diffs"][task] = {}
        for a, b in DIFFS:
            if a in cols and b in cols:
                d = per[a].mean(axis=1) - per[b].mean(axis=1)
                low, high = stats.seed_interval(d)
                paired = stats.paired_difference(per[a].mean(axis=0), per[b].mean(axis=0))
                out["diffs"][task][f"{a} - {b}"] = {
                    "diff": float(d.mean()), "per_seed": d.tolist(), "seed_low": low,
                    "seed_high": high, "low": paired["low"], "high": paired["high"],
                }  # fmt: skip
        curves = [r["accuracy_curve"][task] for r in reports]
        out["curve"][task] = {
            c: {
                s: float(np.mean([cv[c][s] for cv in curves]))
                for s in sorted(set.intersection(*(set(cv[c]) for cv in curves)), key=int)
            }
            for c in cols
        }
    return out


def summary_markdown(summary: dict) -> str:
    seeds = summary["train_seeds"]
    lines = [
        f"Mean accuracy % over {len(seeds)} training seeds {seeds} ({summary['n_test']} test "
        f"examples, {summary['steps']} steps, difficulty {summary['difficulty']}); [95% interval "
        "over test examples] {95% t-interval over seeds}",
        "",
        "| task | " + " | ".join(TITLES[c] for c in summary["columns"]) + " |",
        "|---" * (len(summary["columns"]) + 1) + "|",
    ]

    def fmt(x: dict, key: str) -> str:
        return (f"{_pct(x[key])} [{_pct(x['low'])}, {_pct(x['high'])}] "
                f"{{{_pct(x['seed_low'])}, {_pct(x['seed_high'])}}}")  # fmt: skip

    for task, cells in summary["cells"].items():
        lines.append(f"| {task} | " + " | ".join(fmt(cells[c], "accuracy") for c in cells) + " |")
    names = sorted({n for d in summary["diffs"].values() for n in d})
    if names:
        lines += ["", "Differences (points, mean over seeds; [paired bootstrap] {t over seeds})"]
        lines += ["", "| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for task, d in summary["diffs"].items():
            lines.append(f"| {task} | " + " | ".join(fmt(d[n], "diff") for n in names) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, path: str) -> None:
    """Accuracy against training steps, one panel per task, one line per column (the base
    column as a horizontal line), with 95% Wilson intervals as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["accuracy_curve"]
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, (task, by_col) in zip(axes[0], curves.items(), strict=True):
        for c, by_step in by_col.items():
            steps = sorted(int(s) for s in by_step)
            got = {int(s): v for s, v in report["correct_curve"][task][c].items()}
            acc = [100 * np.mean(got[s]) for s in steps]
            band = np.array([stats.cell(got[s])[k] for s in steps for k in ("low", "high")])
            band = 100 * band.reshape(-1, 2)
            if steps == [0]:
                ax.axhline(acc[0], color="grey", ls="--", label=TITLES[c])
                continue
            (line,) = ax.plot(steps, acc, marker="o", label=TITLES[c])
            ax.fill_between(steps, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.15)
        ax.set(title=f"{task} ({report['difficulty']}, n={report['n_test']})",
               xlabel="training steps", ylabel="accuracy %", ylim=(0, 100))  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="one report per batch order in OUT/seed_<s>, and OUT/summary.{json,md} over them",
    )
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="train nothing: OUT/summary.{json,md} over the OUT/seed_*/report.json there "
        "(seeds run one at a time, or an interrupted run's finished seeds)",
    )
    p.add_argument(
        "--eval-at", type=int, nargs="+", default=(), help="also evaluate after these steps"
    )
    p.add_argument(
        "--scratch-tokens",
        type=int,
        default=0,
        help="append this many filler tokens to every prompt (more KV for the prefill module)",
    )
    p.add_argument(
        "--benchmarks",
        action="store_true",
        help="also evaluate the tool modules on BFCL simple-python, the code ones on HumanEval",
    )
    p.add_argument("--bench-limit", type=int, default=None, help="first N benchmark examples")
    p.add_argument(
        "--sweep", type=json.loads, default=None, help="{name: quant overlay}: SUN with each"
    )
    args = p.parse_args(argv)
    if args.summarize_only:
        paths = sorted(glob.glob(os.path.join(args.out, "seed_*", "report.json")))
        if not paths:
            p.error(f"--summarize-only: no {args.out}/seed_*/report.json")
        reports = []
        for path in paths:
            with open(path) as f:
                reports.append(json.load(f))
        _write_summary(args.out, reports)
        return 0
    if args.scratch_tokens and args.benchmarks:
        p.error("--scratch-tokens: the benchmark prompts carry no scratch tokens; drop one")
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
    seeds = args.train_seeds or [args.train_seed]
    reports = []
    for train_seed in seeds:
        out = args.out if args.train_seeds is None else os.path.join(args.out, f"seed_{train_seed}")
        report = run_report(
            out=out,
            steps=args.steps,
            n_train=args.n_train,
            n_test=args.n_test,
            seed=args.seed,
            qsun=args.qsun,
            columns=tuple(args.columns) if args.columns else None,
            quant=args.quant,
            train_seed=train_seed,
            base=base,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            difficulty=args.difficulty,
            tasks=tuple(args.tasks) if args.tasks else None,
            eval_at=tuple(args.eval_at),
            scratch_tokens=args.scratch_tokens,
        )
        base = report["_base"]
        print(markdown(report))
        print(f"wrote {out}/report.json and report.md")
        if args.benchmarks:
            from train.benchmark_report import benchmark_report
            from train.benchmark_report import markdown as bench_markdown

            bench = benchmark_report(out=out, report=report, limit=args.bench_limit)
            print(bench_markdown(bench))
            print(f"wrote {out}/benchmarks.json and benchmarks.md")
        reports.append({k: v for k, v in report.items() if not k.startswith("_")})
    if args.train_seeds is not None:
        _write_summary(args.out, reports)
    return 0


def _write_summary(out: str, reports: list[dict]) -> None:
    summary = summarize(reports)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(summary))
    print(summary_markdown(summary))


if __name__ == "__main__":
    raise SystemExit(main())
