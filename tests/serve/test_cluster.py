"""``sunjax cluster``: a frontend, a prefill and two decode processes on localhost (the
launcher makes five), driven with the official ``openai`` client.

The export is tiny and random (``apps.tiny``): every task's prefill tree differs from the
decode tree, so matching ``sunjax.generate`` token for token proves the KV cache crossed the
process boundary intact and each stage ran its own tree.
"""

import concurrent.futures as cf
import glob
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import jax
import jax.numpy as jnp
import openai
import pytest

from apps.local_cluster import LocalCluster
from apps.remote_server import REPO, free_port
from apps.tiny import TINY, tiny_export
from serve.cluster import wire
from serve.cluster.config import cluster_config, load_cluster_config
from serve.cluster.frontend import ClusterScheduler
from serve.cluster.instances import DecodeInstance
from serve.scheduler import Request
from sunjax.export import load_export
from sunjax.generate import generate
from sunjax.tokenizer import eos_ids

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = dict(slots=4, max_len=256, min_bucket=64, heartbeat_s=0.1, lost_after_s=1.0)
PROMPTS = ["The quick brown fox", "Once upon a time there was", "def add(a, b):", "2 + 2 ="]
pytestmark = pytest.mark.slow


def reference_ids(exports, model, ids, n, *, conventional=False):
    """``sunjax.generate``: the task's prefill tree, then the shared decode tree (SUN) or the
    task's own tree (conventional)."""
    tree = exports["prefill"][model]
    out = generate(
        exports["cfg"],
        tree,
        [ids],
        max_new_tokens=n,
        eos_ids=eos_ids(exports["tok"]),
        decode_params=tree if conventional else exports["decode"],
    )
    return [int(t) for t in out.tokens[0]]


def reference(exports, model, ids, n, *, conventional=False):
    """``reference_ids`` as token strings (what the completions API's logprobs list)."""
    out = reference_ids(exports, model, ids, n, conventional=conventional)
    return [exports["tok"].decode([t]) for t in out]


def mixed_requests(client, tok, n_tokens=24):
    """Eight concurrent greedy completions, both models, every prompt; ``{(model, prompt):
    token strings}``."""
    jobs = [(m, p) for m in ("math", "code") for p in PROMPTS]

    def one(job):
        model, prompt = job
        out = client.completions.create(
            model=model, prompt=tok.encode(prompt), max_tokens=n_tokens, temperature=0, logprobs=0
        )
        return out.choices[0].logprobs.tokens

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        return dict(zip(jobs, ex.map(one, jobs), strict=True))


@pytest.fixture(scope="module")
def sun(exports):
    with LocalCluster(
        exports["root"],
        prefill={"p0": ["math", "code"]},
        decode=["d0", "d1"],
        compile_cache=exports["cache"],
        allow_model_management=True,
        export_root=os.path.dirname(exports["root"]),
        **SETTINGS,
    ) as c:
        yield c


def test_config_files_load_and_bad_values_are_named():
    for path in sorted(glob.glob(f"{ROOT}/configs/cluster/*.yaml")):
        config = load_cluster_config(path)
        assert config.decode and config.prefill and config.host == "127.0.0.1"
    base = {
        "export": "x",
        "prefill": [{"name": "p0", "tasks": ["math"]}],
        "decode": [{"name": "d0"}],
    }
    with pytest.raises(ValueError, match="policy='shared'"):
        cluster_config({**base, "policy": "shared"})
    two = {**base, "policy": "conventional", "prefill": [{"name": "p0", "tasks": ["a", "b"]}]}
    with pytest.raises(ValueError, match=r"no decode instance decodes \['b'\]"):
        cluster_config({**two, "decode": [{"name": "d0", "model": "a"}]})
    with pytest.raises(ValueError, match="'d0' has model='x'"):
        cluster_config({**two, "decode": [{"name": "d0", "model": "x"}]})
    with pytest.raises(ValueError, match=r"repeated: \['p0'\]"):
        cluster_config({**base, "decode": [{"name": "p0"}]})
    with pytest.raises(ValueError, match=r"unknown keys \['gpu'\]"):
        cluster_config({**base, "decode": [{"name": "d0", "gpu": 1}]})
    with pytest.raises(ValueError, match="heartbeat_s=3"):
        cluster_config({**base, "heartbeat_s": 3})
    with pytest.raises(ValueError, match="pull_timeout_s=0 must be > 0"):
        cluster_config({**base, "pull_timeout_s": 0})
    assert not cluster_config(base).reprefill_lost  # opt-in


def test_ports_bind_localhost(sun):
    listening = [
        (p.cmdline()[-1], c.laddr)
        for p in sun.processes()
        for c in p.net_connections(kind="inet")
        if c.status == "LISTEN"
    ]
    # the HTTP port, the control port, a transfer server per instance (and its transport)
    assert len(listening) >= 5
    assert {addr.ip for _, addr in listening} == {"127.0.0.1"}, listening


def test_sun_equals_generate_with_models_mixed_in_decode_batches(sun, exports):
    got = mixed_requests(sun.client(), exports["tok"])
    for (model, prompt), tokens in got.items():
        assert tokens == reference(exports, model, exports["tok"].encode(prompt), 24), model
    h = sun.health()["instances"]
    assert h["d0"]["handled"] > 0 and h["d1"]["handled"] > 0  # least-loaded used both
    # one decode step of one instance advanced both task models' requests
    assert max(h[d]["most_models_in_a_step"] for d in ("d0", "d1")) == 2
    m = sun.metrics()
    assert m[("sunjax_kv_handoff_seconds_count", ())] >= len(got)
    assert m[("sunjax_kv_handoff_bytes_total", ())] > 0


def test_unknown_task_is_404(sun):
    with pytest.raises(openai.NotFoundError, match="model 'chat' is not served"):
        sun.client().completions.create(model="chat", prompt="Hi", max_tokens=2)


def test_models_load_and_unload_through_the_frontend(sun, exports):
    """``POST /v1/models/load`` on the cluster: the frontend checks the export's fingerprint,
    a prefill instance loads the module, and the task serves (its own prefill tree, then the
    shared decode tree); unload takes it away again."""
    more = os.path.join(os.path.dirname(exports["root"]), "more")
    tiny_export(more, ("tool",))  # seed 0: the same decode tree as the served export
    tool = load_export(more)[2]["tool"]
    client, tok = sun.client(timeout=60), exports["tok"]
    url = f"{sun.url}/v1/models"
    r = httpx.post(f"{url}/load", json={"name": "chat", "path": "more"}, timeout=60)
    assert r.status_code == 400 and "task 'chat' is not in export" in r.text
    r = httpx.post(f"{url}/load", json={"name": "tool", "path": "more"}, timeout=60)
    assert r.status_code == 200, r.text
    assert "tool" in [m.id for m in client.models.list()]
    ids = tok.encode("def add(a, b):")
    out = client.completions.create(
        model="tool", prompt=ids, max_tokens=8, temperature=0, logprobs=0
    )
    want = generate(
        exports["cfg"],
        tool,
        [ids],
        max_new_tokens=8,
        eos_ids=eos_ids(tok),
        decode_params=exports["decode"],
    )
    assert out.choices[0].logprobs.tokens == [tok.decode([t]) for t in want.tokens[0]]
    r = httpx.post(f"{url}/load", json={"name": "tool", "path": "more"}, timeout=60)
    assert r.status_code == 409
    r = httpx.post(f"{url}/unload", json={"name": "tool"}, timeout=60)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError, match="model 'tool' is not served"):
        client.completions.create(model="tool", prompt=ids, max_tokens=2)


def test_decode_killed_mid_stream_fails_its_requests_and_a_restart_rejoins(sun, exports):
    client = sun.client(timeout=60)
    ids = exports["tok"].encode("Tell me a story")
    started, ended = {}, {}

    def stream(i):
        chunks = 0
        try:
            for _ in client.completions.create(
                model=("math", "code")[i % 2], prompt=ids, max_tokens=220, stream=True
            ):
                chunks += 1
                started.setdefault(i, time.monotonic())
            ended[i] = ("ok", time.monotonic())
        except openai.APIError as e:
            ended[i] = (str(e), time.monotonic())
        return chunks

    with cf.ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(stream, i) for i in range(4)]
        deadline = time.monotonic() + 60
        while len(started) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(started) == 4, "the streams did not start"
        sun.kill("d1")
        killed = time.monotonic()
        chunks = [f.result(timeout=60) for f in futures]
    outcomes = [ended[i][0] for i in range(4)]
    errors = [i for i in range(4) if outcomes[i] != "ok"]
    # least-loaded put two streams on each instance: d1's two end in an error, d0's complete
    assert len(errors) == 2, outcomes
    for i in errors:
        assert "decode instance 'd1' was lost" in outcomes[i]
        assert ended[i][1] - killed < SETTINGS["lost_after_s"] + 3.0  # not a hang
        assert 0 < chunks[i] < 220
    h = sun.health()
    assert h["down"] == ["d1"] and h["instances"]["d1"]["lost"] == 1
    m = sun.metrics()
    assert m[("sunjax_instance_up", (("instance", "d1"), ("role", "decode")))] == 0
    assert m[("sunjax_instance_lost_total", (("instance", "d1"),))] == 1
    # the survivors keep serving
    out = client.completions.create(model="code", prompt=ids, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length"
    # a restarted d1 rejoins and takes requests again
    before = h["instances"]["d1"]["handled"]
    sun.restart("d1")
    sun.wait_up(["d1"], timeout=240)
    got = mixed_requests(client, exports["tok"], n_tokens=8)
    for (model, prompt), tokens in got.items():
        assert tokens == reference(exports, model, exports["tok"].encode(prompt), 8)
    assert sun.health()["instances"]["d1"]["handled"] > before


def test_prefill_down_is_503_not_a_hang(sun):
    sun.kill("p0")
    deadline = time.monotonic() + SETTINGS["lost_after_s"] + 5
    while "p0" not in sun.health()["down"]:
        assert time.monotonic() < deadline, "the frontend did not notice p0 was lost"
        time.sleep(0.1)
    start = time.monotonic()
    r = httpx.post(
        f"{sun.url}/v1/completions",
        json={"model": "math", "prompt": "Hi", "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 503
    assert "no prefill instance of task 'math' is up" in r.json()["error"]["message"]
    assert time.monotonic() - start < 2


def test_conventional_equals_generate(exports, sun):
    sun.stop()  # free the cores before the next cluster starts
    with LocalCluster(
        exports["root"],
        policy="conventional",
        prefill={"p0": ["math", "code"]},
        decode={"d0": "math", "d1": "code"},
        compile_cache=exports["cache"],
        **SETTINGS,
    ) as c:
        got = mixed_requests(c.client(), exports["tok"])
        differ = 0
        for (model, prompt), tokens in got.items():
            ids = exports["tok"].encode(prompt)
            assert tokens == reference(exports, model, ids, 24, conventional=True), model
            differ += tokens != reference(exports, model, ids, 24)
        assert differ  # the decode tree matters: the SUN pairing continues differently
        h = c.health()["instances"]
        assert h["d0"]["most_models_in_a_step"] == h["d1"]["most_models_in_a_step"] == 1


OFFER = """
import json, sys
import jax, jax.numpy as jnp
from serve.cluster import wire
from sunjax.export import load_decode
cfg, _, _ = load_decode(sys.argv[1])
server = wire.start_transfer_server("127.0.0.1")
leaves = [jnp.zeros(x.shape, x.dtype) for x in jax.tree.leaves(wire.prefix_template(cfg, 64))]
server.await_pull(4, leaves)
server.await_pull(5, leaves)
print(json.dumps([server.address(), wire.leaf_specs(leaves)]), flush=True)
sys.stdin.read()
"""


class _Inbox:
    """A decode instance's channel to nobody: what it sends is kept."""

    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def _until_reply(inst, inbox, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not inbox.sent:
        assert time.monotonic() < deadline, "the decode instance never answered"
        inst.work()
        time.sleep(0.001)
    return inbox.sent.pop(0)


def test_pull_from_a_dead_prefill_or_an_expired_offer_fails_and_the_instance_serves_on(exports):
    """Deterministic: the offering process is SIGKILLed after its offer and before the pull
    (a connection to it already open: on JAX 0.10.2 the pulled arrays then fail), and an
    in-process offer expires before its pull (its arrays never become ready, and waiting on
    them would block forever: the instance gives up after ``pull_timeout_s``)."""
    config = cluster_config(
        {
            "export": exports["root"],
            "prefill": [{"name": "p0", "tasks": ["math"]}],
            "decode": [{"name": "d0"}],
            "slots": 2,
            "max_len": 128,
            "min_bucket": 64,
            "pull_timeout_s": 1.0,
        }
    )
    inst = DecodeInstance(config, config.decode[0], warm=False)
    inst.channel = inbox = _Inbox()
    env = {**os.environ, "PYTHONPATH": REPO}
    offerer = subprocess.Popen(
        [sys.executable, "-c", OFFER, exports["root"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        address, leaves = json.loads(offerer.stdout.readline())
        decode = {"op": "decode", "transfer": address, "bucket": 64, "leaves": leaves}
        decode |= {"max_tokens": 3, "ignore_eos": True}
        inst.handle({**decode, "id": "first", "uuid": 4})  # connects, pulls
        assert _until_reply(inst, inbox)["op"] == "started"
        for _ in range(3):
            inst.work()
        assert [m["done"] for m in inbox.sent] == [[], [], ["first"]]
        inbox.sent.clear()
        offerer.send_signal(signal.SIGKILL)
        offerer.wait(30)
        start = time.monotonic()
        inst.handle({**decode, "id": "dead", "uuid": 5})
        reply = _until_reply(inst, inbox)
        assert reply["op"] == "failed" and reply["id"] == "dead", reply
        # the open connection sees the peer close (an error), else the pull times out
        assert "Connection closed" in reply["error"] or "did not arrive" in reply["error"]
        assert time.monotonic() - start < 10
        assert not inst.pulls and not inst.active.any()
    finally:
        if offerer.poll() is None:
            offerer.kill()
            offerer.wait()
    # an offer that expired before its pull, then a good one: the instance still serves
    local = wire.start_transfer_server("127.0.0.1")
    specs = [jax.ShapeDtypeStruct(tuple(shape), dtype) for shape, dtype in leaves]
    arrays = [jnp.zeros(x.shape, x.dtype) for x in specs]
    wire.Offers(local, 0.2).offer(6, arrays)
    time.sleep(1.0)
    decode["transfer"] = local.address()
    inst.handle({**decode, "id": "expired", "uuid": 6})
    start = time.monotonic()
    reply = _until_reply(inst, inbox)
    assert reply["op"] == "failed" and reply["id"] == "expired", reply
    assert "did not arrive in pull_timeout_s=1.0" in reply["error"]
    assert 1.0 <= time.monotonic() - start < 10
    wire.Offers(local, 30).offer(7, arrays)
    inst.handle({**decode, "id": "good", "uuid": 7})
    assert _until_reply(inst, inbox) == {
        "op": "started",
        "id": "good",
        "pull_s": pytest.approx(0, abs=10),
    }
    inst.work()
    assert inbox.sent[-1]["items"][0][0] == "good"


def test_reprefill_lost_completes_every_stream_equal_to_generate(exports):
    """A decode instance SIGKILLed mid-stream with ``reprefill_lost``: its requests run again
    from the prompt on the survivor; every client gets the whole greedy output, token for token
    what ``sunjax.generate`` makes, and the streamed text once, without repeats."""
    n = 200
    tok = exports["tok"]
    ids = tok.encode("Tell me a story")
    with LocalCluster(
        exports["root"],
        prefill={"p0": ["math", "code"]},
        decode=["d0", "d1"],
        compile_cache=exports["cache"],
        reprefill_lost=True,
        **SETTINGS,
    ) as c:
        client = c.client(timeout=60)
        started, streamed = {}, {}

        def stream(i):
            texts, tokens, reason = [], [], None
            for chunk in client.completions.create(
                model=("math", "code")[i % 2],
                prompt=ids,
                max_tokens=n,
                temperature=0,
                logprobs=0,
                stream=True,
            ):
                choice = chunk.choices[0]
                texts.append(choice.text)
                tokens += choice.logprobs.tokens if choice.logprobs else []
                reason = choice.finish_reason or reason
                started.setdefault(i, time.monotonic())
            streamed[i] = (texts, tokens, reason)

        with cf.ThreadPoolExecutor(4) as ex:
            futures = [ex.submit(stream, i) for i in range(4)]
            deadline = time.monotonic() + 60
            while len(started) < 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(started) == 4, "the streams did not start"
            c.kill("d1")
            for f in futures:
                f.result(timeout=120)
        h = c.health()
        assert h["down"] == ["d1"] and h["reprefilled"] == 2, h
        for i in range(4):
            texts, tokens, reason = streamed[i]
            want = reference_ids(exports, ("math", "code")[i % 2], ids, n)
            assert tokens == [tok.decode([t]) for t in want], i
            assert reason == ("length" if len(want) == n else "stop")
            assert "".join(texts) == tok.decode(want, skip_special_tokens=True), i


def test_reprefill_suppresses_the_replayed_tokens_and_fails_a_divergent_rerun():
    """The frontend alone, fed the messages its instances would send: a request lost after
    three tokens re-runs under a new wire id; the re-run's first three tokens are checked and
    not recorded again; a re-run that regenerates a different token ends in an error."""
    config = cluster_config(
        {
            "export": "unused",
            "prefill": [{"name": "p0", "tasks": ["math"]}],
            "decode": [{"name": "d0"}, {"name": "d1"}],
            "control_port": free_port(),
            "slots": 2,
            "max_len": 128,
            "min_bucket": 16,
            "reprefill_lost": True,
        }
    )
    sched = ClusterScheduler(config, TINY)

    def run(wid, tokens):
        """Prefill and decode wire id ``wid`` on the instances the frontend picked."""
        flight = sched.flights[wid]
        sched._handle(
            flight.prefill,
            {"op": "prefilled", "id": wid, "uuid": 1, "token": tokens[0], "bucket": 16}
            | {"leaves": [], "kv_bytes": 0, "prefill_s": 0.0},
        )
        sched._handle(flight.decode, {"op": "started", "id": wid, "pull_s": 0.0})
        for t in tokens[1:]:
            sched._handle(flight.decode, {"op": "tokens", "items": [[wid, t]], "done": []})
        return flight.decode

    def beat(name, epoch):
        role = "prefill" if name == "p0" else "decode"
        msg = {"op": "heartbeat", "role": role, "name": name, "epoch": epoch}
        sched._handle(name, msg | {"transfer": "t", "fingerprint": "f"})

    try:
        for name in ("p0", "d0", "d1"):
            beat(name, name)
        ok = sched.submit(Request(id="ok", model="math", prompt=(1, 2, 3), max_tokens=5))
        sched._dispatch()
        lost = run("ok", [10, 11, 12])
        sched._lose(sched._instance(lost), "test")
        assert sched._health()["reprefilled"] == 1 and not sched.flights
        sched._dispatch()
        survivor = sched.flights["ok~1"].decode
        assert survivor != lost
        sched._handle(lost, {"op": "tokens", "items": [["ok", 99]], "done": []})  # ignored
        run("ok~1", [10, 11, 12, 13, 14])
        assert ok.finish_reason == "length" and ok.tokens == [10, 11, 12, 13, 14]

        bad = sched.submit(Request(id="bad", model="math", prompt=(4, 5), max_tokens=5))
        sched._dispatch()
        run("bad", [20, 21, 22])
        beat(lost, "restarted")  # the lost instance rejoins; then the survivor is lost
        sched._lose(sched._instance(survivor), "test")
        sched._dispatch()
        run("bad~1", [20, 21, 23])
        assert bad.finish_reason == "error" and bad.tokens == [20, 21, 22]
        assert "diverged at token 2: 23 != 22 already sent" in bad.error
        assert sched._health()["reprefilled"] == 2 and not sched.flights and not sched.queue

        # a decode instance whose KV pull failed (the prefill died under it) says retry
        pulled = sched.submit(Request(id="pulled", model="math", prompt=(6,), max_tokens=3))
        sched._dispatch()
        flight = sched.flights["pulled"]
        sched._handle(
            "p0",
            {"op": "prefilled", "id": "pulled", "uuid": 2, "token": 30, "bucket": 16}
            | {"leaves": [], "kv_bytes": 0, "prefill_s": 0.0},
        )
        failed = {"op": "failed", "id": "pulled", "error": "KV pull: closed", "retry": True}
        sched._handle(flight.decode, failed)
        sched._dispatch()
        run("pulled~1", [30, 31, 32])
        assert pulled.finish_reason == "length" and pulled.tokens == [30, 31, 32]
        assert sched._health()["reprefilled"] == 3
    finally:
        sched.close()


def test_a_stalled_frontend_does_not_count_its_own_pause_as_instance_silence():
    """Everything stopped for 3 s (SIGSTOP of the host's jobs, a starved CPU): when the
    frontend runs again, the instances' heartbeats are not in yet; that is no loss. An
    instance silent while the frontend ran is lost."""
    config = cluster_config(
        {
            "export": "unused",
            "prefill": [{"name": "p0", "tasks": ["math"]}],
            "decode": [{"name": "d0"}],
            "control_port": free_port(),
        }
    )
    sched = ClusterScheduler(config, TINY, poll_s=0.0)
    try:
        for name, role in (("p0", "prefill"), ("d0", "decode")):
            msg = {"op": "heartbeat", "role": role, "name": name, "epoch": name}
            sched._handle(name, msg | {"transfer": "t", "fingerprint": "f"})
        sched.step()
        sched._checked -= 3.0  # the frontend's last look was 3 s ago, and so were the beats
        for inst in sched.instances():
            inst.last_seen -= 3.0
        sched.step()
        assert sched.snapshot["down"] == []
        sched._instance("d0").last_seen -= 3.0  # silent while the frontend kept running
        sched.step()
        assert sched.snapshot["down"] == ["d0"]
    finally:
        sched.close()
