"""Prefill in the serving scheduler: prefix-cache savings, chunked-prefill stalls, batched
prefill throughput (issue 13, third part).

    sunjax bench prefill --out reports/paged [--tiny]

(a) ``prefix``: ``--requests`` requests of one task model share a ``--system``-token prompt
    head and differ in a ``--suffix``-token tail; the paged scheduler serves them (``--new``
    tokens each) with ``prefix_cache`` off and on.  Reports hits, prompt tokens prefilled and
    saved, the median time to first token and the wall time.
(b) ``stall``: ``--streams`` requests decode; then a ``--long``-token prompt arrives.  Worst
    and median wall time of one ``Scheduler.step`` (admission + one decode step) while it is
    being prefilled: whole in the loop (``prefill_chunk=0``) vs in chunks of ``--chunk``
    (one per step); and the long prompt's time to first token.
(c) ``batch``: ``--batch-prompts`` prompts of one model (lengths uniform in ``--batch-len``)
    prefilled one ``Engine.prefill`` call each vs ``Engine.prefill_batch`` calls of at most
    ``--batch-tokens`` true tokens; prompt tokens per second.

Every variant is run ``WARM`` times untimed, then ``--runs`` times; medians are reported.  Model:
``configs/models/tiny.yaml`` (random float32 weights); one decode worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

import sunjax
from serve.engine import Engine, EngineConfig, sampling_params
from serve.pool import DecodePool
from serve.router import LeastLoaded
from serve.scheduler import Request, Scheduler
from sunjax.configs import load_model_config

CONFIG = "configs/models/tiny.yaml"
WARM = 2  # untimed runs first: compiles (the 2nd scheduler on a pool still compiles once)


def _config(args, slots: int) -> EngineConfig:
    return EngineConfig(
        slots_per_worker=slots, max_len=args.max_len, page_size=args.page_size, min_bucket=16
    )


def prefix(cfg, decode, task, args) -> dict:
    rng = np.random.default_rng(args.seed)
    system = tuple(rng.integers(0, cfg.vocab_size, args.system).tolist())
    prompts = [
        system + tuple(rng.integers(0, cfg.vocab_size, args.suffix).tolist())
        for _ in range(args.requests)
    ]
    pool = DecodePool(cfg, _config(args, args.slots), decode_params=decode)
    out = {}
    for cached in (False, True):
        runs = []
        for run in range(args.runs + WARM):
            sched = Scheduler(pool, {"m": task}, LeastLoaded(1), prefix_cache=cached)
            t0 = time.perf_counter()
            for i, p in enumerate(prompts):
                sched.submit(Request(id=f"p{i}", model="m", prompt=p, max_tokens=args.new))
            sched.run_until_idle()
            wall = time.perf_counter() - t0
            ttft = statistics.median(r.ttft for r in sched.results.values())
            if run >= WARM:
                runs.append((wall, ttft))
            hits, saved, done = sched.prefix_hits, sched.prefix_tokens_saved, sched.prefill_tokens
        row = {
            "prefix_cache": cached,
            "prefix_hits": hits,
            "prompt_tokens": args.requests * (args.system + args.suffix),
            "prefilled_tokens": done,
            "tokens_saved": saved,
            "wall_s": statistics.median(w for w, _ in runs),
            "ttft_median_s": statistics.median(t for _, t in runs),
        }
        out["on" if cached else "off"] = row
        print(
            f"prefix cache {'on ' if cached else 'off'}  hits {hits:3d}  prefilled {done:6d}  "
            f"saved {saved:6d}  wall {row['wall_s']:6.3f} s  "
            f"median TTFT {row['ttft_median_s'] * 1e3:7.1f} ms",
            flush=True,
        )
    out["wall_ratio_off_over_on"] = out["off"]["wall_s"] / out["on"]["wall_s"]
    out["ttft_ratio_off_over_on"] = out["off"]["ttft_median_s"] / out["on"]["ttft_median_s"]
    return out


def stall(cfg, decode, task, args) -> dict:
    rng = np.random.default_rng(args.seed + 1)
    long = tuple(rng.integers(0, cfg.vocab_size, args.long).tolist())
    pool = DecodePool(cfg, _config(args, args.streams + 1), decode_params=decode)
    out = {}
    for chunk in (0, args.chunk):
        runs = []
        for run in range(args.runs + WARM):
            sched = Scheduler(
                pool, {"m": task}, LeastLoaded(1), prefill_chunk=chunk, prefills_per_step=1
            )
            for i in range(args.streams):
                prompt = tuple(rng.integers(0, cfg.vocab_size, 8).tolist())
                new = args.max_len - len(prompt)
                sched.submit(Request(id=f"s{i}", model="m", prompt=prompt, max_tokens=new))
            for _ in range(4):  # streams decoding
                sched.step()
            res = sched.submit(Request(id="long", model="m", prompt=long, max_tokens=2))
            during = []
            while res.first_token_at is None:
                t0 = time.perf_counter()
                sched.step()
                during.append(time.perf_counter() - t0)
            plain = []
            for _ in range(8):
                t0 = time.perf_counter()
                sched.step()
                plain.append(time.perf_counter() - t0)
            for i in range(args.streams):
                sched.cancel(f"s{i}")
            sched.run_until_idle()
            if run >= WARM:
                runs.append((max(during), statistics.median(plain), res.ttft, len(during)))
        row = {
            "prefill_chunk": chunk,
            "worst_step_s": statistics.median(r[0] for r in runs),
            "plain_step_s": statistics.median(r[1] for r in runs),
            "long_ttft_s": statistics.median(r[2] for r in runs),
            "steps_to_first_token": runs[0][3],
        }
        out["chunked" if chunk else "in_loop"] = row
        print(
            f"{'chunk ' + str(chunk) if chunk else 'in-loop ':9s} worst step "
            f"{row['worst_step_s'] * 1e3:7.1f} ms  plain step {row['plain_step_s'] * 1e3:6.1f} ms"
            f"  long TTFT {row['long_ttft_s'] * 1e3:7.1f} ms over {row['steps_to_first_token']} "
            "steps",
            flush=True,
        )
    out["worst_stall_ratio_in_loop_over_chunked"] = (
        out["in_loop"]["worst_step_s"] / out["chunked"]["worst_step_s"]
    )
    return out


def batch(cfg, task, args) -> dict:
    rng = np.random.default_rng(args.seed + 2)
    lo, hi = args.batch_len
    prompts = [
        rng.integers(0, cfg.vocab_size, rng.integers(lo, hi + 1)).tolist()
        for _ in range(args.batch_prompts)
    ]
    tokens = sum(map(len, prompts))
    engine = Engine(cfg, _config(args, 1))
    sp = sampling_params()

    def groups():
        out, cur = [], []
        for p in prompts:
            if cur and sum(map(len, cur)) + len(p) > args.batch_tokens:
                out.append(cur)
                cur = []
            cur.append(p)
        return [*out, cur]

    def one_by_one():
        return [engine.prefill(task, p, sp) for p in prompts]

    def batched():
        return [x for g in groups() for x in engine.prefill_batch(task, g, [sp] * len(g))]

    out = {"prompts": len(prompts), "tokens": tokens, "batches": len(groups())}
    for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
        times = []
        for run in range(args.runs + WARM):
            t0 = time.perf_counter()
            jax.block_until_ready([x.cache for x in fn()])
            if run >= WARM:
                times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        out[name] = {"s": s, "tokens_per_s": tokens / s}
        print(f"{name:11s} {out[name]['tokens_per_s']:8.0f} prompt tok/s", flush=True)
    out["speedup"] = out["batched"]["tokens_per_s"] / out["one_by_one"]["tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="reports/paged")
    ap.add_argument("--tiny", action="store_true", help="a smoke run, not a measurement")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--system", type=int, default=256)
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--long", type=int, default=448)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--batch-prompts", type=int, default=16)
    ap.add_argument("--batch-len", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tiny:
        args.max_len, args.system, args.requests, args.long, args.chunk = 128, 48, 4, 96, 32
        args.batch_prompts, args.runs = 4, 1
    cfg = load_model_config(CONFIG, max_position_embeddings=max(512, args.max_len))
    decode = sunjax.init_params(cfg, jax.random.key(0))
    task = sunjax.init_params(cfg, jax.random.key(1))
    out = {
        "model": CONFIG,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.local_devices()],
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "args": vars(args),
    }
    print("prefix cache:", flush=True)
    out["prefix"] = prefix(cfg, decode, task, args)
    print("chunked prefill: a long prompt arrives while streams decode", flush=True)
    out["stall"] = stall(cfg, decode, task, args)
    print("batched prefill:", flush=True)
    out["batch"] = batch(cfg, task, args)
    os.makedirs(args.out, exist_ok=True)
    name = "prefill_cpu_tiny.json" if args.tiny else "prefill_cpu.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
