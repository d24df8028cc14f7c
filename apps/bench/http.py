"""HTTP vs in-process serving on one workload: ``sunjax bench http --out DIR``.

The same seeded open-loop Poisson workload (``serve.workload``; greedy, prompts as token ids,
so both sides generate the same tokens) is served

* ``in_process``: the scheduler the server builds (``serve.server.main.setup``), replayed
  by ``serve.loop.replay`` in this process;
* ``http``: a ``sunjax serve`` subprocess with the same flags, every request a streamed
  ``/v1/completions`` call from an asyncio client.

Reports throughput (output tokens / wall s), TTFT and TPOT percentiles, the HTTP layer's cost
in tokens/s, and the longest gap between two decode steps while prompts arrive (the server's
``sunjax_decode_step_interval_max_seconds``; in process, timed around the pool step). Writes
``DIR/bench_http.json``. Defaults: the tiny export (``apps.tiny``) on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time

import httpx
import numpy as np

from apps.remote_server import RemoteServer
from apps.tiny import tiny_export
from serve.workload import Arrival, WorkloadConfig, make_workload

TASKS = ("math", "code", "tool", "chat")


def _pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3 if xs else None


def summary(tokens: int, wall: float, ttft: list[float], tpot: list[float], gap: float) -> dict:
    return {
        "output_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "ttft_ms_p50": _pct(ttft, 50),
        "ttft_ms_p99": _pct(ttft, 99),
        "tpot_ms_p50": _pct(tpot, 50),
        "tpot_ms_p99": _pct(tpot, 99),
        "max_decode_step_gap_ms": gap * 1e3,
    }


def in_process(server_args: list[str], arrivals: list[Arrival]) -> dict:
    from serve.loop import replay
    from serve.pool import ensure_cpu_devices
    from serve.server.main import parse_args, setup

    args = parse_args(server_args)
    ensure_cpu_devices(args.workers)
    _, sched = setup(args)
    pool_step, last, gap = sched.pool.step, [None], [0.0]

    def timed_step():
        out = pool_step()
        now = time.perf_counter()
        if last[0] is not None and sched.active.any():
            gap[0] = max(gap[0], now - last[0])
        last[0] = now if sched.active.any() else None
        return out

    sched.pool.step = timed_step
    results, wall = replay(sched, arrivals)
    failed = [r for r in results if r.finish_reason == "refused"]
    if failed:
        raise RuntimeError(f"in-process run refused {len(failed)} requests: {failed[0].error}")
    done = [r for r in results if r.finish_reason in ("stop", "length")]
    return summary(
        sum(len(r.tokens) for r in done),
        wall,
        [r.ttft for r in done if r.ttft is not None],
        [r.tpot for r in done if r.tpot is not None],
        gap[0],
    )


async def _one(client: httpx.AsyncClient, arrival: Arrival, start: float) -> tuple:
    await asyncio.sleep(max(0.0, start + arrival.at - time.perf_counter()))
    req = arrival.request
    body = {
        "model": req.model,
        "prompt": list(req.prompt),
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = end = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{req.id}: HTTP {r.status_code} {await r.aread()}")
        async for line in r.aiter_lines():  # parse only the usage frame: the client shares
            if not line.startswith("data: ") or line == "data: [DONE]":  # the server's CPU
                continue
            if first is None:
                first = time.perf_counter()
            if '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    end = time.perf_counter()
    return tokens, first - sent, (end - first) / (tokens - 1) if tokens > 1 else None, end


async def over_http(server: RemoteServer, arrivals: list[Arrival]) -> dict:
    limits = httpx.Limits(max_connections=len(arrivals))
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        out = await asyncio.gather(*(_one(client, a, start) for a in arrivals))
    wall = max(o[3] for o in out) - start
    gap = server.metrics()[("sunjax_decode_step_interval_max_seconds", ())]
    return summary(
        sum(o[0] for o in out),
        wall,
        [o[1] for o in out],
        [o[2] for o in out if o[2] is not None],
        gap,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sunjax bench http", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--export",
        default=None,
        help="an export; 'smollm2' serves the server's default model (SmolLM2-135M-Instruct "
        "as 'base'); default: a tiny random export",
    )
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=0.0, help="arrivals/s; 0 = all at once")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    server_args = ["--slots", str(args.slots), "--max-len", str(args.max_len)]
    server_args += ["--min-bucket", "64", "--max-queue", str(args.requests)]
    if args.export == "smollm2":  # the server's default model, served as "base"
        from sunjax.hub import load

        tasks, vocab = ["base"], load("smollm2")[0].vocab_size
    else:
        export = args.export or os.path.join(tempfile.mkdtemp(prefix="sunjax-bench-"), "export")
        if args.export is None:
            tiny_export(export, TASKS)
        from sunjax.export import read_manifest

        manifest = read_manifest(export)
        tasks, vocab = manifest["tasks"], manifest["model_config"]["vocab_size"]
        server_args += ["--export", export]
    workload = WorkloadConfig(
        requests=args.requests,
        rate=args.rate,
        zipf_alpha=1.0,
        prompt_len=(8, 64),
        output_len=(16, 128),
        seed=args.seed,
    )
    arrivals = make_workload(workload, tasks, vocab)

    local = in_process(server_args, arrivals)
    print("in_process", json.dumps(local), flush=True)
    with RemoteServer(server_args) as server:
        remote = asyncio.run(over_http(server, arrivals))
    print("http", json.dumps(remote), flush=True)
    result = {
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(shared), JAX CPU backend",
        "model": args.export or "tiny",
        "workload": {**vars(workload), "tasks": tasks},
        "server_args": server_args,
        "in_process": local,
        "http": remote,
        "http_cost_pct_tok_s": 100 * (1 - remote["throughput_tok_s"] / local["throughput_tok_s"]),
    }
    with open(os.path.join(args.out, "bench_http.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
