"""The main job at toy size, end to end: training, report, export, serving table, closing."""

import json
import os

from apps import demo
from sunjax.export import load_export
from train import base
from train.pretrain import tiny_base


def test_demo_runs_end_to_end_at_toy_size(tmp_path, monkeypatch, capsys):
    cfg, params, tok = tiny_base(
        steps=3, n_docs=64, cache_dir=str(tmp_path / "base"), progress=False
    )
    monkeypatch.setattr(base, "load_base", lambda name: (cfg, params, tok, "tiny"))
    # the real recipe's switches, at toy size
    toy = dict(
        steps=1,
        batch_size=4,
        learning_rate={"arith": 1e-3, "code": 1e-3, "tool": 2e-3},
        n_train=16,
        scan_train=True,
        token_stats=False,
    )
    monkeypatch.setitem(demo.RECIPES, "tiny", toy)
    out = tmp_path / "demo"
    argv = ["--model", "tiny", "--out", str(out), "--n-test", "2", "--requests", "6"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["accuracy"]) == {"arith", "code", "tool"}
    assert report["columns"] == ["base", "full", "naive", "sun"]

    serve = json.loads((out / "serve" / "summary.json").read_text())
    for alpha in ("0.0", "1.0", "1.5"):
        sun, conv = serve["sun"][alpha], serve["conventional"][alpha]
        assert sun["output_tokens"] == conv["output_tokens"]  # identical work
        assert sun["completed"] == conv["completed"] == 6
    # the shared pool never needs more decode steps than per-model workers for the same work
    assert all(serve["sun"][a]["decode_steps"] <= serve["conventional"][a]["decode_steps"]
               for a in ("0.0", "1.0", "1.5"))  # fmt: skip
    assert (out / "serve" / "serving.png").stat().st_size > 0

    _, _, prefill, manifest = load_export(out / "export")
    assert sorted(prefill) == ["arith", "code", "tool"]
    assert "Total time:" in printed and f"sunjax serve --export {out / 'export'}" in printed
    assert os.path.isfile(out / "report" / "report.md")
