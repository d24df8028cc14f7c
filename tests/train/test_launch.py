"""`sunjax train` and `sunjax export` as a user runs them: YAML in, run directories, an export
that serves. QSUN runs train through (and ship) the quantized decode module."""

import glob
import json
import os

import numpy as np
import pytest

from sunjax import export
from sunjax.configs import overlay, read_yaml
from sunjax.export import fingerprint
from sunjax.quant import QUANT_DEFAULTS, decode_quant_of, normalize_quant
from train import base, launch
from train.data import encode
from train.pretrain import tiny_base
from train.tasks import get_task
from train.trainer import eval_step

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
    monkeypatch.setattr(base, "load_base", fake_base)
    base._quantized.cache_clear()
    yield
    base._quantized.cache_clear()


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
    assert meta["decode_quant"] == {**QUANT_DEFAULTS, **quant}

    run = launch.load_run(str(tmp_path / "q-arith"))
    assert decode_quant_of(run["decode"]) == meta["decode_quant"]
    assert fingerprint(run["decode"]) == meta["decode_fingerprint"]

    root = str(tmp_path / "exp")
    runs = [str(tmp_path / "q-arith"), str(tmp_path / "q-tool")]
    assert launch.export_main(["--runs", *runs, "--out", root]) == 0
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
        launch.export_main(["--runs", *runs, "--out", str(tmp_path / "exp")])
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
        assert rc.decode_quant == {**QUANT_DEFAULTS, "group_size": 64}


def test_decode_quant_all_int8_linears_is_the_int8_tree():
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    q = normalize_quant({**QUANT_DEFAULTS, "int8": every})
    assert q == {**QUANT_DEFAULTS, "bits": 8, "group_size": None, "int8": []}


def test_eval_every_scores_the_validation_split(tmp_path, patched):
    path = tmp_path / "e.yaml"
    text = open(_config(tmp_path, "e")).read().replace("steps: 2,", "steps: 4, eval_every: 2,")
    path.write_text(text)
    assert launch.main(["--config", str(path)]) == 0
    meta = json.loads((tmp_path / "e" / "run.json").read_text())
    assert [h["step"] for h in meta["eval_history"]] == [2, 4]
    # the last evaluation is the loss of the saved module on the validation split
    run = launch.load_run(str(tmp_path / "e"))
    cfg, base_params, tok, _ = launch.load_base("tiny")
    rc = overlay(launch.RunConfig, read_yaml(str(path)))
    val = encode(
        tok,
        get_task("arith").generate(2, split="val", seed=0, difficulty="tiny"),
        prompt_len=96,
        response_len=48,
    )
    want = eval_step(cfg, rc.train, run["params"], base_params, val.batch(np.arange(2)))
    assert abs(meta["eval_history"][-1]["eval_loss"] - float(want["loss"])) < 1e-5
    assert meta["eval_history"][0]["eval_loss"] != meta["eval_history"][1]["eval_loss"]
