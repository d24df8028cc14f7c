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
  (``StepBench._host_fit``).

Everything is compiled and warmed up first, then measured in ``--repeats`` rounds (each
round times every point once: ``StepBench``); a point is the median over the rounds, so a
machine whose speed drifts affects every point alike. Writes ``DIR/steps.json`` (an
``apps.simulate.tables.StepTable`` with machine and JAX metadata) and prints it. Default:
the tiny random model of the serve tests, 4 workers x 8 slots
(``configs/serve/tiny-sun.yaml``'s pool); ``--model`` takes a configs/models YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from apps.simulate.tables import TREES, Curve, Grid, StepTable, kv_bytes_per_token


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepsConfig:
    model: str | None = None  # configs/models YAML, or "module:NAME" of a ModelConfig (e.g.
    # "apps.tiny:TINY", the cluster tests' model); None = the serve tests' tiny random model
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
    tasks: int = 4  # distinct prefill trees, used in turn (a multi-task engine's prefills)
    dtype: str | None = None  # override the model's dtype (e.g. bfloat16 on a GPU)
    seed: int = 0

    def __post_init__(self):
        for name in ("workers", "slots_per_worker", "steps", "repeats", "min_bucket", "tasks"):
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


def _model(config: StepsConfig):
    import jax

    import sunjax
    from serve.loop import load_config
    from sunjax.config import ModelConfig
    from sunjax.configs import load_model_config

    over = {"dtype": config.dtype, "param_dtype": config.dtype} if config.dtype else {}
    if config.model is None:
        cfg = ModelConfig(**{**dict(load_config(None).model), **over})
    elif ":" in config.model and not os.path.exists(config.model):
        import importlib

        module, name = config.model.split(":")
        base = getattr(importlib.import_module(module), name)
        cfg = dataclasses.replace(base, **over) if over else base
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


class StepBench:
    """The table's measurements, taken in rounds.

    ``round()`` times ``config.steps`` fed decode steps per grid cell and tree (each after a
    prefill and a hand-off, which are the prefill and hand-off samples: ``_decode_cell``),
    the release, and one saturating host replay, and keeps the samples; ``table()`` turns
    all rounds into a ``StepTable`` (medians; the host cost fitted on every replay).

    ``feed`` replaces how a timed step is fed and run (default: the single-process loop's
    way, above): ``feed.handoff(bench, pool, n, task, worker, slot)`` puts a prompt of ``n``
    tokens of task ``task`` into the slot and records its samples in ``bench.samples``;
    ``feed.step(bench, pool, b)`` runs one decode step of ``b`` active slots and returns the
    pool step's seconds; ``feed.finish(bench, table)`` adds what it measured to the table.
    ``apps.simulate.validate.ClusterFeed`` feeds a cluster's decode instance this way.

    Rounds let a caller interleave the table with other timed work
    (``apps.simulate.validate`` puts a round before each repeat of the real runs), so a
    machine whose speed drifts over seconds (a shared VM) shifts both sides alike instead of
    biasing one of them."""

    def __init__(self, config: StepsConfig, feed=None):
        import jax
        import jax.numpy as jnp

        from serve import DecodePool, Engine, EngineConfig, LeastLoaded
        from sunjax.generate import buckets
        from sunjax.sampling import SamplingParams

        self.config = config
        self.cfg, self.params = cfg, params = _model(config)
        pc = EngineConfig(
            workers=config.workers,
            slots_per_worker=config.slots_per_worker,
            max_len=config.max_len,
            min_bucket=config.min_bucket,
        )
        self.engine, self.sampling = Engine(cfg, pc), SamplingParams.create(1)
        self.lengths = buckets(config.min_bucket, config.max_len)
        # task prefill trees: copies (distinct buffers; the values do not change the cost)
        copies = [jax.tree.map(jnp.copy, params) for _ in range(config.tasks - 1)]
        self.task_params = [params, *copies]
        self._fed = 0  # prefills run so far (picks the next tree and prompt length)
        self.prefixes = {n: self.prefill(n) for n in set(self.lengths) | set(config.ctx_grid)}
        self.trees = {}
        for name in config.trees:
            if name == "sun":
                self.trees[name] = DecodePool(cfg, pc, decode_params=params)
            elif name == "qsun":
                self.trees[name] = DecodePool(cfg, pc, decode_params=qsun_tree(cfg, params))
            else:
                self.trees[name] = DecodePool(cfg, pc, worker_params=[params] * config.workers)
        for pool in self.trees.values():  # insert compiles per (bucket, worker device)
            for n in self.lengths:
                for w in range(config.workers):
                    pool.insert(self.prefixes[n], w, 0)
            pool.set_active(np.zeros(pool.slots, bool))
            pool.step()
        self.pool = next(iter(self.trees.values()))
        self.host_tree = "sun" if config.host_requests and "sun" in self.trees else None
        if self.host_tree:
            self.router = LeastLoaded(config.workers)
            self.host_params = {f"task{i}": p for i, p in enumerate(self.task_params)}
            self._replay()  # compiles what the timed calls do not (a new Scheduler's path)
        self.samples: dict = {"prefill": {}, "handoff": {}, "release": [], "decode": {}}
        self.replays: list[tuple[list, list]] = []  # per round: (step records, submit times)
        self.round_s: list[float] = []  # per round: the time its fed decode cells took
        self._jax = jax
        self.feed = feed
        if feed is not None:
            feed.warm(self)

    def prefill(self, n: int, task: int = 0):
        prefix = self.engine.prefill(self.task_params[task], [1] * n, self.sampling)
        int(prefix.token)  # the scheduler reads the first token at once
        return prefix

    def _timed(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def _decode_cell(self, name: str, b: int, c: int) -> None:
        """``config.steps`` decode steps with ``b`` slots active at context ``c`` (spread
        over workers as the least-loaded router spreads them), each fed as a saturated
        serving loop feeds it: a prefill (the next task tree and prompt length in turn), its
        hand-off into a slot outside the batch (blocking), then the timed ``pool.step()``.
        All three are samples: measured one call type at a time, back to back, each runs
        10-40 % faster on the CPU than between the others, as the serving loop runs it."""
        config, s, pool = self.config, self.samples, self.trees[name]
        W, B = config.workers, config.slots_per_worker
        active = np.zeros(W * B, bool)
        for i in range(b):
            w, k = i % W, i // W
            pool.insert(self.prefixes[c], w, k)
            active[w * B + k] = True
        pool.set_active(active)
        pool.step()  # compiled already (the shapes never change); settles the new state
        cell = s["decode"].setdefault((name, b, c), [])
        for _ in range(config.steps):
            n = self.lengths[self._fed % len(self.lengths)]
            task = self._fed % config.tasks
            self._fed += 1
            if self.feed is not None:
                self.feed.handoff(self, pool, n, task, W - 1, B - 1)
                cell.append(self.feed.step(self, pool, b))
                continue
            t0 = time.perf_counter()
            prefix = self.prefill(n, task)
            t1 = time.perf_counter()
            pool.insert(prefix, W - 1, B - 1)
            self._jax.block_until_ready(pool.state)
            t2 = time.perf_counter()
            pool.step()
            t3 = time.perf_counter()
            s["prefill"].setdefault(n, []).append(t1 - t0)
            s["handoff"].setdefault(n, []).append(t2 - t1)
            cell.append(t3 - t2)
        pool.set_active(np.zeros(W * B, bool))

    def _release(self) -> None:
        self.pool.set_active(np.zeros(self.pool.slots, bool))
        self._jax.block_until_ready(self.pool.state)

    def round(self) -> None:
        """One sample of every point of the table (see the class docstring)."""
        s, config = self.samples, self.config
        s["release"].append(self._timed(self._release))
        t0 = time.perf_counter()
        for name in self.trees:
            for b in config.batch_grid:
                for c in config.ctx_grid:
                    self._decode_cell(name, b, c)
        self.round_s.append(time.perf_counter() - t0)
        if self.host_tree:
            self.replays.append(self._replay())

    def _replay(self) -> tuple[list, list]:
        """One saturating replay through ``serve.Scheduler`` (all requests queued at once):
        per ``step()`` its time, the prompt lengths it admitted, the slots it advanced and
        their mean context; and each ``submit``'s time."""
        from serve import Request, Scheduler

        config, pool = self.config, self.trees[self.host_tree]
        sched = Scheduler(pool, self.host_params, self.router, max_queue=10**6)
        rng = np.random.default_rng(config.seed)
        tasks = sorted(self.host_params)
        submit = []
        for i in range(config.host_requests):
            n = int(rng.integers(4, config.max_len // 4))
            req = Request(
                id=f"h{i}",
                model=tasks[i % len(tasks)],
                prompt=tuple(int(t) for t in rng.integers(0, self.cfg.vocab_size, n)),
                max_tokens=int(rng.integers(4, config.max_len // 4)),
            )
            submit.append(self._timed(lambda req=req: sched.submit(req)))
        records = []
        while sched.busy:
            queued = {live.request.id: len(live.request.prompt) for live in sched.queue}
            done = len(sched.results)
            dt = self._timed(sched.step)
            left = {live.request.id for live in sched.queue}
            admitted = [n for rid, n in queued.items() if rid not in left]
            freed = len(sched.results) - done  # max_tokens >= 4: none finishes at its prefill
            batch = int(sched.active.sum()) + freed  # the slots the pool step advanced
            if batch == 0:
                continue
            ctx = float(np.mean(pool.lengths()[sched.active])) if sched.active.any() else 8.0
            records.append((dt, admitted, batch, ctx, freed))
        return records, submit

    def rounds(self) -> int:
        return len(self.samples["release"])

    def drift(self) -> float:
        """How much the machine's speed moved between rounds: ``max / min - 1`` of the time
        each round's decode cells took (the same calls every round)."""
        return max(self.round_s) / min(self.round_s) - 1

    def table(self) -> StepTable:
        """The medians of every round so far (at least one) as a ``StepTable``."""
        import jax

        from sunjax import quant

        if not self.rounds():
            raise ValueError("StepBench.table() needs at least one round()")
        s, config = self.samples, self.config
        med = statistics.median
        decode = {
            name: Grid(
                batch=config.batch_grid,
                ctx=config.ctx_grid,
                seconds=[
                    [med(s["decode"][(name, b, c)]) for c in config.ctx_grid]
                    for b in config.batch_grid
                ],
            )
            for name in self.trees
        }
        table = StepTable(
            kind="measured",
            label=f"measured on {jax.devices()[0].device_kind} ({platform.node()})",
            decode=decode,
            prefill=Curve(x=self.lengths, seconds=[med(s["prefill"][n]) for n in self.lengths]),
            handoff=Curve(
                x=[quant.tree_bytes(self.prefixes[n].cache) for n in self.lengths],
                seconds=[med(s["handoff"][n]) for n in self.lengths],
            ),
            release=med(s["release"]),
            kv_bytes_per_token=kv_bytes_per_token(self.cfg),
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
                "model": dataclasses.asdict(self.cfg),
                "config": dataclasses.asdict(config),
                "max_len": config.max_len,
                "rounds": self.rounds(),
            },
        )
        if self.host_tree:
            host, admit, submit = self._host_fit(table)
            table = dataclasses.replace(table, host_step=host, admit=admit, submit=submit)
        if self.feed is not None:
            table = self.feed.finish(self, table)
        return table

    def _host_fit(self, table: StepTable) -> tuple[Curve, float, float]:
        """The serving loop's host work outside the calls the table times: every replayed
        ``step()``'s time minus what ``table`` charges for it (its prefills, hand-offs, pool
        step, release), fitted by least squares as ``host_a + host_b * active slots + admit
        * admitted requests``. Returns ``(host_step curve over active slots, admit seconds,
        submit seconds)``."""
        rows, resid, submit = [], [], []
        for records, sub in self.replays:
            submit += sub
            for dt, admitted, batch, ctx, freed in records:
                charged = sum(table.prefill_time(n) + table.handoff_time(n) for n in admitted)
                charged += table.decode_time(self.host_tree, batch, ctx)
                charged += table.release if freed else 0.0
                rows.append((1.0, batch, len(admitted)))
                resid.append(dt - charged)
        a, b, admit = robust_fit(np.asarray(rows), np.asarray(resid))
        top = self.config.workers * self.config.slots_per_worker
        curve = Curve(x=(1, top), seconds=(max(a + b, 0.0), max(a + b * top, 0.0)))
        return curve, max(float(admit), 0.0), statistics.median(submit)


def measure(config: StepsConfig) -> StepTable:
    """``config.repeats`` rounds of ``StepBench``, back to back."""
    bench = StepBench(config)
    for _ in range(config.repeats):
        bench.round()
    return bench.table()


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
    ap.add_argument("--tasks", type=int, default=4, help="distinct prefill trees used in turn")
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
        tasks=args.tasks,
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
