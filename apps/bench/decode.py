"""Decode step vs its bandwidth floor, both layer modes (``lax.scan`` and unrolled), one run.

    sunjax bench decode --out DIR [--batches 1 32] [--ctx 1024] [--tiny]
                                 [--bandwidth 4245e9]

Llama-3.1-8B shapes, random bfloat16 weights. The floor is (bytes of every weight a step reads
+ the whole KV cache) / HBM bandwidth (default: 4,245 GB/s, the device copy measured on an
H200 in ANCHORS.md). Timing as in ``apps.bench.qsun``: many steps dispatched back to back and
one sync, median of repeats. ``--tiny`` is a CPU smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

import sunjax
from apps.bench.qsun import CONFIGS, _kv_bytes, time_decode
from sunjax import quant
from sunjax.configs import load_model_config


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_decode_out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--bandwidth", type=float, default=4245e9, help="bytes/s")
    args = ap.parse_args(argv)
    batches = args.batches or ([1, 4] if args.tiny else [1, 32])
    ctx = args.ctx or (64 if args.tiny else 1024)
    steps = args.steps or (4 if args.tiny else 32)
    repeats = args.repeats or (2 if args.tiny else 5)
    path = CONFIGS["tiny" if args.tiny else "8b"]

    rows = []
    for scan in (False, True):
        cfg = load_model_config(path, dtype="bfloat16", param_dtype="bfloat16", scan_layers=scan)
        params = jax.jit(sunjax.init_params, static_argnums=0)(cfg, jax.random.key(0))
        weights = quant.tree_bytes(params) - quant.tree_bytes(params["embed"])
        for batch in batches:
            r = time_decode(cfg, params, batch, ctx, steps, repeats)
            floor = (weights + _kv_bytes(cfg, batch, ctx)) / args.bandwidth
            rows.append(
                {
                    "layers": "scan" if scan else "unrolled",
                    "batch": batch,
                    "ms": r["seconds"] * 1e3,
                    "floor_ms": floor * 1e3,
                    "of_floor": floor / r["seconds"],
                    "recompiles": r["recompiles"],
                }
            )
        del params

    device = jax.devices()[0].device_kind
    print(f"{path} | {device} | ctx {ctx} | floor at {args.bandwidth / 1e9:.0f} GB/s")
    print(f"{'layers':>9} {'B':>4} {'ms/step':>9} {'floor ms':>9} {'% floor':>8}")
    for r in rows:
        print(
            f"{r['layers']:>9} {r['batch']:>4} {r['ms']:>9.3f} {r['floor_ms']:>9.3f} "
            f"{100 * r['of_floor']:>7.0f}%"
        )
    result = {
        "config": path,
        "device": device,
        "jax": jax.__version__,
        "ctx": ctx,
        "bandwidth": args.bandwidth,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
