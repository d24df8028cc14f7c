"""The cluster model: tables, the simpy model's arithmetic, routing effects, and agreement with
the real serving loop on this CPU."""

import dataclasses
import json

import numpy as np
import pytest

from apps.simulate.model import (
    ClusterConfig,
    SimRequest,
    Simulation,
    popularity_split,
    proportional,
    read_jsonl,
    simulate,
    synthetic,
    zipf_weights,
)
from apps.simulate.tables import Curve, Grid, StepTable, roofline_h200

MS = 1e-3


def flat_table(step=10 * MS, prefill=3 * MS, handoff=2 * MS, **kw) -> StepTable:
    """Constant times, so a test can work the expected schedule out by hand."""
    return StepTable(
        kind="measured",
        label="flat",
        decode={"sun": Grid(batch=(1, 64), ctx=(1, 4096), seconds=((step, step), (step, step)))},
        prefill=Curve(x=(1, 4096), seconds=(prefill, prefill)),
        handoff=Curve(x=(1, 1e9), seconds=(handoff, handoff)),
        kv_bytes_per_token=1,
        **kw,
    )


def test_grid_and_curve_interpolate_and_extrapolate():
    g = Grid(batch=(1, 3), ctx=(10, 20), seconds=((1.0, 2.0), (3.0, 6.0)))
    assert g(1, 10) == 1.0 and g(3, 20) == 6.0
    assert g(2, 15) == pytest.approx((1.5 + 4.5) / 2)
    assert g(5, 20) == pytest.approx(10.0)  # linear beyond the grid
    c = Curve(x=(0, 10), seconds=(1.0, 2.0))
    assert c(5) == 1.5 and c(20) == 3.0
    with pytest.raises(ValueError, match="ascending"):
        Curve(x=(2, 1), seconds=(1.0, 2.0))
    with pytest.raises(ValueError, match="batch x ctx"):
        Grid(batch=(1, 2), ctx=(1,), seconds=((1.0,),))


def test_table_json_round_trip(tmp_path):
    t = flat_table(release=1e-4, admit=2e-4, submit=3e-4, prefill_bucket=8)
    path = tmp_path / "t.json"
    t.save(str(path))
    back = StepTable.load(str(path))
    assert back == t
    assert back.padded(9) == 12 and back.padded(3) == 8  # the engine's buckets
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(t, kind="guessed")
    with pytest.raises(ValueError, match="no decode entry for 'qsun'"):
        t.tree_for("qsun")


@pytest.fixture(scope="module")
def h200():
    from sunjax.configs import load_model_config
    from sunjax.quant import QUANT_DEFAULTS

    cfg = load_model_config("configs/models/llama-3.1-8b.yaml", scan_layers=False)
    return roofline_h200(cfg, QUANT_DEFAULTS)


def test_roofline_reproduces_the_anchors_and_is_labelled(h200):
    assert h200.kind == "roofline" and "NOT measured" in h200.label
    assert h200.decode_time("sun", 1, 1024) == pytest.approx(4.33 * MS, rel=1e-9)
    assert h200.decode_time("sun", 32, 1024) == pytest.approx(13.12 * MS, rel=1e-9)
    # the B=1 floor of ANCHORS.md: 3.57 ms of bytes at 4245 GB/s
    floor = (h200.meta["bytes"]["bf16_step_bytes"] + 1024 * h200.kv_bytes_per_token) / 4245e9
    assert floor == pytest.approx(3.57 * MS, abs=0.01 * MS)
    # QSUN reads fewer weight bytes: faster, most at small batch where weights dominate
    r1 = h200.decode_time("sun", 1, 1024) / h200.decode_time("qsun", 1, 1024)
    r64 = h200.decode_time("sun", 64, 1024) / h200.decode_time("qsun", 64, 1024)
    assert r1 > r64 > 1.0
    assert h200.prefill_time(2048) > 2 * h200.prefill_time(1024) / 2 > h200.prefill_time(16)


def test_engine_mode_schedule_by_hand():
    """1 worker x 1 slot: A (3 tokens) then B (2 tokens), both at t=0. Submit both; A: admit,
    prefill (first token), hand-off, 2 steps, release; B: admit, prefill, hand-off, 1 step.
    The wall ends at B's last token, before its release."""
    t = flat_table(release=0.5 * MS, admit=0.25 * MS, submit=0.1 * MS)
    reqs = [SimRequest("a", 0.0, "m", 4, 3), SimRequest("b", 0.0, "m", 4, 2)]
    cfg = ClusterConfig(mode="engine", decode_instances=1, slots=1)
    s = simulate(cfg, t, reqs)
    admit = (0.25 + 3 + 2) * MS
    wall = 2 * 0.1 * MS + admit + 2 * 10 * MS + 0.5 * MS + admit + 10 * MS
    assert s["decode_steps"] == 3
    assert s["output_tokens"] == 5
    assert s["wall_s"] == pytest.approx(wall)
    # both TPOTs: hand-off (2 ms) + steps over the later tokens: A (2 + 20) / 2, B (2 + 10) / 1
    assert s["tpot_ms_p50"] == pytest.approx((11 + 12) / 2)
    # TTFT: A after the submits, its admit and prefill; B after A's whole life and release
    assert s["ttft_ms_p50"] == pytest.approx((0.2 + 3.25 + 0.2 + 5.25 + 20 + 0.5 + 3.25) / 2)


def test_cluster_mode_one_request_latency():
    t = flat_table()
    s = simulate(ClusterConfig(decode_instances=2, slots=4), t, [SimRequest("a", 1.0, "m", 4, 5)])
    assert s["ttft_ms_p50"] == pytest.approx(3.0)  # prefill
    # hand-off then 4 decode steps after the first token
    assert s["tpot_ms_p50"] == pytest.approx((2 + 4 * 10) / 4)
    assert s["decode_steps"] == 4 and s["gpus"] == 3


def test_shared_pool_wins_under_skew_not_at_uniform_load():
    t = flat_table()
    tasks = ["a", "b", "c", "d"]
    out = {}
    for alpha in (0.0, 2.0):
        # capacity 8 slots / 10 ms per instance, ~26 req/s: the hot model alone overloads one
        reqs = synthetic(
            requests=400,
            rate=80.0,
            zipf_alpha=alpha,
            tasks=tasks,
            prompt_len=(8, 32),
            output_len=(20, 40),
        )
        w = dict(zip(tasks, zipf_weights(4, alpha), strict=True))
        for policy in ("sun", "conventional"):
            cfg = ClusterConfig(policy=policy, decode_instances=4, slots=8)
            out[policy, alpha] = simulate(cfg, t, reqs, tasks=tasks, weights=w)
    ratio = lambda a: (
        out["sun", a]["throughput_per_gpu"] / out["conventional", a]["throughput_per_gpu"]
    )
    assert ratio(0.0) == pytest.approx(1.0, abs=0.1)
    assert ratio(2.0) > 1.5
    assert out["conventional", 2.0]["tpot_ms_p99"] > 2 * out["sun", 2.0]["tpot_ms_p99"]


def test_popularity_split_and_errors(tmp_path):
    assert proportional(8, [0.7, 0.2, 0.1]) == [5, 2, 1]
    assert sum(proportional(16, zipf_weights(16, 1.5))) == 16
    r = popularity_split(["a", "b"], 5, [3, 1])
    # shares 1 + 3 x (3/4, 1/4) = 3.25, 1.75: floors 3, 1, the spare GPU to the larger remainder
    assert r.workers_for("a") == (0, 1, 2) and r.workers_for("b") == (3, 4)
    with pytest.raises(ValueError, match="policy='fast'"):
        ClusterConfig(policy="fast")
    with pytest.raises(ValueError, match="need a worker per model"):
        proportional(2, [1, 1, 1])
    measured = flat_table(pool={"workers": 4, "slots_per_worker": 8})
    with pytest.raises(ValueError, match="decode_instances=2"):
        Simulation(ClusterConfig(mode="engine", decode_instances=2, slots=8), measured, ["a"])
    with pytest.raises(ValueError, match="unknown task models"):
        simulate(ClusterConfig(), flat_table(), [SimRequest("x", 0, "zz", 4, 4)], tasks=["a"])
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"model": "a", "prompt_ids": [1, 2, 3], "max_tokens": 5}) + "\n")
    assert read_jsonl(str(path)) == [SimRequest("line-1", 0.0, "a", 3, 5)]


@pytest.fixture(scope="module")
def validation():
    """The real engine (tiny-sun's pool) under both policies and the model, with the table's
    rounds interleaved with the real runs (``apps.simulate.validate``)."""
    from apps.bench.steps import StepsConfig
    from apps.simulate.validate import validate

    steps = StepsConfig(
        workers=4,
        slots_per_worker=8,
        max_len=128,
        trees=("sun", "conventional"),
        steps=6,
        ctxs=(8, 59, 119),
        host_requests=96,
    )
    return validate(
        "configs/serve/tiny-sun.yaml",
        alphas=(0.0, 1.0, 1.5),
        policies=("sun", "conventional"),
        requests=240,
        steps=steps,
        repeats=7,
    )


def test_bench_steps_table_is_complete(validation):
    t = StepTable.from_json(validation["table"])
    assert t.kind == "measured" and t.meta["jax"] and t.meta["backend"] == "cpu"
    assert t.pool == {"workers": 4, "slots_per_worker": 8}
    assert all(np.all(np.asarray(t.decode[k].seconds) > 0) for k in ("sun", "conventional"))
    assert t.meta["rounds"] == validation["repeats"] == 7
    assert list(t.prefill.x) == [8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert all(s > 0 for s in t.handoff.seconds) and t.host_step is not None


def test_simulator_predicts_the_real_decode_steps(validation):
    errs = {(r["policy"], r["zipf_alpha"]): r["err_decode_steps"] for r in validation["rows"]}
    assert {a for _, a in errs} == {0.0, 1.0, 1.5}
    assert {p for p, _ in errs} == {"sun", "conventional"}
    assert max(errs.values()) <= 0.15, errs


@pytest.mark.parametrize("key", ["throughput_tok_s", "tpot_ms_p50"])
def test_simulator_predicts_the_real_engine_timing_within_15_percent(validation, key):
    """Wall-clock agreement can only be checked where the engine agrees with itself: when
    repeats of the same workload spread by more than the tolerance (other processes on the
    cores), the check is reported as an expected failure naming the spread, not passed."""
    errs = {(r["policy"], r["zipf_alpha"]): r[f"err_{key}"] for r in validation["rows"]}
    noise = max(r["noise"] for r in validation["rows"])
    if max(errs.values()) > 0.15 and noise > 0.15:
        pytest.xfail(f"engine repeats spread {noise:.0%} > 15% on this machine: {errs=}")
    assert max(errs.values()) <= 0.15, errs
