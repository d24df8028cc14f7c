"""Benchmark of decode attention, paged against dense, and of how many sequences fit.

    python -m kernels_pallas.paged_attention.bench --out DIR [--model smollm2|llama8b]
        [--batches 1 8 32] [--ctx 1024 ...] [--variants ...] [--sweep] [--tiny]

Letters: B sequences, N query heads, K kv heads, H head dim, P page size, M pages per
sequence, S dense positions per slot (``max_len``).

1. Decode attention, one layer, one query per sequence.  Variants:

   * ``dense_xla``: the dense cache's attention, as ``sunjax.model`` does it: ``[B, K, S,
     H]`` buffers, every one of the S = ``max_len`` positions read and masked;
   * ``paged_xla``: ``reference.paged_attention_reference`` with the page table cut to the
     longest sequence of the batch (``M = ceil(max(lengths) / P)``, rounded up to a power
     of two, the bucket an engine would compile for);
   * ``paged_xla_full``: the same with the full table (``M = S / P``);
   * ``paged_pallas``: ``paged_attention(implementation="pallas")`` with the bucketed table
     (on a CPU the Triton kernel in interpret mode: a correctness run, not a timing).

   Lengths: ``--ctx`` gives every sequence that length (the GPU check, against the floor);
   without it the lengths are drawn from ``mixed_lengths`` and ``max_len`` is ``--max-len``.
   Timing: one jitted ``fori_loop`` of ``--calls`` calls, each call's query depending on the
   previous output and an ``optimization_barrier`` tying the K/V to the query, so nothing
   (e.g. the page gather) is hoisted out of the loop; median over ``--runs`` of the loop
   time / calls.  ``floor_us`` is the bytes that must be read (the valid K/V of every
   sequence, plus q and the output) over ``--bandwidth`` (H200: 4,245 GB/s, ANCHORS.md);
   ``pct_floor`` = floor / time.  Each variant is checked against ``paged_xla`` first.

2. Capacity: in a fixed KV budget, how many sequences of ``mixed_lengths`` fit at once when
   every dense slot reserves ``max_len`` positions, against pages of P tokens (each sequence
   holds ``ceil(length / P)`` pages at its final length; one null page is reserved).

``--sweep`` also times the Pallas kernel under each of ``SWEEP_CONFIGS`` (GPU / TPU only).
``--tiny`` is a CPU smoke run of the whole script with small shapes, not a measurement.
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

from kernels_pallas.paged_attention.api import paged_attention
from kernels_pallas.paged_attention.config import Config, get_config
from kernels_pallas.paged_attention.reference import key_mask, paged_attention_reference

# name -> (layers L, query heads N, kv heads K, head dim H)
MODELS = {
    "smollm2": (30, 9, 3, 64),  # SmolLM2-135M
    "llama8b": (32, 32, 8, 128),  # Llama-3.1-8B
    "tiny": (4, 4, 2, 32),
}
VARIANTS = ("dense_xla", "paged_xla", "paged_xla_full", "paged_pallas")
H200_BANDWIDTH = 4.245e12
SWEEP_CONFIGS = [
    Config(pages_per_compute_block=ppcb, k_splits=ks, num_warps=w, num_stages=st)
    for ppcb, ks, w, st in [
        (4, 16, 4, 2),
        (8, 8, 4, 2),
        (8, 16, 8, 2),
        (8, 32, 4, 2),
        (16, 16, 8, 2),
        (16, 32, 8, 3),
    ]
]


def mixed_lengths(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """Total lengths (prompt + output) of ``n`` chat requests, ``int32 [n]`` in [1, max_len].

    An assumed ShareGPT-like mix, not a measured trace: prompt ~ lognormal(median 300,
    sigma 1.0), output ~ lognormal(median 200, sigma 0.8); median total ~ 600, mean ~ 900
    before clipping to ``max_len``.
    """
    prompt = rng.lognormal(math.log(300), 1.0, n)
    output = rng.lognormal(math.log(200), 0.8, n)
    return np.clip(np.round(prompt + output), 1, max_len).astype(np.int32)


def dense_attention(q, k, v, lengths, scale):
    """``sunjax.model``'s decode attention over a dense ``[B, K, S, H]`` cache."""
    b, n, h = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, kh, n // kh, h)
    s = jnp.einsum("bkgh,bksh->bkgs", qg, k, preferred_element_type=jnp.float32) * scale
    valid = key_mask(lengths, k.shape[2])[:, None, None, :]
    p = jax.nn.softmax(jnp.where(valid, s, -1e30), axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bksh->bkgh", p, v).reshape(b, n, h).astype(q.dtype)


def _time_loop(fn, q, kv, calls: int, runs: int) -> float:
    """Median seconds per call of ``fn(q, *kv)`` chained ``calls`` times inside one jit."""

    @jax.jit
    def loop(q, kv):
        def body(_, q):
            q, kv_tied = jax.lax.optimization_barrier((q, kv))
            out = fn(q, *kv_tied)
            return q + (out * 1e-30).astype(q.dtype)

        return jax.lax.fori_loop(0, calls, body, q)

    jax.block_until_ready(loop(q, kv))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(q, kv))
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def make_case(rng, model, b, lengths, max_len, page_size, dtype):
    """Dense ``[B, K, S, H]`` K/V, the same tokens in a shuffled page pool, the table."""
    _, n, kh, h = MODELS[model]
    m = -(-max_len // page_size)
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, n, h), jnp.float32).astype(dtype)
    k_dense = jax.random.normal(kk, (b, kh, m * page_size, h), jnp.float32).astype(dtype)
    v_dense = jax.random.normal(kv, (b, kh, m * page_size, h), jnp.float32).astype(dtype)
    perm = rng.permutation(b * m) + 1  # page 0 is the null page
    table = perm.reshape(b, m).astype(np.int32)  # [B, M]

    def to_pages(dense):  # [B, K, M*P, H] -> [K, 1 + B*M, P, H]
        pages = dense.reshape(b, kh, m, page_size, h).transpose(1, 0, 2, 3, 4)
        pages = pages.reshape(kh, b * m, page_size, h)
        pool = jnp.zeros((kh, 1 + b * m, page_size, h), dtype)
        return pool.at[:, table.reshape(-1)].set(pages)

    lengths = jnp.asarray(lengths, jnp.int32)
    return q, k_dense, v_dense, to_pages(k_dense), to_pages(v_dense), jnp.asarray(table), lengths


def _variant_fn(name, table_width, scale, config):
    if name == "dense_xla":
        return lambda q, k, v, lengths: dense_attention(q, k, v, lengths, scale)
    impl = "pallas" if name == "paged_pallas" else "xla"

    def fn(q, k_pages, v_pages, lengths, table):
        return paged_attention(
            q,
            k_pages,
            v_pages,
            lengths,
            table[:, :table_width],
            scale=scale,
            implementation=impl,
            config=config,
        )

    return fn


def run_attention(args, save=lambda records: None) -> list[dict]:
    """Checks and times every variant; ``save(records)`` after each (a partial run on a
    device lease that ends early keeps what it measured)."""
    rng = np.random.default_rng(0)
    on_accelerator = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_accelerator else "float32"))
    _, n, kh, h = MODELS[args.model]
    scale = h**-0.5
    records = []
    settings = [(c, c) for c in args.ctx] if args.ctx else [(None, args.max_len)]
    for ctx, max_len in settings:
        for b in args.batches:
            lengths = np.full(b, ctx) if ctx else mixed_lengths(rng, b, max_len)
            case = make_case(rng, args.model, b, lengths, max_len, args.page_size, dtype)
            q, k_dense, v_dense, k_pages, v_pages, table, lens = case
            full = table.shape[1]
            bucket = min(full, _next_pow2(-(-int(lengths.max()) // args.page_size)))
            itemsize = dtype.itemsize
            kv_bytes = 2 * int(lengths.sum()) * kh * h * itemsize
            floor_us = (kv_bytes + 2 * q.size * itemsize) / args.bandwidth * 1e6
            base = dict(
                model=args.model, b=b, ctx=ctx, max_len=max_len, page_size=args.page_size,
                dtype=dtype.name, mean_len=float(lengths.mean()), max_seq_len=int(lengths.max()),
                kv_bytes=kv_bytes, floor_us=floor_us,
            )  # fmt: skip
            want = paged_attention_reference(q, k_pages, v_pages, lens, table, scale=scale)
            for name in args.variants:
                configs = [None]
                if name == "paged_pallas" and args.sweep and on_accelerator:
                    configs += SWEEP_CONFIGS
                for cfg in configs:
                    rec = dict(base, variant=name, table_width=None, config=None, error=None)
                    try:
                        width = full if name == "paged_xla_full" else bucket
                        rec["table_width"] = None if name == "dense_xla" else width
                        if name == "paged_pallas":
                            rec["config"] = dataclasses.asdict(cfg or get_config())
                        fn = _variant_fn(name, width, scale, cfg)
                        kv = (k_dense, v_dense, lens) if name == "dense_xla" else None
                        kv = kv or (k_pages, v_pages, lens, table)
                        got = np.asarray(jax.jit(fn)(q, *kv), np.float32)
                        err = float(np.abs(got - np.asarray(want, np.float32)).max())
                        rec["max_abs_err"] = err
                        rec["correct"] = err <= (1e-5 if dtype == jnp.float32 else 2.0**-5)
                        if name == "paged_pallas" and not on_accelerator:
                            rec["note"] = "interpret mode: checked, not timed"
                        else:
                            sec = _time_loop(fn, q, kv, args.calls, args.runs)
                            rec["us"] = sec * 1e6
                            rec["pct_floor"] = 100 * floor_us / rec["us"]
                    except Exception as e:  # a failing variant is recorded, the run goes on
                        rec["error"] = f"{type(e).__name__}: {e}"[:500]
                        traceback.print_exc()
                    records.append(rec)
                    save(records)
                    _print_attention(rec, on_accelerator)
    return records


def _print_attention(r: dict, with_floor: bool) -> None:
    ctx = f"ctx {r['ctx']}" if r["ctx"] else f"mixed (mean {r['mean_len']:.0f})"
    head = f"{r['variant']:<15} B={r['b']:<3} {ctx:<20} S={r['max_len']:<5} M={r['table_width']}"
    if r["error"]:
        print(f"{head}  ERROR {r['error'][:120]}", flush=True)
    elif "us" in r:
        cfg = "" if not r["config"] else " cfg=" + ",".join(str(v) for v in r["config"].values())
        floor = f"  floor {r['floor_us']:7.1f} us ({r['pct_floor']:5.1f}%)" if with_floor else ""
        print(f"{head}  {r['us']:9.1f} us{floor}  err {r['max_abs_err']:.1e}{cfg}", flush=True)
    else:
        print(f"{head}  err {r['max_abs_err']:.1e}  ({r.get('note', '')})", flush=True)


def capacity(args) -> list[dict]:
    """Sequences that fit a KV budget: dense slots of ``max_len`` against pages."""
    rng = np.random.default_rng(1)
    rows = []
    for model, budget_gib, dtype in args.capacity:
        layers, _, kh, h = MODELS[model]
        per_token = 2 * layers * kh * h * jnp.dtype(dtype).itemsize
        budget = int(budget_gib * 2**30)
        for max_len in args.capacity_max_lens:
            dense = budget // (max_len * per_token)
            pages = budget // (args.page_size * per_token) - 1  # minus the null page
            fits = []
            for _ in range(args.capacity_trials):
                lengths = mixed_lengths(rng, 4 * pages, max_len)
                need = np.cumsum(-(-lengths // args.page_size))
                fits.append(int(np.searchsorted(need, pages, side="right")))
            lengths = mixed_lengths(rng, 100_000, max_len)
            rows.append(
                dict(
                    model=model, dtype=dtype, budget_gib=budget_gib, max_len=max_len,
                    page_size=args.page_size, bytes_per_token=per_token,
                    mean_len=float(lengths.mean()), median_len=float(np.median(lengths)),
                    p99_len=float(np.percentile(lengths, 99)), dense_slots=int(dense),
                    paged_seqs=float(np.mean(fits)), paged_seqs_min=int(min(fits)),
                    ratio=float(np.mean(fits)) / max(dense, 1),
                )
            )  # fmt: skip
            r = rows[-1]
            print(
                f"capacity {model:<8} {dtype:<8} {budget_gib:6.1f} GiB  max_len {max_len:5d}  "
                f"mean len {r['mean_len']:6.0f}  dense {dense:6d}  paged {r['paged_seqs']:8.1f}"
                f"  x{r['ratio']:.2f}",
                flush=True,
            )
    return rows


def _capacity_spec(s: str):
    model, gib, dtype = s.split(":")
    return model, float(gib), dtype


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32")
    ap.add_argument("--ctx", type=int, nargs="*", default=None, help="every sequence this long")
    ap.add_argument("--max-len", type=int, default=2048, help="dense slot length (mixed mode)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 else")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--capacity",
        type=_capacity_spec,
        nargs="*",
        default=[("llama8b", 100.0, "bfloat16"), ("smollm2", 8.0, "float32")],
        help="MODEL:GiB:DTYPE budgets for the capacity table",
    )
    ap.add_argument("--capacity-max-lens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--capacity-trials", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run, not a measurement")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.max_len, args.page_size = "tiny", 128, 8
        args.batches = args.batches or [1, 4]
        args.ctx = args.ctx and [64]
        args.calls, args.runs, args.capacity_trials = 2, 1, 2
        args.capacity = [("tiny", 0.01, "float32")]
        args.capacity_max_lens = [1024]
    args.batches = args.batches or [1, 8, 32]
    dev = jax.devices()[0]
    result = {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "bandwidth_Bps": args.bandwidth,
        "calls_per_loop": args.calls,
        "runs": args.runs,
        "tiny": args.tiny,
        "attention": [],
        "capacity": [],
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")

    def save(records=None):
        if records is not None:
            result["attention"] = records
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    result["capacity"] = capacity(args)
    run_attention(args, save)
    save()
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
