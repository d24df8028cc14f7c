"""Smoke test of the whole accuracy-report path at toy size: the tiny base pretraining (own
BPE tokenizer, cached), full / SUN / QSUN fine-tuning and the SUN-path evaluation."""

import json
import os

import chex
import jax
import pytest

from train.data import encode
from train.evaluate import evaluate
from train.pretrain import tiny_base
from train.report import COLUMNS, QSUN_COLUMNS, run_report
from train.tasks import get_task


def test_report_runs_end_to_end_and_caches_the_base(tmp_path):
    kw = dict(steps=3, n_docs=64, cache_dir=str(tmp_path / "base"), progress=False)
    cfg, params, tok = tiny_base(**kw)
    assert cfg.vocab_size == len(tok) and tok.chat_template
    again = tiny_base(**kw)  # second call loads the cache
    assert again[0] == cfg

    report = run_report(
        out=str(tmp_path / "r"),
        steps=2,
        n_train=32,
        n_test=3,
        seed=0,
        base=(cfg, params, tok),
        qsun=True,
        progress=False,
    )
    saved = json.load(open(tmp_path / "r" / "report.json"))
    assert saved["columns"] == list(COLUMNS + QSUN_COLUMNS)
    for task in ("arith", "code", "tool"):
        assert set(saved["accuracy"][task]) == set(saved["columns"])
        # each accuracy is the fraction of its evaluated samples that were correct
        for col, acc in saved["accuracy"][task].items():
            samples = saved["samples"][task][col]
            assert len(samples) == 3 and acc * 3 == sum(s["correct"] for s in samples), col
        # the base column is the base model (prefill = decode = base): recompute it directly
        train = get_task(task).generate(32, split="train", seed=0)
        length = encode(tok, train, prompt_len=None, response_len=None).response_len
        test = get_task(task).generate(3, split="test", seed=0)
        want = evaluate(cfg, params, params, tok, test, max_new_tokens=length)
        assert saved["samples"][task]["base"] == want["samples"]
    assert os.path.isfile(tmp_path / "r" / "report.md")
    assert set(report["_trained"]["code"]) == {"sun", "full", "qsun"}


def test_report_task_subset_and_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        run_report(out=str(tmp_path), steps=1, n_train=1, n_test=1, seed=0, tasks=("nope",))
    kw = dict(steps=3, n_docs=64, cache_dir=str(tmp_path / "base"), progress=False)
    report = run_report(
        out=str(tmp_path / "r"),
        steps=1,
        n_train=8,
        n_test=2,
        seed=0,
        base=tiny_base(**kw),
        tasks=("tool",),
        progress=False,
    )
    assert set(report["accuracy"]) == {"tool"}


def test_scan_train_trains_the_same_modules(tmp_path):
    """Training in the scanned layout (faster to compile) gives the unrolled layout's trees."""
    kw = dict(steps=3, n_docs=64, cache_dir=str(tmp_path / "base"), progress=False)
    base = tiny_base(**kw)
    run = lambda scan: run_report(
        out=str(tmp_path / f"r{scan}"), steps=2, n_train=8, n_test=2, seed=0, base=base,
        tasks=("arith",), columns=("full", "sun"), scan_train=scan, progress=False,
    )["_trained"]["arith"]  # fmt: skip
    plain, scanned = run(False), run(True)
    for mode in ("full", "sun"):
        assert jax.tree.structure(plain[mode]) == jax.tree.structure(scanned[mode])
        chex.assert_trees_all_close(plain[mode], scanned[mode], atol=2e-5, rtol=1e-4)
