"""Soak a live ``sunjax serve``: ``python -m apps.soak --out DIR [--requests 1000]``.

``--requests`` requests over the served task models at ``--concurrency``, mixing streamed and
whole responses and sampling settings (greedy, temperature, top-k, top-p, seeds, stop strings,
n), with ``--cancel`` of them cancelled or disconnected at a random point. Nothing may be lost:
every request ends in a complete response or in our own cancellation; afterwards the running
and waiting gauges are 0; the server's RSS grows less than 10 % between the end of the second
quarter and the end. Writes ``DIR/soak.json``; exit status 1 if a check fails.
``run_soak(server, models, ...)`` is the same against a server you started (the CI test runs
a short version).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import time

import httpx

from apps.remote_server import RemoteServer
from apps.tiny import tiny_export

TASKS = ("math", "code", "tool", "chat")
PROMPTS = ("Write a haiku.", "What is 2+2?", "List three colors.", "Explain SUN briefly.")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _body(rng: random.Random, models: list[str], max_tokens: int) -> dict:
    chat = rng.random() < 0.5
    body: dict = {"model": rng.choice(models), "max_tokens": rng.randint(4, max_tokens)}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    mode = rng.choice(("greedy", "temperature", "top_k", "top_p", "n", "stop"))
    if mode != "greedy":
        body |= {"temperature": rng.choice((0.5, 1.0)), "seed": rng.randrange(2**31)}
    if mode == "top_k":
        body["top_k"] = rng.choice((5, 50))
    elif mode == "top_p":
        body["top_p"] = 0.9
    elif mode == "n":
        body["n"] = 2
    elif mode == "stop":
        body["stop"] = ["\n\n", "e"]
    if rng.random() < 0.5:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def _request(client: httpx.AsyncClient, body: dict) -> str:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if not body.get("stream"):
        r = await client.post(path, json=body)
        if r.status_code != 200:
            return f"http {r.status_code}: {r.text[:200]}"
        reasons = [c["finish_reason"] for c in r.json()["choices"]]
        ok = len(reasons) == body.get("n", 1) and set(reasons) <= {"stop", "length"}
        return "ok" if ok else f"bad finish {reasons}"
    finished, done = 0, False
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return f"http {r.status_code}"
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                for c in chunk.get("choices", []):
                    if c.get("finish_reason") in ("stop", "length"):
                        finished += 1
            elif line.startswith("event: error"):
                return "error event"
    return "ok" if done and finished == body.get("n", 1) else f"incomplete stream {finished}"


async def _soak(server, models, requests, concurrency, cancel, max_tokens, seed, on_quarter):
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    quarters = {requests * k // 4 for k in (1, 2, 3, 4)}
    finished = 0

    async def one(i: int, client: httpx.AsyncClient):
        nonlocal finished
        body = _body(rng, models, max_tokens)
        cut = rng.random() < cancel
        async with sem:
            task = asyncio.ensure_future(_request(client, body))
            if cut:
                await asyncio.wait({task}, timeout=rng.uniform(0.0, 0.5))
                if not task.done():
                    task.cancel()
                    outcome = "cancelled"
                else:
                    outcome = task.result()
            else:
                outcome = await task
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        finished += 1
        if finished in quarters:
            on_quarter(finished)

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(
        base_url=server.url, headers=server.headers(), timeout=300, limits=limits
    ) as client:
        await asyncio.gather(*(one(i, client) for i in range(requests)))
    return outcomes


def run_soak(
    server: RemoteServer,
    models: list[str],
    *,
    requests: int,
    concurrency: int,
    cancel: float = 0.2,
    max_tokens: int = 64,
    seed: int = 0,
) -> dict:
    rss: dict[int, float] = {}
    start = time.perf_counter()
    outcomes = asyncio.run(
        _soak(
            server,
            models,
            requests,
            concurrency,
            cancel,
            max_tokens,
            seed,
            lambda n: rss.__setitem__(n, rss_mb(server.proc.pid)),
        )
    )
    wall = time.perf_counter() - start
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = server.gauge_sum("sunjax_requests_running")
        waiting = server.gauge_sum("sunjax_requests_waiting")
        if running == waiting == 0:
            break
        time.sleep(0.1)
    marks = sorted(rss)
    growth = 100 * (rss[marks[-1]] / rss[marks[1]] - 1) if len(marks) >= 2 else 0.0
    lost = {k: v for k, v in outcomes.items() if k not in ("ok", "cancelled")}
    return {
        "requests": requests,
        "concurrency": concurrency,
        "outcomes": outcomes,
        "lost": lost,
        "wall_s": wall,
        "gauges_after": {"running": running, "waiting": waiting},
        "rss_mb_at_quarters": {str(k): rss[k] for k in marks},
        "rss_growth_q2_to_end_pct": growth,
        "max_decode_step_gap_ms": 1e3
        * server.metrics()[("sunjax_decode_step_interval_max_seconds", ())],
        "passed": not lost and running == waiting == 0 and growth < 10,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apps.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--cancel", type=float, default=0.2)
    ap.add_argument("--slots", type=int, default=16)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    export = os.path.join(tempfile.mkdtemp(prefix="sunjax-soak-"), "export")
    tiny_export(export, TASKS)
    server_args = ["--export", export, "--slots", str(args.slots), "--max-len", "256"]
    server_args += ["--min-bucket", "64", "--max-queue", str(args.requests)]
    with RemoteServer(server_args) as server:
        result = run_soak(
            server,
            list(TASKS),
            requests=args.requests,
            concurrency=args.concurrency,
            cancel=args.cancel,
        )
    result["hardware"] = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), JAX CPU"
    result["server_args"] = server_args
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
