"""Modules trained on the synthetic tasks, evaluated on real benchmark data.

    sunjax report --model smollm2 --tasks tool code --benchmarks [--bench-limit 100]

After ``train.report.run_report`` has trained the modules, each column (base, full FT, naive
pairing, SUN, QSUN...) is evaluated on the real data of its task's benchmark, through the same
``train.evaluate.evaluate`` path (greedy, the task's checker):

* tool modules on BFCL simple-python (``load_bfcl_simple_python``: its possible answers, the
  AST-style checker with BFCL's string normalisation);
* code modules on HumanEval (``load_humaneval``: pass@1, the completion run after the problem's
  prompt and before its tests in ``train/tasks/sandbox.py``).

``max_new_tokens`` is sized from the benchmark's reference answers (the 95th percentile of their
token counts, rounded up to 16, at least the synthetic task's response length); it and the
longest prompt are written to the report. Writes ``benchmarks.json`` and ``benchmarks.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from sunjax.tokenizer import chat_prompt
from train import stats
from train.evaluate import evaluate
from train.report import DIFFS, MODULE_OF, TITLES, pairing
from train.tasks import Example, load_bfcl_simple_python, load_humaneval

# task -> (benchmark name, loader)
BENCHMARKS: dict[str, tuple[str, Callable[[], list[Example]]]] = {
    "tool": ("BFCL simple-python", load_bfcl_simple_python),
    "code": ("HumanEval", load_humaneval),
}


def token_budget(tokenizer, examples: list[Example], *, at_least: int = 16) -> int:
    """New tokens that fit 95% of the reference answers, rounded up to a multiple of 16."""
    lengths = [len(tokenizer.encode(ex.target, add_special_tokens=False)) + 1 for ex in examples]
    need = max(int(np.ceil(np.percentile(lengths, 95))), at_least)
    return -(-need // 16) * 16


def benchmark_report(
    *,
    out: str,
    report: dict,
    limit: int | None = None,
    batch_size: int = 32,
    loaders: dict[str, tuple[str, Callable[[], list[Example]]]] | None = None,
) -> dict:
    """Evaluate every column of ``report`` (a ``run_report`` result, with its ``_trained``
    modules) on the benchmark of each of its tasks that has one; ``limit`` takes the first
    ``limit`` benchmark examples. ``loaders`` replaces ``BENCHMARKS`` (tests)."""
    if limit is not None and limit < 1:
        raise ValueError(f"{limit=} must be at least 1")
    loaders = BENCHMARKS if loaders is None else loaders
    cfg, base_params, tok = report["_base"]
    qdec = report["_quantized_decode"]
    columns = report["columns"]
    result: dict = {"columns": columns, "benchmarks": {}}
    for task, modules in report["_trained"].items():
        if task not in loaders:
            continue
        name, load = loaders[task]
        examples = load()[:limit]
        budget = token_budget(tok, examples, at_least=16)
        rows = {}
        for col in columns:
            module = MODULE_OF[col]
            prefill, decode = pairing(col, modules.get(module), base_params, qdec)
            rows[col] = evaluate(
                cfg, prefill, decode, tok, examples, max_new_tokens=budget, batch_size=batch_size
            )
        result["benchmarks"][task] = {
            "benchmark": name,
            "n": len(examples),
            "max_new_tokens": budget,
            "longest_prompt": max(len(chat_prompt(tok, ex.messages)) for ex in examples),
            "accuracy": {c: r["accuracy"] for c, r in rows.items()},
            "first_token": {c: r["first_token"] for c, r in rows.items()},
            "correct": {c: r["correct"] for c, r in rows.items()},
            "ids": [ex.meta.get("id") for ex in examples],
            "samples": {c: r["samples"] for c, r in rows.items()},
            "completions": {c: r["completions"] for c, r in rows.items()},
        }
    result["model"] = report["model"]
    result["trained_on"] = {
        k: report[k]
        for k in (
            "difficulty",
            "steps",
            "n_train",
            "seed",
            "train_seed",
            "batch_size",
            "learning_rate",
        )
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "benchmarks.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "benchmarks.md"), "w") as f:
        f.write(markdown(result))
    return result


def markdown(result: dict) -> str:
    cols = result["columns"]
    t = result["trained_on"]
    lines = [
        f"Real benchmark data, modules trained on the synthetic tasks ({t['difficulty']}, "
        f"{t['steps']} steps). Accuracy % (greedy; BFCL: AST-style check, HumanEval: pass@1) "
        "[95% Wilson interval]",
        "",
        "| benchmark | n | " + " | ".join(TITLES[c] for c in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for bench in result["benchmarks"].values():
        cells = []
        for c in cols:
            st = stats.cell(bench["correct"][c])
            cells.append(
                f"{100 * st['accuracy']:.1f} [{100 * st['low']:.1f}, {100 * st['high']:.1f}]"
            )
        lines.append(f"| {bench['benchmark']} | {bench['n']} | {' | '.join(cells)} |")
    diffs = [(a, b) for a, b in DIFFS if a in cols and b in cols]
    if diffs:
        lines += ["", "Paired differences (points; 95% paired bootstrap over the examples)", ""]
        lines += ["| benchmark | " + " | ".join(f"{a} − {b}" for a, b in diffs) + " |"]
        lines += ["|---" * (len(diffs) + 1) + "|"]
        for bench in result["benchmarks"].values():
            cells = []
            for a, b in diffs:
                d = stats.paired_difference(bench["correct"][a], bench["correct"][b])
                cells.append(f"{100 * d['diff']:.1f} [{100 * d['low']:.1f}, {100 * d['high']:.1f}]")
            lines.append(f"| {bench['benchmark']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
