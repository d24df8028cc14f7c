"""QSUN serving: a quantized shared decode tree (int4, v_proj / down_proj int8: the QSUN
default's layout) in the shard_map decode pool gives the greedy tokens of ``generate`` run
alone with the same quantized tree; a quantized export serves end to end through
``serve.loop``; the decode-step benchmark runs its three trees without recompiling."""

import json

import numpy as np
import pytest

from serve import loop
from serve.pool import DecodePool
from serve.router import LeastLoaded
from serve.scheduler import Request, Scheduler
from sunjax.export import export
from sunjax.quant import quantize_tree
from tests.serve.conftest import MODELS, reference

GROUP = 16  # divides d_model=32, n_heads*head_dim=32 and ffn_dim=48 of the tiny model
N_NEW = 8


@pytest.fixture(scope="module")
def qdecode(tiny):
    cfg, decode, _ = tiny
    return quantize_tree(cfg, decode, bits=4, group_size=GROUP, int8=("down_proj", "v_proj"))


@pytest.fixture(scope="module")
def qpool(tiny, qdecode, pool_config):
    cfg, _, _ = tiny
    return DecodePool(cfg, pool_config, decode_params=qdecode)


def _requests(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Request(
            id=f"q{i}",
            model=MODELS[i % len(MODELS)],
            prompt=tuple(rng.integers(0, 97, rng.integers(1, 20)).tolist()),
            max_tokens=N_NEW,
        )
        for i in range(n)
    ]


def test_quantized_pool_mixed_tasks_match_generatereference(tiny, qdecode, qpool):
    cfg, decode, tasks = tiny
    sched = Scheduler(qpool, tasks, LeastLoaded(4))
    reqs = _requests(12)
    for r in reqs:
        sched.submit(r)
    sched.run_until_idle()
    assert {sched.results[r.id].worker for r in reqs} == {0, 1, 2, 3}
    for r in reqs:
        assert sched.results[r.id].tokens == reference(cfg, tasks[r.model], qdecode, r), r.id
    # quantization is visible: the unquantized decode tree gives other tokens somewhere
    assert any(
        sched.results[r.id].tokens != reference(cfg, tasks[r.model], decode, r) for r in reqs
    )


def test_loop_serves_a_quantized_export(tmp_path, tiny, qdecode):
    cfg, _, tasks = tiny
    export(tmp_path / "exp", cfg, qdecode, {m: tasks[m] for m in MODELS}, tokenizer_source="none")
    setup = tmp_path / "setup.yaml"
    setup.write_text(
        f"policy: sun\nloader: export\nexport: {tmp_path / 'exp'}\ntasks: {list(MODELS)}\n"
        "workers: 4\nslots_per_worker: 2\nmax_len: 64\n"
    )
    reqs = _requests(6, seed=3)
    (tmp_path / "requests.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "id": r.id,
                    "model": r.model,
                    "prompt_ids": list(r.prompt),
                    "max_tokens": r.max_tokens,
                }
            )
            for r in reqs
        )
    )
    out = tmp_path / "out"
    argv = ["--config", str(setup), "--requests", str(tmp_path / "requests.jsonl")]
    assert loop.main(argv + ["--out", str(out)]) == 0
    rows = {
        row["id"]: row for row in map(json.loads, (out / "outputs.jsonl").read_text().splitlines())
    }
    for r in reqs:
        assert rows[r.id]["token_ids"] == reference(cfg, tasks[r.model], qdecode, r), r.id


def test_bench_qsun_smoke(tmp_path):
    from apps.bench import qsun as bench_qsun

    res = bench_qsun.main(["--tiny", "--out", str(tmp_path), "--repeats", "1"])
    assert [r["batch"] for r in res["rows"]] == [1, 4]
    for row in res["rows"]:
        assert set(row) == {"batch", "kv_bytes", "bf16", "int4", "mixed"}
        assert all(row[n]["recompiles"] == 0 and row[n]["seconds"] > 0 for n in ("int4", "mixed"))
    b = {n: res["sizes"][n]["linear_bytes_per_param"] for n in ("bf16", "int4", "mixed")}
    assert b["int4"] < b["mixed"] < b["bf16"] == 2.0, b
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]
