"""Step-time table of the real engine on this machine: ``sunjax bench steps --out DIR``.

Measures, with the serving engine's own calls (``serve.DecodePool``, ``serve.Engine``):

* decode: one ``DecodePool.step()`` (one dispatch of every worker, tokens back on the host)
  against the number of active slots and their context length, for the plain shared tree
  (``sun``), the QSUN tree (``qsun``: ``sunjax.quant.quantize_tree`` with
  ``train.launch.QUANT_DEFAULTS``' layout, round-to-nearest: AWQ changes values, not cost) and
  per-worker trees (``conventional``);
* prefill: ``Engine.prefill`` of a prompt (plus the first token to the host, as the scheduler
  does) against its padded length, one point per bucket;
* hand-off: ``DecodePool.insert`` (``jax.device_put`` to the worker + jitted insert) against
  the prefix's KV bytes;
* release: ``DecodePool.set_active`` (what the scheduler calls after a step that frees slots);
* host work of the serving loop outside those calls (per step and per active slot, per
  admitted request, per submitted request), fitted on a saturating replay through
  ``serve.Scheduler`` after subtracting what the rest of the table charges
  (``host_overhead``).

Every point is the median over ``--repeats`` timings after a warm-up call, so compilation is
excluded. Writes ``DIR/steps.json`` (an ``apps.simulate.tables.StepTable`` with machine and JAX
metadata) and prints it. Default: the tiny random model of the serve tests, 4 workers x 8
slots (``configs/serve/tiny-sun.yaml``'s pool); ``--model`` takes a configs/models YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from apps.simulate.tables import TREES, Curve, Grid, StepTable, kv_bytes_per_token


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepsConfig:
    model: str | None = None  # configs/models YAML; None = the serve tests' tiny random model
    workers: int = 4
    slots_per_worker: int = 8
    max_len: int = 128
    min_bucket: int = 8
    batches: tuple[int, ...] = ()  # active slots in the pool; () = 1, a quarter, half, all
    ctxs: tuple[int, ...] = ()  # context lengths; () = four points up to max_len - steps
    steps: int = 8  # decode steps timed per grid point
    repeats: int = 5
    trees: tuple[str, ...] = TREES
    host_requests: int = 120  # requests replayed to time the host work per step (0 = skip)
    dtype: str | None = None  # override the model's dtype (e.g. bfloat16 on a GPU)
    seed: int = 0

    def __post_init__(self):
        for name in ("workers", "slots_per_worker", "steps", "repeats", "min_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        bad = sorted(set(self.trees) - set(TREES))
        if bad or not self.trees:
            raise ValueError(f"trees={self.trees} must be a non-empty subset of {TREES}")
        slots = self.workers * self.slots_per_worker
        if any(not 1 <= b <= slots for b in self.batches):
            raise ValueError(f"batches={self.batches} must lie in [1, {slots}]")
        if any(not 1 <= c <= self.max_len - self.steps - 1 for c in self.ctxs):
            raise ValueError(
                f"ctxs={self.ctxs} must lie in [1, max_len - steps - 1 = "
                f"{self.max_len - self.steps - 1}]"
            )

    @property
    def batch_grid(self) -> tuple[int, ...]:
        slots = self.workers * self.slots_per_worker
        return self.batches or tuple(sorted({1, max(slots // 4, 1), max(slots // 2, 1), slots}))

    @property
    def ctx_grid(self) -> tuple[int, ...]:
        top = self.max_len - self.steps - 1
        return self.ctxs or tuple(sorted({8, top // 4, top // 2, top}))


def ensure_cpu_devices(n: int) -> None:
    """Ask for ``n`` host devices when the backend is the CPU (before JAX starts it)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    except RuntimeError:  # backend already initialised: keep what it has
        pass


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _model(config: StepsConfig):
    import jax

    import sunjax
    from serve.loop import load_config
    from sunjax.config import ModelConfig
    from sunjax.configs import load_model_config

    over = {"dtype": config.dtype, "param_dtype": config.dtype} if config.dtype else {}
    if config.model is None:
        cfg = ModelConfig(**{**dict(load_config(None).model), **over})
    else:
        cfg = load_model_config(config.model, scan_layers=False, **over)
    params = jax.jit(sunjax.init_params, static_argnums=0)(cfg, jax.random.key(config.seed))
    return cfg, params


def qsun_tree(cfg, params):
    """The decode tree quantized with QSUN's default layout, by round-to-nearest."""
    import jax.numpy as jnp

    from sunjax.quant import QUANT_DEFAULTS, quantize_tree

    return quantize_tree(
        cfg,
        params,
        bits=QUANT_DEFAULTS["bits"],
        group_size=QUANT_DEFAULTS["group_size"],
        method="rtn",
        scale_dtype=jnp.dtype(QUANT_DEFAULTS["scale_dtype"]),
        int8=tuple(QUANT_DEFAULTS["int8"]),
    )


def time_decode(pool, prefixes: dict, batches: Sequence[int], ctxs: Sequence[int], config) -> Grid:
    """Median ``pool.step()`` over ``config.steps`` steps per (active slots, context) point.
    Active slots are spread over workers as the least-loaded router spreads them."""
    W, B = config.workers, config.slots_per_worker
    seconds = []
    for b in batches:
        row = []
        for c in ctxs:
            active = np.zeros(W * B, bool)
            for i in range(b):
                w, s = i % W, i // W
                pool.insert(prefixes[c], w, s)
                active[w * B + s] = True
            pool.set_active(active)
            pool.step()  # warm-up (compiled already: the shapes never change)
            times = []
            for _ in range(config.steps):
                t0 = time.perf_counter()
                pool.step()
                times.append(time.perf_counter() - t0)
            row.append(statistics.median(times))
        seconds.append(row)
    pool.set_active(np.zeros(W * B, bool))
    return Grid(batch=batches, ctx=ctxs, seconds=seconds)


def robust_fit(x: np.ndarray, y: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Least squares ``y ~ x @ c`` refitted without points more than 3 MADs off (a step that
    met a garbage collection or another process on the core is not the loop's cost)."""
    keep = np.ones(len(y), bool)
    for _ in range(rounds):
        c, *_ = np.linalg.lstsq(x[keep], y[keep], rcond=None)
        r = y - x @ c
        mad = np.median(np.abs(r[keep] - np.median(r[keep]))) + 1e-12
        keep = np.abs(r - np.median(r[keep])) <= 3 * 1.4826 * mad
    return c


def host_overhead(pool, prefill_params: dict, router, table: StepTable, tree: str, config):
    """The serving loop's host work outside the calls the table times, from a real replay:
    ``config.host_requests`` requests go through ``serve.Scheduler`` (all queued at once, so
    the pool is saturated); ``submit`` is timed per request, and every ``step()``'s time minus
    what the table charges for it (its prefills, hand-offs, pool step, release) is fitted by
    least squares as ``host_a + host_b * active slots + admit * admitted requests``.
    Returns ``(host_step curve over active slots, admit seconds, submit seconds)``."""
    for _ in range(2):  # a first, untimed replay compiles what the table did not call
        rows, resid, submit = _replay(pool, prefill_params, router, table, tree, config)
    (a, b, admit) = robust_fit(np.asarray(rows), np.asarray(resid))
    top = config.workers * config.slots_per_worker
    curve = Curve(x=(1, top), seconds=(max(a + b, 0.0), max(a + b * top, 0.0)))
    return curve, max(float(admit), 0.0), statistics.median(submit)


def _replay(pool, prefill_params: dict, router, table: StepTable, tree: str, config):
    """One saturating replay: per ``step()`` the row ``(1, batch, admitted)`` and its time
    beyond what the table charges; and each ``submit``'s time."""
    from serve import Request, Scheduler

    sched = Scheduler(pool, prefill_params, router, max_queue=10**6)
    rng = np.random.default_rng(config.seed)
    tasks = sorted(prefill_params)
    vocab = pool.cfg.vocab_size
    submit = []
    for i in range(config.host_requests):
        n = int(rng.integers(4, config.max_len // 4))
        req = Request(
            id=f"h{i}",
            model=tasks[i % len(tasks)],
            prompt=tuple(int(t) for t in rng.integers(0, vocab, n)),
            max_tokens=int(rng.integers(4, config.max_len // 4)),
        )
        t0 = time.perf_counter()
        sched.submit(req)
        submit.append(time.perf_counter() - t0)
    rows, resid = [], []
    while sched.busy:
        queued = {live.request.id: len(live.request.prompt) for live in sched.queue}
        done = len(sched.results)
        t0 = time.perf_counter()
        sched.step()
        dt = time.perf_counter() - t0
        left = {live.request.id for live in sched.queue}
        admitted = [n for rid, n in queued.items() if rid not in left]
        freed = len(sched.results) - done  # max_tokens >= 4: none finishes at its prefill
        batch = int(sched.active.sum()) + freed  # the slots the pool step advanced
        if batch == 0:
            continue
        ctx = float(np.mean(pool.lengths()[sched.active])) if sched.active.any() else 8.0
        charged = sum(table.prefill_time(n) + table.handoff_time(n) for n in admitted)
        charged += table.decode_time(tree, batch, ctx) + (table.release if freed else 0.0)
        rows.append((1.0, batch, len(admitted)))
        resid.append(dt - charged)
    return rows, resid, submit


def measure(config: StepsConfig) -> StepTable:
    import jax

    from serve import DecodePool, Engine, EngineConfig, LeastLoaded
    from sunjax import quant
    from sunjax.generate import buckets
    from sunjax.sampling import SamplingParams

    cfg, params = _model(config)
    pc = EngineConfig(
        workers=config.workers,
        slots_per_worker=config.slots_per_worker,
        max_len=config.max_len,
        min_bucket=config.min_bucket,
    )
    eng = Engine(cfg, pc)
    sp = SamplingParams.create(1)

    def prefill(n: int):
        prefix = eng.prefill(params, [1] * n, sp)
        int(prefix.token)  # the scheduler reads the first token at once
        return prefix

    lengths = buckets(config.min_bucket, config.max_len)
    prefill_s = [median_time(lambda n=n: prefill(n), config.repeats) for n in lengths]
    prefixes = {n: prefill(n) for n in set(lengths) | set(config.ctx_grid)}

    def warm(pool) -> None:  # insert compiles per (prompt bucket, worker device): all of them
        for n in lengths:
            for w in range(config.workers):
                pool.insert(prefixes[n], w, 0)
        pool.set_active(np.zeros(pool.slots, bool))
        pool.step()

    trees = {}
    for name in config.trees:
        if name == "sun":
            trees[name] = DecodePool(cfg, pc, decode_params=params)
        elif name == "qsun":
            trees[name] = DecodePool(cfg, pc, decode_params=qsun_tree(cfg, params))
        else:
            trees[name] = DecodePool(cfg, pc, worker_params=[params] * config.workers)
    for p in trees.values():
        warm(p)
    pool = next(iter(trees.values()))

    def handoff(prefix):
        pool.insert(prefix, config.workers - 1, 0)
        jax.block_until_ready(pool.state)

    kv = [quant.tree_bytes(prefixes[n].cache) for n in lengths]
    handoff_s = [median_time(lambda n=n: handoff(prefixes[n]), config.repeats) for n in lengths]
    mask = np.zeros(pool.slots, bool)

    def release():
        pool.set_active(mask)
        jax.block_until_ready(pool.state)

    release_s = median_time(release, config.repeats)

    decode = {
        name: time_decode(p, prefixes, config.batch_grid, config.ctx_grid, config)
        for name, p in trees.items()
    }
    table = StepTable(
        kind="measured",
        label=f"measured on {jax.devices()[0].device_kind} ({platform.node()})",
        decode=decode,
        prefill=Curve(x=lengths, seconds=prefill_s),
        handoff=Curve(x=kv, seconds=handoff_s),
        release=release_s,
        kv_bytes_per_token=kv_bytes_per_token(cfg),
        prefill_bucket=config.min_bucket,
        pool={"workers": config.workers, "slots_per_worker": config.slots_per_worker},
        meta={
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind,
            "devices": len(jax.devices()),
            "host": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": dataclasses.asdict(cfg),
            "config": dataclasses.asdict(config),
            "max_len": config.max_len,
        },
    )
    if config.host_requests and "sun" in trees:
        prefill_params = {"a": params, "b": params}
        host, admit, submit = host_overhead(
            trees["sun"], prefill_params, LeastLoaded(config.workers), table, "sun", config
        )
        table = dataclasses.replace(table, host_step=host, admit=admit, submit=submit)
    return table


def summary_lines(table: StepTable) -> list[str]:
    lines = [table.label]
    for name, g in table.decode.items():
        lines.append(
            f"decode[{name}] ms  (rows: active slots {list(map(int, g.batch))}; "
            f"cols: ctx {list(map(int, g.ctx))})"
        )
        lines += ["  " + " ".join(f"{s * 1e3:7.3f}" for s in row) for row in g.seconds]
    lines.append(
        "prefill ms by tokens: "
        + ", ".join(
            f"{int(x)}: {s * 1e3:.3f}"
            for x, s in zip(table.prefill.x, table.prefill.seconds, strict=True)
        )
    )
    lines.append(
        "hand-off ms by KV bytes: "
        + ", ".join(
            f"{int(x)}: {s * 1e3:.3f}"
            for x, s in zip(table.handoff.x, table.handoff.seconds, strict=True)
        )
    )
    lines.append(
        f"release ms: {table.release * 1e3:.3f}; admit (host) ms: {table.admit * 1e3:.3f}; "
        f"submit ms: {table.submit * 1e3:.3f}"
    )
    if table.host_step is not None:
        lines.append(
            "host ms per step by active slots: "
            + ", ".join(
                f"{int(x)}: {s * 1e3:.3f}"
                for x, s in zip(table.host_step.x, table.host_step.seconds, strict=True)
            )
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sunjax bench steps", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (writes steps.json)")
    ap.add_argument("--model", default=None, help="configs/models YAML (default: tiny random)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=8, help="slots per worker")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--min-bucket", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="*", default=())
    ap.add_argument("--ctxs", type=int, nargs="*", default=())
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trees", nargs="+", default=list(TREES), choices=TREES)
    ap.add_argument("--host-requests", type=int, default=120)
    args = ap.parse_args(argv)
    config = StepsConfig(
        model=args.model,
        dtype=args.dtype,
        workers=args.workers,
        slots_per_worker=args.slots,
        max_len=args.max_len,
        min_bucket=args.min_bucket,
        batches=tuple(args.batches),
        ctxs=tuple(args.ctxs),
        steps=args.steps,
        repeats=args.repeats,
        trees=tuple(args.trees),
        host_requests=args.host_requests,
    )
    ensure_cpu_devices(config.workers)
    table = measure(config)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "steps.json")
    table.save(path)
    print("\n".join(summary_lines(table)))
    print(json.dumps({"wrote": path}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
