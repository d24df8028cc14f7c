"""Benchmark of weight-only quantized matmul on Llama-3.1-8B projection shapes.

    python -m kernels_pallas.quant_matmul.bench --out DIR [--tiny] [--sweep]

For every (K -> N, M): first a correctness check of each quantized variant against
``reference.quant_matmul_reference`` (elementwise ``reference.error_bound``), then the
time per call.  Timing: one jitted ``fori_loop`` runs ``--calls`` matmuls (over ``C``
distinct copies of the weights, so that the bytes cycled through exceed twice the L2 and
every call streams its weights from HBM), each call's input depending on the previous
call's output (``x[:, 0] += y[:, 0] * 1e-30``) and an ``optimization_barrier`` tying the
weights to ``x``, so neither the matmul nor XLA's weight-only dequantization can be
hoisted out of the loop or overlapped.
The same loop around a trivial body gives the per-call overhead of that dependency;
``us`` is the median over ``--runs`` runs of (loop time / calls) and ``net_us`` subtracts
the overhead.  ``floor_us`` = (weight bytes incl. scales + x bytes + y bytes) /
bandwidth, and ``pct_floor`` = floor_us / net_us.

Variants: ``bf16_xla`` (plain dot), ``int4_xla`` (dequantize packed uint8 in XLA, i.e.
``reference.py``), ``int4_xla_s4`` (the same weights stored as ``jnp.int4`` so XLA does
the unpacking itself), ``int8_xla``, ``int8_pallas``, ``int4_pallas``.  A variant that
fails records its error and the run continues.  ``--tiny`` uses small shapes and runs the
Pallas kernels in interpret mode, to check the script on a CPU.  ``--sweep`` also times
a list of candidate Configs for the Pallas variants, to fill ``config.TABLE``;
``--ms``, ``--shapes`` and ``--variants`` narrow a run to fit a short device lease, e.g.
``--sweep --ms 1,16 --variants int4_pallas,bf16_xla,int4_xla``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.quant_matmul.api import quant_matmul
from kernels_pallas.quant_matmul.config import Config, get_config, m_bucket
from kernels_pallas.quant_matmul.format import QuantizedWeight, quantize, unpack_int4
from kernels_pallas.quant_matmul.reference import error_bound, quant_matmul_reference

LLAMA_8B_SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))  # K -> N
TINY_SHAPES = ((256, 384),)
M_VALUES = (1, 16, 64, 256)
TINY_M_VALUES = (1, 16)
VARIANTS = ("bf16_xla", "int4_xla", "int4_xla_s4", "int8_xla", "int8_pallas", "int4_pallas")

SWEEP_CONFIGS = {
    1: [
        Config(bm, bn, bk, num_warps=w, num_stages=st, split_k=sk)
        for bm, bn, bk, w, st, sk in [
            (1, 32, 256, 4, 4, None),
            (1, 64, 128, 4, 4, None),
            (1, 64, 512, 4, 3, None),
            (1, 128, 256, 4, 4, None),
            (1, 128, 256, 8, 3, None),
            (1, 256, 128, 8, 3, None),
            (1, 64, 256, 4, 4, 1),
            (16, 64, 256, 4, 4, None),
            (16, 128, 256, 4, 4, None),
        ]
    ],
    16: [
        Config(16, bn, bk, num_warps=w, num_stages=st, split_k=sk)
        for bn, bk, w, st, sk in [
            (32, 256, 4, 4, None),
            (64, 128, 4, 4, None),
            (64, 256, 4, 4, None),
            (64, 512, 4, 3, None),
            (64, 256, 4, 4, 1),
            (128, 256, 4, 4, None),
            (128, 256, 8, 4, None),
            (128, 512, 4, 3, None),
            (256, 128, 8, 3, None),
            (256, 256, 8, 3, 1),
        ]
    ],
    64: [
        Config(bm, bn, bk, num_warps=w, num_stages=st, split_k=sk)
        for bm, bn, bk, w, st, sk in [
            (64, 64, 256, 4, 3, None),
            (64, 128, 128, 4, 3, None),
            (64, 128, 256, 8, 3, None),
            (32, 64, 256, 4, 4, None),
            (64, 64, 128, 4, 4, 1),
            (64, 256, 128, 8, 3, 1),
        ]
    ],
    256: [
        Config(bm, bn, bk, num_warps=w, num_stages=st, split_k=1)
        for bm, bn, bk, w, st in [
            (64, 128, 128, 8, 3),
            (128, 128, 128, 8, 3),
            (128, 256, 64, 8, 3),
            (64, 256, 128, 8, 4),
        ]
    ],
}


def _to_s4(qw: QuantizedWeight):
    """The int4 weight as (q - 8) in ``jnp.int4`` [Kp, N] plus scales and (z - 8)."""
    q = unpack_int4(qw.data).astype(jnp.int8) - 8  # [Kp, N] in -8..7
    return q.astype(jnp.int4), qw.scales, (qw.zeros.astype(jnp.float32) - 8.0)


def _s4_matmul(x, w, *, k, group_size):
    q, s, z = w  # int4 [Kp, N], [G, N], [G, N]
    g, n = s.shape
    qf = q.astype(jnp.float32).reshape(g, group_size, n)  # [G, gs, N]
    wd = ((qf - z[:, None, :]) * s.astype(jnp.float32)[:, None, :]).reshape(-1, n)[:k]
    y = jnp.dot(x, wd.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _bf16_matmul(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def _copies(tree, count: int):
    return [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree) for _ in range(count)]


def _time_loop(fn, x, weight_copies, calls: int, runs: int) -> float:
    """Median seconds per call of ``fn`` chained ``calls`` times inside one jit."""
    copies = len(weight_copies)
    reps = max(1, round(calls / copies))

    @jax.jit
    def loop(x, ws):
        def body(_, x):
            for w in ws:
                # Tie the weights to the loop-varying x so that nothing computed from them
                # alone (e.g. XLA's dequantization) can be hoisted out of the loop.
                x, w = jax.lax.optimization_barrier((x, w))
                y = fn(x, w)
                x = x.at[:, 0].add((y[:, 0].astype(jnp.float32) * 1e-30).astype(x.dtype))
            return x

        return jax.lax.fori_loop(0, reps, body, x)

    jax.block_until_ready(loop(x, weight_copies))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x, weight_copies))
        times.append((time.perf_counter() - t0) / (reps * copies))
    return statistics.median(times)


def _num_copies(weight_bytes: int, l2_bytes: float) -> int:
    return int(min(16, max(1, math.ceil(2 * l2_bytes / max(weight_bytes, 1)))))


def _variant_fns(k: int, group_size: int):
    """name -> (fn(x, weights), weights key).  Pallas variants get their fn in _measure."""
    return {
        "bf16_xla": (_bf16_matmul, "bf16"),
        "int4_xla": (lambda x, w: quant_matmul(x, w, implementation="xla"), "int4"),
        "int4_xla_s4": (lambda x, w: _s4_matmul(x, w, k=k, group_size=group_size), "s4"),
        "int8_xla": (lambda x, w: quant_matmul(x, w, implementation="xla"), "int8"),
        "int8_pallas": (None, "int8"),
        "int4_pallas": (None, "int4"),
    }


def _check(fn, x, w, qw) -> float:
    """max(|fn - reference| / error_bound); raises if not finite."""
    y = fn(x, w)
    ref = quant_matmul_reference(x, qw)
    ratio = np.asarray(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32)))
    ratio = ratio / np.asarray(error_bound(x, qw, ref))
    if not np.isfinite(ratio).all():
        raise FloatingPointError("non-finite output")
    return float(ratio.max())


def run(args) -> dict:
    shapes = args.shapes or (TINY_SHAPES if args.tiny else LLAMA_8B_SHAPES)
    variants = args.variants or VARIANTS
    ms = args.ms or (TINY_M_VALUES if args.tiny else M_VALUES)
    if args.tiny:
        args.calls, args.runs = 4, 2
    calls, runs = args.calls, args.runs
    # quant_matmul(implementation="pallas") runs the kernels in interpret mode on CPU.
    interpret = jax.default_backend() not in ("gpu", "tpu")
    dev = jax.devices()[0]
    result = {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "bandwidth_Bps": args.bandwidth,
        "l2_bytes": args.l2_bytes,
        "group_size": args.group_size,
        "calls_per_loop": calls,
        "runs": runs,
        "interpret": interpret,
        "records": [],
    }
    key = jax.random.PRNGKey(0)
    for k, n in shapes:
        key, kw = jax.random.split(key)
        w = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        q4 = quantize(w, bits=4, group_size=args.group_size)
        weights = {"bf16": w, "int4": q4, "int8": quantize(w, bits=8), "s4": _to_s4(q4)}
        refs = {"int4": q4, "int8": weights["int8"], "s4": q4}
        fns = _variant_fns(k, args.group_size)
        for m in ms:
            key, kx = jax.random.split(key)
            x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
            overhead = _time_loop(lambda x, w: x[:, :1], x, [jnp.zeros((1,))], calls, runs)
            for name in variants:
                fn, wkey = fns[name]
                configs = [None]
                if args.sweep and name.endswith("_pallas"):
                    configs += SWEEP_CONFIGS[m_bucket(m)]
                for cfg in configs:
                    rec = _measure(name, fn, cfg, x, weights[wkey], refs.get(wkey), overhead, args)
                    result["records"].append(rec)
                    _print_progress(rec)
    return result


def _measure(name, fn, cfg, x, w, qw, overhead, args) -> dict:
    """Checks (if ``qw``) and times one variant; failures are recorded, not raised."""
    m, k = x.shape
    n = qw.shape[1] if qw is not None else w.shape[1]
    calls, runs = args.calls, args.runs
    rec = {"variant": name, "k": k, "n": n, "m": m, "config": None, "error": None}
    try:
        if name.endswith("_pallas"):
            platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
            used = cfg or get_config(m, platform=platform)
            rec["config"] = dataclasses.asdict(used)

            def fn(x, w, used=used):
                return quant_matmul(x, w, implementation="pallas", config=used)

        if qw is not None:
            rec["max_err_over_bound"] = _check(fn, x, w, qw)
            rec["correct"] = rec["max_err_over_bound"] <= 1.0
        wbytes = _nbytes(w)
        copies = _copies(w, _num_copies(wbytes, args.l2_bytes))
        sec = _time_loop(fn, x, copies, calls, runs)
        io_bytes = wbytes + 2 * m * k + 2 * m * n
        floor = io_bytes / args.bandwidth
        net = sec - overhead
        rec.update(
            us=sec * 1e6,
            overhead_us=overhead * 1e6,
            # None when the dependency overhead swamps the call (timer noise, CPU runs).
            net_us=net * 1e6 if net > 0.1 * sec else None,
            bytes=io_bytes,
            weight_copies=len(copies),
            floor_us=floor * 1e6,
        )
        rec["pct_floor"] = 100.0 * floor / (net if rec["net_us"] is not None else sec)
    except Exception as e:  # one failing variant must not stop the benchmark
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        rec["traceback"] = traceback.format_exc()[-4000:]
    return rec


def _print_progress(rec):
    cfg = "" if rec["config"] is None else " " + ",".join(f"{v}" for v in rec["config"].values())
    head = f"  {rec['k']}->{rec['n']} M={rec['m']} {rec['variant']}{cfg}:"
    if rec["error"]:
        print(f"{head} ERROR {rec['error'][:200]}", flush=True)
        return
    ok = "" if "correct" not in rec else (" ok" if rec["correct"] else " MISMATCH")
    print(
        f"{head} {_net(rec):.1f} us net ({rec['us']:.1f} raw), "
        f"{rec['pct_floor']:.0f}% of floor{ok}",
        flush=True,
    )


def _net(rec) -> float:
    """Net us, falling back to the raw time when the overhead could not be separated."""
    return rec["us"] if rec["net_us"] is None else rec["net_us"]


def summary_table(result: dict) -> str:
    """One row per (shape, M): net us and % of floor per variant (default configs only)."""
    rows = {}
    best = {}
    for r in result["records"]:
        key = (r["k"], r["n"], r["m"])
        if r["error"] or "us" not in r:
            if r["variant"] not in rows.setdefault(key, {}):
                rows[key][r["variant"]] = None
            continue
        rows.setdefault(key, {}).setdefault(r["variant"], r)
        b = best.get((key, r["variant"]))
        if b is None or _net(r) < _net(b):
            best[(key, r["variant"])] = r
    head = f"{'K->N':>12} {'M':>4} " + " ".join(f"{v:>17}" for v in VARIANTS)
    head += f" {'int4P/bf16':>10} {'int4P/int4X':>11}"
    lines = [head]
    for (k, n, m), per in sorted(rows.items()):
        cells = []
        for v in VARIANTS:
            r = per.get(v)
            cell = "ERR" if r is None else "{:.1f}us {:.0f}%".format(_net(r), r["pct_floor"])
            cells.append(f"{cell:>17}")
        p4, b16, x4 = per.get("int4_pallas"), per.get("bf16_xla"), per.get("int4_xla")
        sp1 = f"{_net(b16) / _net(p4):.2f}x" if p4 and b16 else "-"
        sp2 = f"{_net(x4) / _net(p4):.2f}x" if p4 and x4 else "-"
        lines.append(f"{f'{k}->{n}':>12} {m:>4} " + " ".join(cells) + f" {sp1:>10} {sp2:>11}")
    if any(r["config"] is not None for r in result["records"]):
        lines.append("")
        lines.append("best Pallas configs (block_m, block_n, block_k, warps, stages, split_k):")
        for (key, v), r in sorted(best.items()):
            if v.endswith("_pallas"):
                cfg = tuple(r["config"].values())
                lines.append(f"  {key[0]}->{key[1]} M={key[2]} {v}: {_net(r):.1f}us {cfg}")
    return "\n".join(lines)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _shape_list(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(d) for d in item.split("x")) for item in text.split(","))


def _variant_list(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; choose from {VARIANTS}")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for bench.json")
    p.add_argument("--tiny", action="store_true", help="small shapes, interpret mode (CPU check)")
    p.add_argument("--sweep", action="store_true", help="also time candidate Configs")
    p.add_argument("--bandwidth", type=float, default=4245e9, help="HBM bytes/s (H200: 4245e9)")
    p.add_argument("--l2-bytes", type=float, default=50e6, help="L2 size to defeat (bytes)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calls", type=int, default=20, help="matmuls per timed loop")
    p.add_argument("--runs", type=int, default=5, help="timed loops; the median is kept")
    p.add_argument("--ms", type=_int_list, default=None, help="e.g. 1,16 (default: all)")
    p.add_argument("--shapes", type=_shape_list, default=None, help="e.g. 4096x4096,14336x4096")
    p.add_argument("--variants", type=_variant_list, default=None, help="comma list of variants")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    result = run(args)
    table = summary_table(result)
    print(table)
    result["table"] = table
    path = os.path.join(args.out, "bench.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
