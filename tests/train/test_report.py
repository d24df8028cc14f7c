"""Smoke test of the whole accuracy-report path at toy size: the tiny base pretraining (own
BPE tokenizer, cached), full / SUN / QSUN fine-tuning and the SUN-path evaluation."""

import json
import os

import chex
import jax
import numpy as np
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


def test_learning_curve_from_one_run(tmp_path):
    """Checkpoints of one run are evaluated: each point is the mean of its per-example results,
    the last point is the report's accuracy and equals the returned module evaluated again."""
    kw = dict(steps=3, n_docs=64, cache_dir=str(tmp_path / "base"), progress=False)
    base = tiny_base(**kw)
    with pytest.raises(ValueError, match=r"\[5\]"):
        run_report(out=str(tmp_path), steps=3, n_train=8, n_test=2, seed=0, base=base,
                   tasks=("arith",), eval_at=(5,), progress=False)  # fmt: skip
    report = run_report(
        out=str(tmp_path / "r"),
        steps=3,
        n_train=16,
        n_test=4,
        seed=0,
        base=base,
        tasks=("arith",),
        eval_at=(1, 2),
        batch_size=4,
        progress=False,
    )
    saved = json.load(open(tmp_path / "r" / "report.json"))
    curve = saved["accuracy_curve"]["arith"]
    assert set(curve) == set(COLUMNS) and list(curve["base"]) == ["0"]
    for col in ("full", "naive", "sun"):
        assert list(curve[col]) == ["1", "2", "3"]
        assert curve[col]["3"] == saved["accuracy"]["arith"][col]
        for step, acc in curve[col].items():
            got = saved["correct_curve"]["arith"][col][step]
            assert len(got) == 4 and acc == sum(got) / 4
    assert saved["correct"]["arith"]["sun"] == saved["correct_curve"]["arith"]["sun"]["3"]
    # the last point is the returned SUN module evaluated again, from scratch
    cfg, params, tok = base
    test = get_task("arith").generate(4, split="test", seed=0)
    length = encode(
        tok, get_task("arith").generate(16, split="train", seed=0), prompt_len=None,
        response_len=None,
    ).response_len  # fmt: skip
    sun = report["_trained"]["arith"]["sun"]
    again = evaluate(cfg, sun, params, tok, test, max_new_tokens=length)
    assert again["correct"] == saved["correct"]["arith"]["sun"]
    tokens = saved["token_curve"]["arith"]["sun"]["3"]
    assert again["first_token"] == tokens["first_token"]
    assert set(tokens) == {"first_token", "first_nll", "rest_nll", "first_acc", "rest_acc"}
    history = saved["history"]["arith"]
    assert [h["step"] for h in history["sun"]] == [1, 2, 3] and set(history) == {"full", "sun"}
    assert os.path.getsize(tmp_path / "r" / "curve.png") > 1000
    progress = json.load(open(tmp_path / "r" / "progress.json"))
    assert progress["arith"]["sun"]["2"]["accuracy"] == curve["sun"]["2"]
    md = open(tmp_path / "r" / "report.md").read()
    assert "sun − full" in md and "Learning curve" in md
    # how far each module moved, per group, from the base weights it started at
    change = saved["param_change"]["arith"]
    assert set(change) == {"full", "sun"}
    layers = [f"layers_{i}" for i in range(cfg.n_layers)]
    assert {f"{layer}.{part}" for layer in layers for part in ("attn", "mlp")} <= set(change["sun"])
    new, old = sun["layers_0"]["mlp"], params["layers_0"]["mlp"]
    diff = sum(np.sum((np.asarray(new[k]["kernel"]) - old[k]["kernel"]) ** 2) for k in old)
    norm = sum(np.sum(np.asarray(old[k]["kernel"]) ** 2) for k in old)
    assert change["sun"]["layers_0.mlp"] == pytest.approx(np.sqrt(diff / norm), rel=1e-5)
    assert all(v > 0 for v in change["full"].values()) and "Relative weight change" in md
    # every completion is kept, and arith's are sorted by where they leave the reference
    for col in ("full", "sun"):
        completions = saved["completions"]["arith"][col]
        assert len(completions) == 4
        assert completions[0] == saved["samples"]["arith"][col][0]["completion"]
        errors = saved["errors"]["arith"][col]
        assert sum(errors.values()) == 4
        assert errors["correct"] == sum(saved["correct"]["arith"][col])
    assert "first leaves the reference" in md and "Equations the model wrote" in md


def test_with_scratch_appends_filler_tokens_to_the_last_message():
    from train.report import SCRATCH, with_scratch

    examples = get_task("arith").generate(3, split="test", seed=0)
    assert with_scratch(examples, 0) is examples
    got = with_scratch(examples, 4)
    for ex, new in zip(examples, got, strict=True):
        assert new.messages[-1]["content"] == ex.messages[-1]["content"] + "\n" + SCRATCH * 4
        assert (new.target, new.meta) == (ex.target, ex.meta)
    assert examples[0].messages[-1]["content"].count(SCRATCH) == 0  # the input is unchanged
    with pytest.raises(ValueError, match="-1"):
        with_scratch(examples, -1)


def test_scratch_tokens_and_benchmarks_are_refused_together(capsys):
    from train.report import main

    with pytest.raises(SystemExit):
        main(["--scratch-tokens", "4", "--benchmarks", "--out", "unused"])
    assert "--scratch-tokens" in capsys.readouterr().err


def _fake_report(train_seed, sun, full):
    return {
        "columns": ["full", "sun"], "n_test": len(sun), "seed": 0, "steps": 4,
        "difficulty": "small", "eval_at": [2, 4], "train_seed": train_seed,
        "accuracy": {"arith": {"full": sum(full) / len(full), "sun": sum(sun) / len(sun)}},
        "correct": {"arith": {"full": full, "sun": sun}},
        "accuracy_curve": {"arith": {"full": {"2": 0.0, "4": sum(full) / len(full)},
                                     "sun": {"2": 0.5, "4": sum(sun) / len(sun)}}},
    }  # fmt: skip


def test_summarize_over_seeds():
    from train import stats
    from train.report import summarize, summary_markdown

    reports = [
        _fake_report(0, sun=[1, 1, 0, 0], full=[1, 0, 0, 0]),
        _fake_report(1, sun=[1, 0, 0, 0], full=[1, 1, 1, 0]),
        _fake_report(2, sun=[1, 1, 1, 0], full=[1, 1, 0, 0]),
    ]
    got = summarize(reports)
    assert got["train_seeds"] == [0, 1, 2]
    assert got["cells"]["arith"]["sun"]["accuracy"] == pytest.approx(0.5)
    d = got["diffs"]["arith"]["sun - full"]
    assert d["per_seed"] == pytest.approx([0.25, -0.5, 0.25]) and d["diff"] == pytest.approx(0)
    assert (d["seed_low"], d["seed_high"]) == pytest.approx(stats.seed_interval([0.25, -0.5, 0.25]))
    assert got["curve"]["arith"]["sun"] == {"2": 0.5, "4": 0.5}
    assert "sun - full" in summary_markdown(got)
    # a seed evaluated only at the last step still counts there; the curve keeps common steps
    last_only = _fake_report(3, sun=[0, 0, 0, 0], full=[1, 0, 0, 0])
    last_only["eval_at"] = [4]
    for col in ("full", "sun"):
        del last_only["accuracy_curve"]["arith"][col]["2"]
    got = summarize(reports + [last_only])
    assert got["curve"]["arith"]["sun"] == {"4": pytest.approx(0.375)}
    assert got["cells"]["arith"]["sun"]["accuracy"] == pytest.approx(0.375)
    scratch = _fake_report(3, sun=[1, 0, 0, 0], full=[1, 0, 0, 0])
    scratch["scratch_tokens"] = 32
    with pytest.raises(ValueError, match="scratch_tokens"):
        summarize([reports[0], scratch])
    other = _fake_report(3, sun=[1, 0, 0, 0], full=[1, 0, 0, 0])
    other["difficulty"] = "tiny"
    with pytest.raises(ValueError, match="difficulty"):
        summarize([reports[0], other])


def test_summarize_only_reads_the_seed_reports_on_disk(tmp_path, capsys):
    """``--summarize-only`` trains nothing: the summary over OUT/seed_*/report.json equals
    ``summarize`` of those reports, and a directory without any is a clear error."""
    from train.report import main, summarize

    reports = [
        _fake_report(0, sun=[1, 1, 0, 0], full=[1, 0, 0, 0]),
        _fake_report(2, sun=[1, 1, 1, 0], full=[1, 1, 0, 0]),
    ]
    for r in reports:
        (tmp_path / f"seed_{r['train_seed']}").mkdir()
        (tmp_path / f"seed_{r['train_seed']}" / "report.json").write_text(json.dumps(r))
    assert main(["--out", str(tmp_path), "--summarize-only"]) == 0
    got = json.loads((tmp_path / "summary.json").read_text())
    assert got["train_seeds"] == [0, 2]
    want = json.loads(json.dumps(summarize(reports)))
    assert got == want
    assert "sun - full" in (tmp_path / "summary.md").read_text()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "empty"), "--summarize-only"])
    assert "no " in capsys.readouterr().err
