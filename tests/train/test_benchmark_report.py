"""Benchmark evaluation of trained modules at toy size: every column, the same evaluate path,
a token budget sized from the reference answers."""

import json

import pytest

from train.benchmark_report import benchmark_report, token_budget
from train.evaluate import evaluate
from train.pretrain import tiny_base
from train.report import pairing, run_report
from train.tasks import TASKS


def test_token_budget_covers_95_percent_of_the_references(tmp_path):
    _, _, tok = tiny_base(steps=3, n_docs=64, cache_dir=str(tmp_path / "base"), progress=False)
    examples = TASKS["arith"].generate(40, split="test", difficulty="small")
    lengths = sorted(len(tok.encode(e.target, add_special_tokens=False)) + 1 for e in examples)
    budget = token_budget(tok, examples)
    assert budget % 16 == 0 and budget >= lengths[37] and budget - 16 < lengths[-1]
    assert token_budget(tok, examples[:1], at_least=200) == 208


def test_benchmark_report_evaluates_every_column(tmp_path):
    base = tiny_base(steps=3, n_docs=64, cache_dir=str(tmp_path / "base"), progress=False)
    report = run_report(
        out=str(tmp_path / "r"), steps=1, n_train=8, n_test=2, seed=0, base=base,
        tasks=("tool",), batch_size=4, progress=False,
    )  # fmt: skip
    held_out = TASKS["tool"].generate(3, split="val", difficulty="tiny")
    loaders = {"tool": ("tool val", lambda: held_out), "code": ("never", lambda: 1 / 0)}
    with pytest.raises(ValueError, match="limit=0"):
        benchmark_report(out=str(tmp_path), report=report, limit=0, loaders=loaders)
    got = benchmark_report(out=str(tmp_path / "b"), report=report, limit=2, loaders=loaders)
    saved = json.load(open(tmp_path / "b" / "benchmarks.json"))
    bench = saved["benchmarks"]["tool"]
    assert set(saved["benchmarks"]) == {"tool"} and bench["n"] == 2
    assert set(bench["accuracy"]) == set(report["columns"])
    cfg, params, tok = base
    sun = report["_trained"]["tool"]["sun"]
    want = evaluate(cfg, *pairing("sun", sun, params, None), tok, held_out[:2],
                    max_new_tokens=bench["max_new_tokens"])  # fmt: skip
    assert bench["correct"]["sun"] == want["correct"]
    assert bench["completions"]["sun"] == want["completions"]
    assert got["benchmarks"]["tool"]["accuracy"]["sun"] == want["accuracy"]
    assert "sun − full" in open(tmp_path / "b" / "benchmarks.md").read()
