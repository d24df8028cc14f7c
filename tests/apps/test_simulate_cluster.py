"""Cluster mode as ``sunjax cluster`` runs (one shared prefill process, a decode slot reserved
before the prefill, control-message hops, the hand-off's work in the decode loop), and its
agreement with the real multi-process cluster on this CPU."""

import pytest

from apps.simulate.model import ClusterConfig, SimRequest, simulate
from apps.simulate.tables import Curve, Grid, StepTable

MS = 1e-3


def table(**kw) -> StepTable:
    flat = lambda s: Curve(x=(1, 1e9), seconds=(s, s))
    return StepTable(
        kind="measured",
        label="flat",
        decode={"sun": Grid(batch=(1, 64), ctx=(1, 4096), seconds=((10 * MS,) * 2,) * 2)},
        prefill=flat(3 * MS),
        handoff=flat(2 * MS),
        kv_bytes_per_token=1,
        **kw,
    )


CLUSTER = dict(decode_instances=2, slots=4, prefill_shared=True, route="before_prefill")


def test_one_request_through_the_cluster_by_hand():
    t = table(hop=0.5 * MS, handoff_decode=Curve(x=(1, 1e9), seconds=(MS, MS)))
    s = simulate(ClusterConfig(**CLUSTER), t, [SimRequest("a", 1.0, "m", 4, 5)])
    assert s["ttft_ms_p50"] == pytest.approx(0.5 + 3)  # hop to the prefill process, prefill
    # two hops + hand-off, then 4 steps; the first also inserts (handoff_decode)
    assert s["tpot_ms_p50"] == pytest.approx((1 + 2 + 1 + 4 * 10) / 4)
    assert s["decode_steps"] == 4 and s["gpus"] == 3  # 2 decode + 1 shared prefill


def test_shared_prefill_serves_every_task_in_turn():
    reqs = [SimRequest("a", 0.0, "x", 4, 3), SimRequest("b", 0.0, "y", 4, 3)]
    shared = simulate(ClusterConfig(**CLUSTER), table(), reqs)
    per_task = simulate(ClusterConfig(**{**CLUSTER, "prefill_shared": False}), table(), reqs)
    # TTFTs 3 and 6 (queued behind the other task's prefill) against 3 and 3; p50 = mean
    assert shared["ttft_ms_p50"] == pytest.approx((3 + 6) / 2)
    assert per_task["ttft_ms_p50"] == pytest.approx(3.0)
    assert shared["gpus"] == 3 and per_task["gpus"] == 4


def test_slot_reserved_before_prefill_waits_for_a_free_slot():
    reqs = [SimRequest("a", 0.0, "x", 4, 3), SimRequest("b", 0.0, "x", 4, 3)]
    cfg = ClusterConfig(decode_instances=1, slots=1, prefill_shared=True, route="before_prefill")
    s = simulate(cfg, table(), reqs)
    # b's prefill starts only when a's slot frees: a = prefill 3 + hand-off 2 + 2 steps 20
    assert s["ttft_ms_p50"] == pytest.approx((3 + 25 + 3) / 2)
    after = simulate(dataclass_replace(cfg, route="after_prefill"), table(), reqs)
    assert after["ttft_ms_p50"] == pytest.approx((3 + 6) / 2)  # prefilled at once
    with pytest.raises(ValueError, match="route"):
        ClusterConfig(route="sideways")


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.fixture(scope="module")
def cluster_validation():
    from apps.simulate.validate import validate_cluster

    return validate_cluster(alphas=(0.0, 1.0, 1.5), requests=60, repeats=3, steps=4)


@pytest.mark.slow
def test_cluster_table_is_measured(cluster_validation):
    t = StepTable.from_json(cluster_validation["table"])
    assert t.pool == {"workers": 1, "slots_per_worker": 8} and t.meta["rounds"] == 3
    assert t.hop > 0 and t.handoff_decode is not None and t.host_step is not None
    assert all(s > 0 for s in (*t.prefill.seconds, *t.handoff.seconds))


@pytest.mark.slow
def test_simulator_predicts_the_real_cluster_decode_steps(cluster_validation):
    errs = {r["zipf_alpha"]: r["err_decode_steps"] for r in cluster_validation["rows"]}
    assert set(errs) == {0.0, 1.0, 1.5}
    assert max(errs.values()) <= 0.15, errs


@pytest.mark.slow
@pytest.mark.parametrize("key", ["throughput_tok_s", "tpot_ms_p50"])
def test_simulator_predicts_the_real_cluster_timing_within_15_percent(cluster_validation, key):
    """As for the engine: where repeats of the same workload spread by more than the
    tolerance, the check is an expected failure naming the spread."""
    errs = {r["zipf_alpha"]: r[f"err_{key}"] for r in cluster_validation["rows"]}
    noise = max(r["noise"] for r in cluster_validation["rows"])
    if max(errs.values()) > 0.15 and noise > 0.15:
        pytest.xfail(f"cluster repeats spread {noise:.0%} > 15% on this machine: {errs=}")
    assert max(errs.values()) <= 0.15, errs
