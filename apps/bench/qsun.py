"""QSUN decode step: int4 decode trees vs bfloat16, Llama-3.1-8B shapes, side by side in one run.

    sunjax bench qsun --out DIR [--batches 1 16 64] [--ctx 1024] [--steps 32]
                               [--repeats 5] [--group-size 128] [--int8 down_proj v_proj] [--tiny]

Trees: ``bf16``; ``int4`` (every linear int4); ``mixed`` (int4 with the ``--int8`` linears int8,
the QSUN default's layout, ``train.launch.QUANT_DEFAULTS``; ``--int8`` with no names drops it).

Random weights (``jax.jit(sunjax.init_params)``, bfloat16, layers unrolled), quantized on the
device with ``sunjax.quant.quantize_tree`` (round-to-nearest: AWQ changes the values, not the
format or the cost). For each batch size both trees run the same jitted ``decode_step`` over a
cache of ``ctx`` positions: one warm-up call (compile), then ``repeats`` times ``steps`` steps
dispatched back to back (each step's argmax feeds the next) and one sync at the end; the median
per-step time is reported with the bytes a step must read (weights but the embedding table,
plus the whole KV cache, which the attention reads in full) and the bandwidth that implies.
``--tiny`` runs the tiny config on the CPU in seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import sunjax
from sunjax import quant
from sunjax.configs import load_model_config

CONFIGS = {"8b": "configs/models/llama-3.1-8b.yaml", "tiny": "configs/models/tiny.yaml"}


def _kv_bytes(cfg, batch: int, ctx: int) -> int:
    """Bytes of K and V over all layers: what one decode step's attention reads."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    return 2 * cfg.n_layers * batch * cfg.n_kv_heads * ctx * cfg.head_dim * itemsize


def time_decode(cfg, params, batch: int, ctx: int, steps: int, repeats: int) -> dict:
    """Median seconds per decode step of ``params`` at ``batch`` over a ``ctx``-long cache."""
    if steps >= ctx:
        raise ValueError(f"{steps=} must be smaller than {ctx=}")
    start = jnp.full((batch,), ctx - steps, jnp.int32)
    cache = cfg.init_cache(batch, ctx)
    tokens = jnp.zeros((batch,), jnp.int32)

    def run(cache):
        cache = dataclasses.replace(cache, lengths=jnp.copy(start))  # the cache is donated
        t = tokens
        for _ in range(steps):
            logits, cache = sunjax.decode_step(cfg, params, t, cache)
            t = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        t.block_until_ready()
        return cache

    cache = run(cache)  # warm-up: compile and allocate
    times = []
    with sunjax.count_compiles() as compiles:
        for _ in range(repeats):
            t0 = time.perf_counter()
            cache = run(cache)
            times.append((time.perf_counter() - t0) / steps)
    del cache
    return {"seconds": statistics.median(times), "recompiles": compiles.n}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_qsun_out", help="directory for results.json")
    ap.add_argument("--tiny", action="store_true", help="tiny config, small sizes (CPU smoke)")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--ctx", type=int, default=None, help="cache positions (default 1024)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed dispatch burst")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scale-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--int8", nargs="*", default=["down_proj", "v_proj"], help="mixed's int8")
    args = ap.parse_args(argv)
    small = args.tiny
    batches = args.batches or ([1, 4] if small else [1, 16, 64])
    ctx = args.ctx or (64 if small else 1024)
    steps = args.steps or (4 if small else 32)
    repeats = args.repeats or (2 if small else 5)
    group_size = 32 if small and args.group_size == 128 else args.group_size
    if min(batches) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batches}")

    path = CONFIGS["tiny" if small else "8b"]
    cfg = load_model_config(path, dtype="bfloat16", param_dtype="bfloat16", scan_layers=False)
    t0 = time.perf_counter()
    bf16 = jax.jit(sunjax.init_params, static_argnums=0)(cfg, jax.random.key(0))
    jax.block_until_ready(bf16)
    q = lambda int8: quant.quantize_tree(
        cfg, bf16, group_size=group_size, scale_dtype=jnp.dtype(args.scale_dtype), int8=int8
    )
    trees = {"bf16": bf16, "int4": q(())}
    if args.int8:
        trees["mixed"] = q(tuple(args.int8))
    jax.block_until_ready(trees)
    setup_s = time.perf_counter() - t0
    sizes = {name: quant.bytes_report(tree) for name, tree in trees.items()}
    for name, tree in trees.items():  # a step reads B rows of the embedding table, not all
        sizes[name]["step_bytes"] = sizes[name]["bytes"] - quant.tree_bytes(tree["embed"])

    rows = []
    for batch in batches:
        kv = _kv_bytes(cfg, batch, ctx)
        row = {"batch": batch, "kv_bytes": kv}
        for name, tree in trees.items():
            r = time_decode(cfg, tree, batch, ctx, steps, repeats)
            read = sizes[name]["step_bytes"] + kv
            row[name] = {**r, "bytes_read": read, "gbps": read / r["seconds"] / 1e9}
        for name in trees:
            row[name]["speedup"] = row["bf16"]["seconds"] / row[name]["seconds"]
        rows.append(row)

    gb = ", ".join(
        f"{n} {sizes[n]['bytes'] / 1e9:.2f} GB ({sizes[n]['linear_bytes_per_param']:.3f} B/param)"
        for n in trees
    )
    print(
        f"{path} | {jax.devices()[0].device_kind} | ctx {ctx} | int4 g{group_size} "
        f"{args.scale_dtype} scales | mixed int8: {args.int8} | weights {gb}"
    )
    print(f"{'B':>4} " + " ".join(f"{n + ' ms':>9} {'x bf16':>7} {'GB/s':>6}" for n in trees))
    for r in rows:
        cells = (
            f"{r[n]['seconds'] * 1e3:>9.3f} {r[n]['speedup']:>6.2f}x {r[n]['gbps']:>6.0f}"
            for n in trees
        )
        print(f"{r['batch']:>4} " + " ".join(cells))
    result = {
        "config": path,
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "host": platform.node(),
        "jax": jax.__version__,
        "ctx": ctx,
        "steps": steps,
        "repeats": repeats,
        "group_size": group_size,
        "scale_dtype": args.scale_dtype,
        "mixed_int8": args.int8,
        "setup_seconds": setup_s,
        "sizes": sizes,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
