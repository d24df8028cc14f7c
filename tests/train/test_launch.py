"""`sunjax train` and `sunjax export` as a user runs them: YAML in, run directories, an export
that serves. QSUN runs train through (and ship) the quantized decode module."""

import glob
import json
import os

import pytest

from sunjax.configs import overlay, read_yaml
from sunjax.sun import fingerprint
from train import export, launch
from train.pretrain import tiny_base

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def fake_base(tmp_path_factory):
    """``launch.load_base`` for any name: a 3-step tiny base (its tokenizer is real BPE)."""
    cfg, params, tok = tiny_base(
        steps=3, n_docs=64, cache_dir=str(tmp_path_factory.mktemp("base")), progress=False
    )
    return lambda name: (cfg, params, tok, "tiny")


@pytest.fixture
def patched(monkeypatch, fake_base):
    monkeypatch.setattr(launch, "load_base", fake_base)
    launch._quantized_base.cache_clear()
    yield
    launch._quantized_base.cache_clear()


def _config(tmp_path, name, *, quant=None, task="arith"):
    path = tmp_path / f"{name}.yaml"
    lines = [
        f"task: {task}",
        "base: tiny",
        "n_train: 16",
        "n_eval: 2",
        "prompt_len: 96",
        "response_len: 48",
        f"out: {tmp_path / name}",
        "train: {mode: sun, steps: 2, batch_size: 4, learning_rate: 1.0e-3, warmup_steps: 0}",
    ]
    if quant:
        lines.append(f"decode_quant: {json.dumps(quant)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_qsun_run_exports_its_quantized_decode_module(tmp_path, patched):
    quant = {"bits": 4, "group_size": 32, "method": "awq"}
    assert launch.main(["--config", _config(tmp_path, "q-arith", quant=quant)]) == 0
    assert launch.main(["--config", _config(tmp_path, "q-tool", quant=quant, task="tool")]) == 0
    meta = json.loads((tmp_path / "q-arith" / "run.json").read_text())
    assert meta["decode_quant"] == {**launch.QUANT_DEFAULTS, **quant}

    run = launch.load_run(str(tmp_path / "q-arith"))
    assert export.decode_quant_of(run["decode"]) == meta["decode_quant"]
    assert fingerprint(run["decode"]) == meta["decode_fingerprint"]

    root = str(tmp_path / "exp")
    runs = [str(tmp_path / "q-arith"), str(tmp_path / "q-tool")]
    assert export.main(["--runs", *runs, "--out", root]) == 0
    cfg, decode, prefill, manifest = export.load_export(root)
    assert manifest["decode_quant"] == meta["decode_quant"]
    assert manifest["decode_fingerprint"] == meta["decode_fingerprint"]
    assert sorted(prefill) == ["arith", "tool"]
    assert fingerprint(prefill["arith"]) == fingerprint(run["params"])
    # the plain base is not the module these prefill modules were trained through
    with pytest.raises(ValueError, match="trained against decode tree"):
        export.load_prefill(root, "arith", launch.load_base("tiny")[1])


def test_export_refuses_runs_of_different_decode_modules(tmp_path, patched):
    assert launch.main(["--config", _config(tmp_path, "plain")]) == 0
    quant = {"bits": 4, "group_size": 32, "method": "rtn"}
    assert launch.main(["--config", _config(tmp_path, "q", quant=quant, task="tool")]) == 0
    runs = [str(tmp_path / "plain"), str(tmp_path / "q")]
    with pytest.raises(SystemExit, match="different decode trees"):
        export.main(["--runs", *runs, "--out", str(tmp_path / "exp")])
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    "quant, mode, match",
    [
        ({"bits": 3}, "sun", "bits must be 4 or 8, got 3"),
        ({"group_size": 0}, "sun", "group_size must be an int >= 2 for int4, got 0"),
        ({"method": "gptq"}, "sun", "method must be 'rtn' or 'awq', got 'gptq'"),
        ({"scale_dtype": "int8"}, "sun", "scale_dtype must be float32 or bfloat16, got 'int8'"),
        ({"bitz": 4}, "sun", "exactly the keys"),
        ({"int8": ["down"]}, "sun", "int8 must list linear names .*, got \\['down'\\]"),
        ({"bits": 4}, "full", "needs train.mode 'sun'"),
        ("int4", "sun", "must be a mapping"),
    ],
)
def test_bad_decode_quant(quant, mode, match):
    with pytest.raises(ValueError, match=match):
        launch.RunConfig(task="arith", train={"mode": mode}, decode_quant=quant)


@pytest.mark.parametrize("path", sorted(glob.glob(f"{ROOT}/configs/train/*.yaml")))
def test_shipped_train_configs_parse(path):
    rc = overlay(launch.RunConfig, read_yaml(path))
    assert rc.out.startswith("runs/")
    if "qsun" in path:
        assert rc.decode_quant == {**launch.QUANT_DEFAULTS, "group_size": 64}


def test_decode_quant_all_int8_linears_is_the_int8_tree():
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    q = export.normalize_quant({**launch.QUANT_DEFAULTS, "int8": every})
    assert q == {**launch.QUANT_DEFAULTS, "bits": 8, "group_size": None, "int8": []}
