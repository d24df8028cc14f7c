"""The simulator against the real engine on this machine.

``validate`` measures a step-time table (``apps.bench.steps.StepBench``) for the serving setup
of a ``configs/serve`` YAML, replays the same seeded workloads through the real serving loop
(``serve.loop.build`` + ``serve_once``, as ``sunjax bench serve`` does) and through the model
in ``engine`` mode, and reports both and the relative error of throughput, TPOT (p50) and
decode steps per policy and Zipf alpha.

The table and the real runs are measured interleaved: round ``r`` of the table, then repeat
``r`` of every real workload (in a shuffled order), and so on. On a shared VM the machine's
speed drifts by tens of percent over seconds; measured one after the other, the table and
the runs would see different machines, and the comparison would test the drift, not the
model. Interleaved, both medians sample the same stretch of time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence

import numpy as np

from apps.bench.steps import StepBench, StepsConfig, ensure_cpu_devices
from apps.simulate.model import ClusterConfig, from_arrivals, simulate

KEYS = ("throughput_tok_s", "tpot_ms_p50", "decode_steps")


def rel_err(pred: float, real: float) -> float:
    return abs(pred - real) / abs(real)


def validate(
    config_path: str,
    *,
    alphas: Sequence[float] = (0.0, 1.0, 1.5),
    requests: int | None = None,
    policies: Sequence[str] = ("sun",),
    steps: StepsConfig | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Per policy and alpha: the real loop ``repeats`` times (median of each metric, and the
    spread ``max / min - 1`` of its throughput: the machine's run-to-run noise) beside the
    model's prediction from a table of ``repeats`` rounds taken between them."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    from serve.loop import LOADERS, build, load_config, serve_once
    from serve.workload import make_workload

    base = load_config(config_path)
    ensure_cpu_devices(base.workers)
    steps = steps or StepsConfig(
        workers=base.workers,
        slots_per_worker=base.slots_per_worker,
        max_len=base.max_len,
        min_bucket=base.min_bucket,
        trees=tuple(policies),
    )
    bench = StepBench(steps)
    models = LOADERS[base.loader](base)
    tasks = sorted(models.prefill)

    def arrivals_for(config, **workload):
        wl = dataclasses.replace(config, workload=dict(base.workload, **workload))
        return make_workload(wl.workload_config, tasks, models.cfg.vocab_size)

    cells = []  # (policy, alpha, config, pool, router, arrivals)
    for policy in policies:
        config = dataclasses.replace(base, policy=policy)
        pool, router = build(config, models)
        serve_once(config, models, pool, router, arrivals_for(config, requests=8))  # compile
        for alpha in alphas:
            more = {"requests": requests} if requests else {}
            arrivals = arrivals_for(config, zipf_alpha=alpha, **more)
            cells.append((policy, alpha, config, pool, router, arrivals))
    runs: list[list[dict]] = [[] for _ in cells]
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        bench.round()
        for i in rng.permutation(len(cells)):
            _, _, config, pool, router, arrivals = cells[i]
            runs[i].append(serve_once(config, models, pool, router, arrivals)[0])
    table = bench.table()
    rows = []
    for (policy, alpha, _, _, _, arrivals), reps in zip(cells, runs, strict=True):
        real = {k: float(np.median([r[k] for r in reps])) for k in KEYS}
        tput = [r["throughput_tok_s"] for r in reps]
        sim = simulate(
            ClusterConfig(
                policy=policy,
                mode="engine",
                decode_instances=base.workers,
                slots=base.slots_per_worker,
            ),
            table,
            from_arrivals(arrivals),
            tasks=tasks,
        )
        row = {"policy": policy, "zipf_alpha": alpha, "noise": max(tput) / min(tput) - 1}
        for k in KEYS:
            row[f"real_{k}"] = real[k]
            row[f"sim_{k}"] = sim[k]
            row[f"err_{k}"] = rel_err(sim[k], real[k])
        rows.append(row)
    return {
        "config": config_path,
        "repeats": repeats,
        "table_drift": bench.drift(),
        "table": table.to_json(),
        "rows": rows,
    }


# -- the cluster: ``sunjax cluster``'s processes against the model's cluster mode -------------
class ClusterFeed:
    """``StepBench``'s feed for a decode instance of ``sunjax cluster``
    (``serve.cluster.instances.DecodeInstance``): no prefill runs in the decode process.

    * hand-off: a real prefill process (``PrefillInstance``, started from ``raw`` beside the
      cluster under test, answering this object's own ``wire.Hub``) prefills and offers the
      prompt; here it is pulled over ``jax.experimental.transfer`` (``wire.Puller``) onto the
      pool's device and inserted, as ``DecodeInstance.take`` + ``land`` do. Samples: the
      prefill as the prefill process times it (``prefill_s``), the pull + insert (the
      table's hand-off), and one control-message hop, ``(round trip - prefill_s) / 2`` (the
      offer, JSON and ZeroMQ both ways);
    * step: ``DecodeInstance.work`` itself (on an instance shell around the bench's pool and
      a ZeroMQ channel to the hub) with its ``pool.step`` timed inside: the step is the
      table's decode sample, the rest of one loop iteration (``beat``, ``recv``, the tokens
      message) is the decode process's host work per step, the table's ``host_step``.
    """

    def __init__(self, raw: dict, env: dict):
        from apps.bench.cluster import start
        from serve.cluster import wire
        from serve.cluster.config import cluster_config

        self.wire = wire
        self.config = cluster_config(raw)
        self.name = self.config.prefill[0].name
        self.tasks = list(self.config.prefill[0].tasks)
        self.hub = wire.Hub(f"tcp://{self.config.host}:{self.config.control_port}")
        self.channel = wire.Channel(self.config.control_address, "feed-decode")
        self.path, self.procs = start(raw, env, roles=[("prefill", self.name)])
        self.transfer: str | None = None
        self.server = self.puller = None
        self._n = 0
        self.ahead: tuple[str, int, int] | None = None  # a prefill sent before a step

    def _recv(self, want: str | None, timeout_s: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _, msg in self.hub.recv(0.05):
                if msg["op"] == "heartbeat":
                    self.transfer = msg["transfer"]
                    if want is None:
                        return msg
                elif want is not None and msg.get("id") == want:
                    if msg["op"] != "prefilled":
                        raise RuntimeError(f"feed prefill failed: {msg}")
                    return msg
        raise TimeoutError(f"no answer from prefill {self.name!r} in {timeout_s} s")

    def warm(self, bench) -> None:
        if any(p.poll() is not None for p in self.procs):
            raise RuntimeError("the feed's prefill process exited")
        self._recv(None)  # the prefill instance is up (compiled) and says where it offers
        self.server = self.wire.start_transfer_server(self.config.host)
        self.puller = self.wire.Puller(self.server, bench.cfg)
        W, B = bench.config.workers, bench.config.slots_per_worker
        for pool in bench.trees.values():
            for n in bench.lengths:  # compile each bucket's pulled-prefix insert
                for _ in range(2):
                    self.handoff(bench, pool, n, 0, W - 1, B - 1, record=False)
            pool.set_active(np.zeros(pool.slots, bool))
            self.step(bench, pool, 1, record=False)

    def _send(self, bench, n: int, task: int, model: str | None = None) -> str:
        self._n += 1
        rid = f"feed-{self._n}"
        self.hub.send(
            self.name,
            {
                "op": "prefill",
                "id": rid,
                "model": model or self.tasks[task % len(self.tasks)],
                "prompt": [1] * min(n, bench.config.max_len - 1),  # bucket n (one to generate)
                "max_tokens": 1,
                "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0},
                "logprobs": False,
            },
        )
        return rid

    def _hop(self, bench) -> float:
        """Half a control round trip: a prefill of a task the instance does not hold, which
        it answers at once with ``failed``."""
        t0 = time.perf_counter()
        rid = self._send(bench, 1, 0, model="not-a-task")
        while True:
            got = [m for _, m in self.hub.recv(0.05) if m.get("id") == rid]
            if got:
                return (time.perf_counter() - t0) / 2

    def handoff(self, bench, pool, n: int, task: int, worker: int, slot: int, record=True):
        """The prompt's prefill (sent before the previous timed step when ``record``, so it
        runs beside that step as the cluster runs them), then pull + insert into the slot."""
        import jax

        if self.ahead is not None and self.ahead[1:] == (n, task):
            rid = self.ahead[0]
        else:
            rid = self._send(bench, n, task)
        self.ahead = None
        msg = self._recv(rid, 60.0)
        hop = self._hop(bench)
        t1 = time.perf_counter()
        prefix = self.puller.pull(
            self.transfer,
            int(msg["uuid"]),
            int(msg["bucket"]),
            msg["leaves"],
            device=pool.devices[worker],
        )
        t2 = time.perf_counter()
        while not self.wire.ready(prefix):
            pass
        jax.block_until_ready(prefix)
        t3 = time.perf_counter()
        pool.insert(prefix, worker, slot)
        jax.block_until_ready(pool.state.tokens)
        t4 = time.perf_counter()
        self.hub.send(self.name, {"op": "release", "uuid": msg["uuid"]})
        if record:
            s = bench.samples
            s["prefill"].setdefault(n, []).append(float(msg["prefill_s"]))
            s["handoff"].setdefault(n, []).append(t4 - t1)
            s.setdefault("handoff_decode", {}).setdefault(n, []).append(t2 - t1 + t4 - t3)
            s.setdefault("hop", []).append(hop)

    def step(self, bench, pool, b: int, record=True) -> float:
        """One iteration of the decode process's loop with ``b`` slots running."""
        from serve.cluster.instances import DecodeInstance, _Slot

        W, B = bench.config.workers, bench.config.slots_per_worker
        active = np.zeros(W * B, bool)
        for i in range(b):
            active[(i % W) * B + i // W] = True
        inst = object.__new__(DecodeInstance)  # the real loop code around the bench's pool
        inst.config, inst.spec, inst.epoch = self.config, self.config.decode[0], "feed"
        inst.group, inst.pulls, inst.remote, inst.pool = None, {}, {}, pool
        inst.channel, inst._next_beat, inst.server = self.channel, float("inf"), self.server
        inst.active = active
        inst.slots = [
            _Slot(f"s{i}", 10**9, frozenset(), False) if a else None for i, a in enumerate(active)
        ]
        inner, timed = pool.step, []

        def step():
            t = time.perf_counter()
            out = inner()
            timed.append(time.perf_counter() - t)
            return out

        pool.step = step
        if record:  # the next hand-off's prefill runs beside this step, as in the cluster
            n = bench.lengths[bench._fed % len(bench.lengths)]
            task = bench._fed % bench.config.tasks
            self.ahead = (self._send(bench, n, task), n, task)
        try:
            t0 = time.perf_counter()
            inst.beat()
            inst.channel.recv(inst.wait())
            inst.work()
            total = time.perf_counter() - t0
        finally:
            del pool.step
        if record:
            bench.samples.setdefault("host", {}).setdefault(b, []).append(total - timed[0])
        return timed[0]

    def finish(self, bench, table):
        import statistics

        from apps.simulate.tables import Curve

        host, dec = bench.samples["host"], bench.samples["handoff_decode"]
        xs = sorted(host)
        return dataclasses.replace(
            table,
            host_step=Curve(x=xs, seconds=[statistics.median(host[b]) for b in xs]),
            handoff_decode=Curve(
                x=table.handoff.x, seconds=[statistics.median(dec[n]) for n in bench.lengths]
            ),
            hop=statistics.median(bench.samples["hop"]),
            meta={**table.meta, "feed": "cluster decode instance (ClusterFeed)"},
        )

    def close(self) -> None:
        from apps.bench.cluster import _stop

        _stop(self.procs)
        os.unlink(self.path)
        self.channel.close()
        self.hub.close()


def validate_cluster(
    *,
    alphas: Sequence[float] = (0.0, 1.0, 1.5),
    requests: int = 120,
    repeats: int = 3,
    slots: int = 8,
    decode: int = 1,
    steps: int = 8,
    seed: int = 0,
) -> dict:
    """``sunjax cluster`` on this host (1 prefill process holding both tasks of
    ``apps.bench.cluster.TASKS`` + ``decode`` SUN decode processes of ``slots`` slots, the
    frontend ``ClusterScheduler`` here) against the model in cluster mode with one shared
    prefill instance and the frontend's slot-before-prefill routing. The same seeded
    workloads as ``sunjax bench cluster`` (all requests at once: saturating) at each alpha,
    ``repeats`` times in a shuffled order, each repeat after one round of the table of a
    decode instance (``ClusterFeed``)."""
    import tempfile
    import types

    from apps.bench.cluster import TASKS, _replay, _stop, _summary, _workload, start
    from apps.remote_server import REPO, free_port
    from apps.tiny import TINY, tiny_export
    from serve.cluster.config import cluster_config
    from serve.cluster.frontend import ClusterScheduler

    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    ensure_cpu_devices(1)
    work = tempfile.mkdtemp(prefix="sunjax-validate-cluster-")
    export = os.path.join(work, "exp")
    tiny_export(export, TASKS)
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "JAX_COMPILATION_CACHE_DIR": os.path.join(work, "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }

    def raw_for(decodes: int) -> dict:
        return {
            "policy": "sun",
            "export": export,
            "frontend": {"control_port": free_port()},
            "prefill": [{"name": "p0", "tasks": list(TASKS)}],
            "decode": [{"name": f"d{i}"} for i in range(decodes)],
            "slots": slots,
            "max_len": 128,
            "min_bucket": 16,
            "log_level": "error",
        }

    raw = raw_for(decode)
    path, procs = start(raw, env)
    feed = sched = None
    try:
        sched = ClusterScheduler(cluster_config(raw), TINY, poll_s=0.001)
        feed = ClusterFeed(raw_for(1), env)
        bench = StepBench(
            StepsConfig(
                model="apps.tiny:TINY",
                workers=1,
                slots_per_worker=slots,
                max_len=128,
                min_bucket=16,
                steps=steps,
                trees=("sun",),
                host_requests=0,
                tasks=len(TASKS),
                seed=seed,
            ),
            feed=feed,
        )
        sched.wait_ready(600)
        phases: dict[str, list[float]] = {}
        handle = sched._handle

        def record(name: str, msg: dict) -> None:  # the real calls' own timings, per phase
            op = msg.get("op")
            if op == "prefilled":
                phases.setdefault("prefill", []).append(float(msg["prefill_s"]))
            elif op == "tokens" and "step_s" in msg:
                phases.setdefault("step", []).append(float(msg["step_s"]))
                phases.setdefault("tokens_at", []).append(time.perf_counter())
                phases.setdefault("batch", []).append(len(msg["items"]))
            handle(name, msg)

        sched._handle = record
        ns = types.SimpleNamespace(requests=requests)
        _replay(sched, _workload(types.SimpleNamespace(requests=16), 0.0, 1.0, "warm"))
        runs: list[list[dict]] = [[] for _ in alphas]
        rng = np.random.default_rng(seed)
        for r in range(repeats):
            bench.round()
            for i in rng.permutation(len(alphas)):
                arrivals = _workload(ns, 0.0, alphas[i], f"r{r}-a{alphas[i]:g}")
                steps0 = sched.decode_steps
                phases.clear()
                sched.handoffs.clear()
                results, wall = _replay(sched, arrivals)
                out = _summary(results, wall)
                out["decode_steps"] = sched.decode_steps - steps0
                out["phases_ms_p50"] = _phases(phases, sched.handoffs, decode)
                runs[i].append(out)
        table = bench.table()
        rows = []
        for alpha, reps in zip(alphas, runs, strict=True):
            arrivals = _workload(ns, 0.0, alpha, "sim")
            real = {k: float(np.median([x[k] for x in reps])) for k in KEYS}
            tput = [x["throughput_tok_s"] for x in reps]
            sim = simulate(
                ClusterConfig(
                    policy="sun",
                    mode="cluster",
                    decode_instances=decode,
                    slots=slots,
                    prefill_instances=1,
                    prefill_shared=True,
                    route="before_prefill",
                ),
                table,
                from_arrivals(arrivals),
                tasks=list(TASKS),
            )
            row = {"policy": "sun", "zipf_alpha": alpha, "noise": max(tput) / min(tput) - 1}
            for k in KEYS:
                row[f"real_{k}"] = real[k]
                row[f"sim_{k}"] = sim[k]
                row[f"err_{k}"] = rel_err(sim[k], real[k])
            row["real_repeats"] = reps
            row["sim"] = sim
            row["phases_ms_p50"] = {
                "real": {
                    k: float(np.median([x["phases_ms_p50"][k] for x in reps]))
                    for k in reps[0]["phases_ms_p50"]
                },
                "table": _table_phases(table, from_arrivals(arrivals), slots),
            }
            rows.append(row)
    finally:
        if sched is not None:
            sched.close()
        if feed is not None:
            feed.close()
        _stop(procs)
        os.unlink(path)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "cluster": f"1 prefill process ({', '.join(TASKS)}) + {decode} SUN decode process(es) "
        f"x {slots} slots + the frontend (ClusterScheduler) in the validating process",
        "workload": f"{requests} requests at once, prompts 8-48, outputs 16-64, ignore_eos",
        "repeats": repeats,
        "table_drift": bench.drift(),
        "table": table.to_json(),
        "rows": rows,
    }


def _phases(phases: dict, handoffs, decodes: int) -> dict:
    """Medians (ms) of one real run's phases, from the cluster's own messages: the prefill
    process's ``prefill_s``, the decode process's pull + insert (``started``'s ``pull_s``)
    and the frontend's hand-off (prefilled -> started), the decode step (``tokens``'
    ``step_s``), and (one decode process) the time between its tokens messages: one loop
    iteration of the decode process, step and host work and any pulls and inserts."""
    ms = lambda v: 1e3 * float(np.median(v)) if len(v) else None
    at = np.asarray(phases.get("tokens_at", []))
    return {
        "prefill": ms(phases.get("prefill", [])),
        "pull_insert": ms([h.pull_seconds for h in handoffs]),
        "handoff_frontend": ms([h.seconds for h in handoffs]),
        "step": ms(phases.get("step", [])),
        "iteration": ms(np.diff(at)) if decodes == 1 and len(at) > 1 else None,
        "iteration_mean": 1e3 * float(np.mean(np.diff(at)))
        if decodes == 1 and len(at) > 1
        else None,
        "batch": float(np.median(phases["batch"])) if phases.get("batch") else None,
    }


def _table_phases(table, requests, slots: int) -> dict:
    """What the table charges for the same phases (ms, medians over ``requests``; the step
    at a full batch and the median context a request reaches halfway)."""
    ctx = float(np.median([r.prompt_len + r.output_len / 2 for r in requests]))
    step = table.decode_time("sun", slots, ctx)
    return {
        "prefill": 1e3 * float(np.median([table.prefill_time(r.prompt_len) for r in requests])),
        "pull_insert": 1e3 * float(np.median([table.handoff_time(r.prompt_len) for r in requests])),
        "handoff_frontend": 1e3
        * float(np.median([table.handoff_time(r.prompt_len) + 2 * table.hop for r in requests])),
        "step": 1e3 * step,
        "iteration": 1e3 * (step + table.host_time(slots)),
        "handoff_decode": 1e3
        * float(np.median([table.handoff_decode_time(r.prompt_len) for r in requests])),
        "hop": 1e3 * table.hop,
    }
