"""A decode instance over two processes (one JAX mesh, ``jax.distributed``, gloo on the CPU)
in a ``sunjax cluster`` beside a one-process decode instance.

Process 0 of ``d0`` talks to the frontend and drives process 1 by an ordered command stream;
each slot's prefix is pulled by the process that owns the slot's device. Matching
``sunjax.generate`` token for token, with requests landed on both processes and both task
models in one decode step, proves the KV crossed into the right process and the SPMD step
ran in lockstep; SIGKILLing process 1 mid-stream fails d0's requests (not a hang), d0's
leader exits on its own, d1 keeps serving, and the group restarts.
"""

import concurrent.futures as cf
import time

import openai
import psutil
import pytest

from apps.local_cluster import LocalCluster
from serve.cluster.config import cluster_config
from tests.serve.test_cluster import mixed_requests, reference

SETTINGS = dict(
    slots=4, max_len=256, min_bucket=64, heartbeat_s=0.1, lost_after_s=1.0, group_timeout_s=3.0
)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(exports):
    with LocalCluster(
        exports["root"],
        prefill={"p0": ["math", "code"]},
        decode=["d0", "d1"],
        decode_options={"d0": {"processes": 2, "devices": 1}},
        compile_cache=exports["cache"],
        **SETTINGS,
    ) as c:
        yield c


def test_multiprocess_decode_config_bad_values_are_named():
    base = {"export": "x", "prefill": [{"name": "p0", "tasks": ["math"]}]}
    ok = cluster_config({**base, "decode": [{"name": "d0", "processes": 2, "devices": 2}]})
    assert ok.decode[0].processes == 2 and ok.decode[0].coordinator_port == 0
    with pytest.raises(ValueError, match="'d0': processes=0 must be >= 1"):
        cluster_config({**base, "decode": [{"name": "d0", "processes": 0}]})
    with pytest.raises(ValueError, match="'d0': devices='2' must be >= 1"):
        cluster_config({**base, "decode": [{"name": "d0", "devices": "2"}]})
    with pytest.raises(ValueError, match="'d0': coordinator_port=70000 must be a port"):
        cluster_config({**base, "decode": [{"name": "d0", "coordinator_port": 70000}]})
    with pytest.raises(ValueError, match="group_timeout_s=0.1 must exceed heartbeat_s=0.2"):
        cluster_config({**base, "decode": [{"name": "d0"}], "group_timeout_s": 0.1})


def test_two_process_decode_equals_generate_with_models_mixed(cluster, exports):
    for name in ("d0",):  # both processes of d0 are up, each with its own arguments
        for pid in (0, 1):
            assert "--coordinator-port" in cluster.process(name, pid).cmdline()
    got = mixed_requests(cluster.client(), exports["tok"])
    for (model, prompt), tokens in got.items():
        assert tokens == reference(exports, model, exports["tok"].encode(prompt), 24), model
    d0 = cluster.health()["instances"]["d0"]
    assert d0["processes"] == 2 and d0["handled"] > 0
    assert min(d0["landed_by_process"]) > 0, d0  # both processes pulled and decoded slots
    assert d0["most_models_in_a_step"] == 2  # one SPMD step advanced both task models


def test_follower_killed_fails_its_instance_and_the_group_exits_and_restarts(cluster, exports):
    client = cluster.client(timeout=60)
    ids = exports["tok"].encode("Tell me a story")
    leader = cluster.process("d0", 0)
    started, ended = {}, {}

    def stream(i):
        try:
            for _ in client.completions.create(
                model=("math", "code")[i % 2], prompt=ids, max_tokens=220, stream=True
            ):
                started.setdefault(i, time.monotonic())
            ended[i] = ("ok", time.monotonic())
        except openai.APIError as e:
            ended[i] = (str(e), time.monotonic())

    with cf.ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(stream, i) for i in range(4)]
        deadline = time.monotonic() + 60
        while len(started) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(started) == 4, "the streams did not start"
        cluster.kill("d0", process_id=1)
        killed = time.monotonic()
        for f in futures:
            f.result(timeout=60)
    outcomes = [ended[i][0] for i in range(4)]
    errors = [i for i in range(4) if outcomes[i] != "ok"]
    assert len(errors) == 2, outcomes  # least-loaded: two streams on each instance
    for i in errors:
        assert "decode instance 'd0' was lost" in outcomes[i]
        assert ended[i][1] - killed < SETTINGS["lost_after_s"] + 5.0  # not a hang
    # the leader leaves on its own (a failed collective, or its watchdog), before the
    # launcher's backstop (group_timeout_s + 5 s)
    try:
        leader.wait(SETTINGS["group_timeout_s"] + 2)
    except psutil.TimeoutExpired:
        pytest.fail("d0's leader outlived its follower")
    h = cluster.health()
    assert h["down"] == ["d0"] and h["instances"]["d0"]["lost"] == 1
    m = cluster.metrics()
    assert m[("sunjax_instance_up", (("instance", "d0"), ("role", "decode")))] == 0
    out = client.completions.create(model="code", prompt=ids, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length"  # d1 serves on
    # `--role decode --name d0` starts the whole group again; it rejoins and serves
    cluster.restart("d0")
    cluster.wait_up(["d0"], timeout=240)
    got = mixed_requests(client, exports["tok"], n_tokens=8)
    for (model, prompt), tokens in got.items():
        assert tokens == reference(exports, model, exports["tok"].encode(prompt), 8)
    assert "outlived its group" not in cluster.output()
