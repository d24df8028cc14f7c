"""Smoke test of the whole accuracy-report path at toy size: the tiny base pretraining (own
BPE tokenizer, cached), full / SUN / QSUN fine-tuning and the SUN-path evaluation."""

import json
import os

import pytest

from train.pretrain import tiny_base
from train.report import COLUMNS, QSUN_COLUMNS, run_report


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
        assert all(0.0 <= a <= 1.0 for a in saved["accuracy"][task].values())
    assert os.path.isfile(tmp_path / "r" / "report.md")
    assert set(report["_trained"]["code"]) == {"sun", "full"}


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
