"""SUN vs conventional through real processes: ``sunjax bench cluster --out DIR``.

One prefill process (every task module) and D decode processes on this host; the frontend is
``ClusterScheduler`` in this process, so every request's timings and KV hand-off are
recorded exactly. The same seeded Zipf workload (all requests at once, ``ignore_eos``) runs
at each alpha under both policies:

* ``sun``: every decode process holds the shared decode tree, least-loaded routing;
* ``conventional``: decode process i holds task i's full tree, model-affine routing.

Writes ``DIR/bench.json``: per policy and alpha, throughput, TTFT / TPOT percentiles,
decode-batch occupancy and the hand-off (frontend-observed seconds from first token to KV
inserted, the decode process's pull + insert, KV bytes per request).

``--overlap`` measures instead what running prefill and decode in separate processes gains
over the single-process serving loop (``serve.loop``, where a prefill stalls every running
stream): the same seeded Zipf workload with Poisson arrivals at each ``--rates`` value, served
(a) by ``serve.loop`` with 2 decode workers x ``--slots`` slots in this process, then (b) by
the cluster (1 prefill + 2 decode processes x ``--slots`` slots, the frontend in this process)
on the same cores. Writes ``DIR/overlap.json``: both summaries and cluster / loop ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

from apps.remote_server import REPO, free_port
from apps.tiny import TINY, tiny_export
from serve.cluster.config import cluster_config
from serve.cluster.frontend import ClusterScheduler
from serve.loop import ServeConfig, build, load_from_export, serve_once
from serve.pool import ensure_cpu_devices
from serve.workload import WorkloadConfig, make_workload

TASKS = ("math", "code")


def _pct(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def start(raw: dict, env: dict, roles=None) -> tuple[str, list[subprocess.Popen]]:
    """Every instance of ``raw`` (or only the ``(role, name)`` pairs in ``roles``) as a
    process; returns the config file's path and the processes."""
    path = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False).name
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    cmd = [sys.executable, "-m", "sunjax.cli", "cluster", "--config", path, "--role"]
    if roles is None:
        roles = [("prefill", s["name"]) for s in raw["prefill"]]
        roles += [("decode", s["name"]) for s in raw["decode"]]
    procs = [subprocess.Popen(cmd + [r, "--name", n], env=env) for r, n in roles]
    return path, procs


def run_policy(policy: str, export: str, args, env: dict) -> dict:
    decode = [{"name": f"d{i}"} for i in range(len(TASKS))]
    if policy == "conventional":
        decode = [{"name": f"d{i}", "model": t} for i, t in enumerate(TASKS)]
    raw = {
        "policy": policy,
        "export": export,
        "frontend": {"control_port": free_port()},
        "prefill": [{"name": "p0", "tasks": list(TASKS)}],
        "decode": decode,
        "slots": args.slots,
        "max_len": 128,
        "min_bucket": 16,
        "log_level": "error",
    }
    path, procs = start(raw, env)
    config = cluster_config(raw)
    sched = ClusterScheduler(config, TINY, poll_s=0.001)
    out = {}
    try:
        sched.wait_ready(600)
        for alpha in args.alphas:
            work = make_workload(
                WorkloadConfig(
                    requests=args.requests,
                    rate=0.0,
                    zipf_alpha=alpha,
                    prompt_len=(8, 48),
                    output_len=(16, 64),
                ),
                list(TASKS),
                TINY.vocab_size,
            )
            for i, t in enumerate(TASKS):  # compile every first pull before timing
                warm = dataclasses.replace(work[0].request, id=f"warm-{alpha}-{i}", model=t)
                sched.submit(warm)
            sched.run_until_idle()
            sched.handoffs.clear()
            steps0, rows0 = sched.decode_steps, sched.decode_rows
            start_t = time.perf_counter()
            sched.results.clear()
            results = [
                sched.submit(
                    dataclasses.replace(a.request, id=f"{alpha}-{a.request.id}", ignore_eos=True)
                )
                for a in work
            ]
            sched.run_until_idle()
            wall = time.perf_counter() - start_t
            bad = [r.finish_reason for r in results if r.finish_reason != "length"]
            if bad:
                raise RuntimeError(f"{len(bad)} requests did not finish: {bad[:3]}")
            tokens = sum(len(r.tokens) for r in results)
            ho = sched.handoffs
            steps = sched.decode_steps - steps0
            out[str(alpha)] = {
                "requests": len(results),
                "tokens": tokens,
                "wall_s": wall,
                "throughput_tok_s": tokens / wall,
                "ttft_ms_p50": 1e3 * _pct([r.ttft for r in results], 50),
                "ttft_ms_p99": 1e3 * _pct([r.ttft for r in results], 99),
                "tpot_ms_p50": 1e3 * _pct([r.tpot for r in results if r.tpot], 50),
                "tpot_ms_p99": 1e3 * _pct([r.tpot for r in results if r.tpot], 99),
                "decode_steps": steps,
                "occupancy": (sched.decode_rows - rows0) / max(steps * args.slots, 1),
                "handoff_ms_p50": 1e3 * _pct([h.seconds for h in ho], 50),
                "handoff_ms_p99": 1e3 * _pct([h.seconds for h in ho], 99),
                "pull_insert_ms_p50": 1e3 * _pct([h.pull_seconds for h in ho], 50),
                "pull_insert_ms_p99": 1e3 * _pct([h.pull_seconds for h in ho], 99),
                "kv_bytes_p50": _pct([h.kv_bytes for h in ho], 50),
                "kv_bytes_max": max(h.kv_bytes for h in ho),
                "per_model": {t: sum(r.model == t for r in results) for t in TASKS},
            }
            print(policy, alpha, json.dumps(out[str(alpha)]), flush=True)
    finally:
        sched.close()
        _stop(procs)
        os.unlink(path)
    return out


def _workload(args, rate: float, alpha: float, tag: str):
    """The seeded arrivals of one (rate, alpha) cell, ``ignore_eos``, ids tagged ``tag``."""
    work = make_workload(
        WorkloadConfig(
            requests=args.requests,
            rate=rate,
            zipf_alpha=alpha,
            prompt_len=(8, 48),
            output_len=(16, 64),
        ),
        list(TASKS),
        TINY.vocab_size,
    )
    return [
        dataclasses.replace(
            a,
            request=dataclasses.replace(a.request, id=f"{tag}-{a.request.id}", ignore_eos=True),
        )
        for a in work
    ]


def _summary(results, wall: float) -> dict:
    done = [r for r in results if r.finish_reason == "length"]
    if len(done) != len(results):
        bad = [r.finish_reason for r in results if r.finish_reason != "length"]
        raise RuntimeError(f"{len(bad)} requests did not finish: {bad[:3]}")
    tokens = sum(len(r.tokens) for r in done)
    ttft, tpot = [r.ttft for r in done], [r.tpot for r in done if r.tpot]
    return {
        "requests": len(done),
        "tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "ttft_ms_p50": 1e3 * _pct(ttft, 50),
        "ttft_ms_p99": 1e3 * _pct(ttft, 99),
        "tpot_ms_p50": 1e3 * _pct(tpot, 50),
        "tpot_ms_p99": 1e3 * _pct(tpot, 99),
    }


def _replay(sched: ClusterScheduler, arrivals) -> tuple[list, float]:
    """``serve.loop.replay`` for the frontend (whose ``busy`` is always true)."""
    start = time.perf_counter()
    results, i = [], 0
    while i < len(arrivals) or sched.queue or sched.flights:
        now = time.perf_counter() - start
        while i < len(arrivals) and arrivals[i].at <= now:
            results.append(sched.submit(arrivals[i].request, arrival=start + arrivals[i].at))
            i += 1
        sched.step()
    return results, time.perf_counter() - start


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def overlap(export: str, args, env: dict) -> dict:
    """Each (rate, alpha) cell served by (b) ``serve.loop`` here (2 workers x ``slots``), then
    at once by (a) the cluster (1 prefill + 2 decode processes x ``slots``, the frontend
    here); both SUN, least-loaded. The cells alternate between the two so that a change in
    the machine's background load hits both alike."""
    config = ServeConfig(
        loader="export",
        export=export,
        tasks=TASKS,
        workers=2,
        slots_per_worker=args.slots,
        max_len=128,
        min_bucket=16,
    )
    models = load_from_export(config)
    pool, router = build(config, models)
    raw = {
        "policy": "sun",
        "export": export,
        "frontend": {"control_port": free_port()},
        "prefill": [{"name": "p0", "tasks": list(TASKS)}],
        "decode": [{"name": "d0"}, {"name": "d1"}],
        "slots": args.slots,
        "max_len": 128,
        "min_bucket": 16,
        "log_level": "error",
    }
    path, procs = start(raw, env)
    sched = ClusterScheduler(cluster_config(raw), TINY, poll_s=0.001)
    loop, cluster = {}, {}
    try:
        sched.wait_ready(600)
        warm = _workload(args, 0.0, 1.0, "warm")[:16]
        serve_once(config, models, pool, router, warm)
        _replay(sched, warm)
        for rate in args.rates:
            for alpha in args.alphas:
                cell = f"rate={rate:g},alpha={alpha:g}"
                arrivals = _workload(args, rate, alpha, f"loop-{cell}")
                summary, results = serve_once(config, models, pool, router, arrivals)
                loop[cell] = _summary(results, summary["wall_s"])
                arrivals = _workload(args, rate, alpha, f"cluster-{cell}")
                results, wall = _replay(sched, arrivals)
                cluster[cell] = _summary(results, wall)
                for name, s in (("loop", loop[cell]), ("cluster", cluster[cell])):
                    s["load_average_1min"] = os.getloadavg()[0]
                    print(name, cell, json.dumps(s), flush=True)
    finally:
        sched.close()
        _stop(procs)
        os.unlink(path)
    keys = ("throughput_tok_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")
    ratio = {
        cell: {k: cluster[cell][k] / loop[cell][k] for k in keys if loop[cell][k]} for cell in loop
    }
    meta = {
        "model": "apps.tiny.TINY (random, 2 layers, d_model 64, SmolLM2 vocabulary)",
        "cluster": f"1 prefill + 2 decode processes x {args.slots} slots + the frontend",
        "loop": f"serve.loop in one process: 2 decode workers x {args.slots} slots",
        "requests": args.requests,
        "arrivals": "Poisson at each rate (req/s); ignore_eos; prompts 8-48, outputs 16-64",
        "cpus": os.cpu_count(),
    }
    return {"meta": meta, "loop": loop, "cluster": cluster, "cluster_over_loop": ratio}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sunjax bench cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--alphas", default="0,1,1.5")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--slots", type=int, default=8, help="decode slots per decode process")
    ap.add_argument("--overlap", action="store_true", help="cluster vs serve.loop instead")
    ap.add_argument("--rates", default="15,1000", help="--overlap: arrival rates (req/s)")
    args = ap.parse_args(argv)
    args.alphas = [float(a) for a in args.alphas.split(",")]
    args.rates = [float(r) for r in args.rates.split(",")]
    ensure_cpu_devices(2)  # --overlap: serve.loop's two decode workers
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="sunjax-bench-cluster-")
    export = os.path.join(work, "exp")
    tiny_export(export, TASKS)
    cache = os.path.join(work, "jax-cache")
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    if args.overlap:
        load_before = os.getloadavg()
        report = overlap(export, args, env)
        report["meta"] |= {
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        }
        with open(os.path.join(args.out, "overlap.json"), "w") as f:
            json.dump(report, f, indent=2)
        return 0
    results = {p: run_policy(p, export, args, env) for p in ("sun", "conventional")}
    meta = {
        "model": "apps.tiny.TINY (random, 2 layers, d_model 64, SmolLM2 vocabulary)",
        "processes": f"1 prefill + {len(TASKS)} decode + this frontend",
        "slots_per_decode_process": args.slots,
        "requests": args.requests,
        "arrivals": "all at once; ignore_eos; prompts 8-48, outputs 16-64 tokens",
    }
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0
