"""Paged vs dense KV cache in the serving engine: concurrency under a KV budget, step time.

    sunjax bench paged_engine --out reports/paged [--tiny]

(a) ``capacity``: the real scheduler over one decode worker serves the same mixed workload
    with a dense cache of ``--dense-slots`` slots of ``max_len`` and with a paged pool of the
    same bytes (``dense_slots * max_len / page_size`` pages, the null page included) and
    ``--paged-slots`` slots; reports the peak and mean number of sequences decoding at once,
    decode steps, preemptions and wall time.  Lengths: ``mixed_lengths``' assumed
    ShareGPT-like prompt / output mix scaled by ``--scale`` to fit ``max_len``.
(b) ``step``: median seconds of one ``Engine.generate`` step (decode + sampling) at each
    batch, dense (reads all ``max_len`` positions) vs paged (XLA gather on the CPU), at
    mixed lengths.  Many steps dispatched back to back, one sync, median of runs.

    ``--ctx`` instead puts every sequence at each given length, and ``floor_ms`` is the HBM
    floor (weights + valid K/V read once at ``--bandwidth``): the GPU check at
    Llama-3.1-8B shapes in ``scripts/gpu_checks.sh`` (``--model
    configs/models/llama-3.1-8b.yaml --dtype bfloat16 --ctx 1024 8192 --batches 1 32
    --skip-capacity``).

Model: ``--model`` (default ``configs/models/tiny.yaml``), random weights; the machine is
whatever runs it (the JSON is named after the backend).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sunjax
from serve.engine import DecodeState, Engine, EngineConfig
from serve.pool import DecodePool
from serve.router import LeastLoaded
from serve.scheduler import Request, Scheduler
from sunjax.configs import load_model_config
from sunjax.paged import NULL_PAGE

CONFIG = "configs/models/tiny.yaml"


def workload_lengths(rng: np.random.Generator, n: int, scale: float, max_len: int):
    """``(prompt, output)`` lengths, ``int [n]`` each: prompt ~ lognormal(median 300 *
    scale, sigma 1.0), output ~ lognormal(median 200 * scale, sigma 0.8) (the mix of
    ``kernels_pallas.paged_attention.bench.mixed_lengths``), clipped to ``max_len`` total."""
    prompt = np.clip(np.round(rng.lognormal(math.log(300 * scale), 1.0, n)), 1, max_len // 2)
    output = np.round(rng.lognormal(math.log(200 * scale), 0.8, n))
    output = np.clip(output, 1, max_len - prompt)
    return prompt.astype(int), output.astype(int)


def capacity(cfg, params, args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    prompts, outputs = workload_lengths(rng, args.requests, args.scale, args.max_len)
    budget_pages = args.dense_slots * args.max_len // args.page_size
    setups = {
        "dense": EngineConfig(slots_per_worker=args.dense_slots, max_len=args.max_len),
        "paged": EngineConfig(
            slots_per_worker=args.paged_slots,
            max_len=args.max_len,
            page_size=args.page_size,
            num_pages=budget_pages,
        ),
    }
    rows = []
    for name, config in setups.items():
        sched = Scheduler(
            DecodePool(cfg, config, decode_params=params),
            {"m": params},
            LeastLoaded(1),
            max_queue=args.requests,
        )
        for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
            prompt = tuple(rng.integers(0, cfg.vocab_size, p).tolist())
            sched.submit(
                Request(id=f"r{i}", model="m", prompt=prompt, max_tokens=int(o), ignore_eos=True)
            )
        peak, t0 = 0, time.perf_counter()
        while sched.busy:
            sched.step()
            peak = max(peak, int(sched.active.sum()))
        wall = time.perf_counter() - t0
        tokens = sum(len(r.tokens) for r in sched.results.values())
        rows.append(
            {
                "cache": name,
                "slots": config.slots,
                "kv_tokens": config.slots * config.max_len
                if name == "dense"
                else (config.num_pages - 1) * config.page_size,
                "peak_concurrent": peak,
                "mean_concurrent": sched.occupancy_sum / max(sched.decode_steps, 1) * config.slots,
                "decode_steps": sched.decode_steps,
                "preemptions": sched.preemptions,
                "tokens": tokens,
                "wall_s": wall,
                "tokens_per_s": tokens / wall,
            }
        )
        print(_fmt_capacity(rows[-1]), flush=True)
    return rows


def _fmt_capacity(r: dict) -> str:
    return (
        f"{r['cache']:6s} slots {r['slots']:3d}  KV tokens {r['kv_tokens']:5d}  "
        f"concurrent peak {r['peak_concurrent']:3d} mean {r['mean_concurrent']:5.1f}  "
        f"steps {r['decode_steps']:4d}  preempt {r['preemptions']:3d}  "
        f"{r['wall_s']:6.1f} s  {r['tokens_per_s']:6.0f} tok/s"
    )


def _paged_state(engine: Engine, lengths: np.ndarray, room: int):
    """One worker's decode state, slot ``b`` holding ``lengths[b] + room`` tokens of pages."""
    state = engine.init_decode_state()
    alloc = engine.allocator()
    for b, n in enumerate(lengths):
        alloc.allocate(b, int(n) + room)
    table = alloc.page_table(range(len(lengths)))
    cache = dataclasses.replace(state.cache, page_table=jnp.asarray(table))
    return dataclasses.replace(state, cache=cache)


def _time_steps(
    engine: Engine, params, state: DecodeState, start: jax.Array, steps: int, runs: int
) -> tuple[float, int]:
    """Median seconds per ``engine.generate`` over ``steps`` chained steps from lengths
    ``start``, and the compilations after the warm-up (0 expected)."""

    def run(state):
        cache = dataclasses.replace(state.cache, lengths=jnp.copy(start))  # state is donated
        state = dataclasses.replace(state, cache=cache)
        for _ in range(steps):
            state, tokens = engine.generate(params, state)
        tokens.block_until_ready()
        return state

    state = run(state)  # compile
    times = []
    with sunjax.count_compiles() as compiles:
        for _ in range(runs):
            t0 = time.perf_counter()
            state = run(state)
            times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), compiles.n


def floor_ms(cfg, params, lengths: np.ndarray, bandwidth: float) -> float:
    """The HBM floor of one decode step: every weight and every valid K/V byte read once."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return (weights + per_token * float(lengths.sum())) / bandwidth * 1e3


def step_time(cfg, params, args) -> list[dict]:
    rng = np.random.default_rng(args.seed + 1)
    rows = []
    settings = [(b, c) for c in args.ctx for b in args.batches] if args.ctx else [
        (b, None) for b in args.batches
    ]  # fmt: skip
    for batch, ctx in settings:
        if ctx is None:  # the mixed length distribution
            prompts, outputs = workload_lengths(rng, batch, args.scale, args.max_len)
            lengths = np.minimum(prompts + outputs, args.max_len - args.steps)
        else:  # every sequence at ctx tokens (the GPU check at fixed context)
            lengths = np.full(batch, ctx)
        row = {
            "batch": batch,
            "ctx": ctx,
            "mean_length": float(lengths.mean()),
            "max_len": args.max_len,
            "floor_ms": floor_ms(cfg, params, lengths + args.steps // 2, args.bandwidth),
        }
        for name in ("dense", "paged"):
            paged = name == "paged"
            if paged:
                pages = sum(-(-(int(n) + args.steps) // args.page_size) for n in lengths) + 1
                config = EngineConfig(
                    slots_per_worker=batch,
                    max_len=args.max_len,
                    page_size=args.page_size,
                    num_pages=max(pages, args.max_len // args.page_size + 1),
                )
                engine = Engine(cfg, config)
                state = _paged_state(engine, lengths, args.steps)
            else:
                engine = Engine(cfg, EngineConfig(slots_per_worker=batch, max_len=args.max_len))
                state = engine.init_decode_state()
            state = dataclasses.replace(state, active=jnp.ones((batch,), bool))
            start = jnp.asarray(lengths, jnp.int32)
            seconds, recompiles = _time_steps(engine, params, state, start, args.steps, args.runs)
            row[f"{name}_ms"] = seconds * 1e3
            row[f"{name}_recompiles"] = recompiles
            row[f"{name}_pct_floor"] = 100 * row["floor_ms"] / row[f"{name}_ms"]
        row["paged_over_dense"] = row["paged_ms"] / row["dense_ms"]
        rows.append(row)
        print(
            f"B {batch:3d}  mean length {row['mean_length']:6.1f}  dense {row['dense_ms']:7.2f} ms"
            f"  paged {row['paged_ms']:7.2f} ms  paged/dense {row['paged_over_dense']:.2f}x  "
            f"floor {row['floor_ms']:.3f} ms (dense {row['dense_pct_floor']:.0f}%, paged "
            f"{row['paged_pct_floor']:.0f}%)",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="reports/paged")
    ap.add_argument("--tiny", action="store_true", help="a smoke run, not a measurement")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--scale", type=float, default=1 / 4, help="of the length mix's medians")
    ap.add_argument("--dense-slots", type=int, default=4)
    ap.add_argument("--paged-slots", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=CONFIG, help="a model config YAML (random weights)")
    ap.add_argument("--dtype", default=None, help="weights and KV dtype (default: the config's)")
    ap.add_argument(
        "--ctx", type=int, nargs="+", default=None, help="fixed context lengths for the step time"
    )
    ap.add_argument("--skip-capacity", action="store_true", help="only the step time")
    ap.add_argument(
        "--bandwidth", type=float, default=4.245e12, help="B/s for the floor (H200, ANCHORS.md)"
    )
    args = ap.parse_args(argv)
    if args.tiny:
        args.max_len, args.scale, args.requests = 128, 1 / 16, 12
        args.dense_slots, args.paged_slots, args.batches = 2, 8, [1, 4]
        args.steps, args.runs = 4, 2
        args.ctx = [16, 32] if args.ctx else None
    if args.ctx and not args.tiny:
        args.max_len = max(args.max_len, max(args.ctx) + args.steps)
    dtype = {} if args.dtype is None else {"dtype": args.dtype, "param_dtype": args.dtype}
    cfg = load_model_config(args.model, max_position_embeddings=max(512, args.max_len), **dtype)
    params = sunjax.init_params(cfg, jax.random.key(0))
    cap = []
    if not args.skip_capacity:
        print(f"capacity: KV budget of {args.dense_slots} x {args.max_len} tokens", flush=True)
        cap = capacity(cfg, params, args)
    print("decode step (Engine.generate):", flush=True)
    steps = step_time(cfg, params, args)
    out = {
        "model": args.model,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.local_devices()],
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "args": vars(args),
        "null_page": NULL_PAGE,
        "capacity": cap,
        "step": steps,
    }
    os.makedirs(args.out, exist_ok=True)
    name = f"engine_{jax.default_backend()}{'_tiny' if args.tiny else ''}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
