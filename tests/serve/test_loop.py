"""Serving configs load; the loop runs a JSONL request file end to end and reports."""

import json
import pathlib

import pytest

from serve import loop
from sunjax.configs import read_yaml

CONFIGS = sorted((pathlib.Path(__file__).parents[2] / "configs" / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_serve_config_loads(path):
    raw = read_yaml(str(path))
    config = loop.load_config(str(path))
    # every key of the file reached the config (none silently dropped or defaulted)
    for key, value in raw.items():
        got = getattr(config, key)
        if key == "workload":
            assert {k: getattr(config.workload_config, k) for k in value} == {
                k: tuple(v) if isinstance(v, list) else v for k, v in value.items()
            }
        else:
            assert got == (tuple(value) if isinstance(value, list) else value), key
    assert config.policy in ("sun", "conventional")


def test_loop_writes_outputs_and_summary(tmp_path):
    cfg = tmp_path / "setup.yaml"
    cfg.write_text(
        "policy: conventional\ntasks: [a, b]\nworkers: 4\nslots_per_worker: 2\nmax_len: 64\n"
        "model: {vocab_size: 61, d_model: 16, n_layers: 1, n_heads: 2, n_kv_heads: 1,"
        " head_dim: 8, ffn_dim: 32, max_position_embeddings: 64}\n"
    )
    reqs = tmp_path / "requests.jsonl"
    lines = [
        {
            "id": f"r{i}",
            "model": "ab"[i % 2],
            "prompt_ids": list(range(1, 3 + i)),
            "max_tokens": 5,
            "arrival": 0.01 * i,
        }
        for i in range(6)
    ]
    lines.append({"id": "bad", "model": "zzz", "prompt_ids": [1], "max_tokens": 5})
    reqs.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    assert loop.main(["--config", str(cfg), "--requests", str(reqs), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"] == "conventional"
    assert (summary["requests"], summary["completed"], summary["failed"]) == (7, 6, 1)
    assert summary["output_tokens"] == 30
    for key in (
        "throughput_tok_s",
        "ttft_ms_p50",
        "ttft_ms_p99",
        "tpot_ms_p50",
        "tpot_ms_p99",
        "mean_batch_occupancy",
        "decode_steps",
    ):
        assert summary[key] is not None and summary[key] > 0, key
    rows = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    # arrival order: "bad" arrives at 0.0 with r0 (a stable sort keeps the file order)
    assert [r["id"] for r in rows] == ["r0", "bad"] + [f"r{i}" for i in range(1, 6)]
    served, bad = [r for r in rows if r["id"] != "bad"], rows[1]
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in served)
    assert all("error" not in r for r in served)
    assert bad["finish_reason"] == "refused" and "unknown model 'zzz'" in bad["error"]
    owners = {"a": {0, 1}, "b": {2, 3}}
    assert all(r["worker"] in owners[r["model"]] for r in served)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"model": "a", "prompt_ids": [1, 2]', "not valid JSON"),
        ('{"prompt_ids": [1, 2]}', "missing field 'model'"),
        ('{"model": "a", "prompt_ids": [1, 2], "max_tokens": "5"}', "field 'max_tokens'"),
        ('{"model": "a", "prompt_ids": [1, "x"]}', "prompt_ids must be a list of ints"),
        ('{"model": "a"}', "needs 'prompt' (text) or 'prompt_ids'"),
        ('{"model": "a", "prompt_ids": [1], "temprature": 1}', "unknown field(s) ['temprature']"),
        ("[1, 2]", "must be a JSON object"),
        ('{"model": "a", "prompt_ids": [1], "arrival": -1}', "field 'arrival'"),
    ],
)
def test_bad_request_line_names_file_line_and_field(tmp_path, capsys, line, message):
    cfg = tmp_path / "setup.yaml"
    cfg.write_text(
        "tasks: [a]\nworkers: 1\nslots_per_worker: 2\nmax_len: 32\n"
        "model: {vocab_size: 61, d_model: 16, n_layers: 1, n_heads: 2, n_kv_heads: 1,"
        " head_dim: 8, ffn_dim: 32, max_position_embeddings: 64}\n"
    )
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text('{"model": "a", "prompt_ids": [1, 2]}\n' + line + "\n")
    out = tmp_path / "out"
    assert loop.main(["--config", str(cfg), "--requests", str(reqs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{reqs}:2: " in err and message in err, err
    assert not out.exists()  # nothing served from a bad file
