"""A discrete-event model (simpy) of disaggregated serving, timed only by a ``StepTable``.

Two shapes of the same request flow (admit -> prefill with the task's module -> first token
-> route -> KV hand-off -> continuous-batched decode steps -> free the slot):

* ``mode="cluster"``: ``prefill_instances`` prefill instances split over the tasks in
  proportion to their traffic, at least one each (one prompt at a time each);
  ``decode_instances`` decode instances of ``slots`` slots each, every instance stepping on its
  own with a step time looked up for *its* batch and context; a finished
  prefill is routed at once (least-loaded over all instances for SUN / QSUN, model-affine for
  conventional) and joins its instance's batch at the next step after the hand-off; when no
  allowed instance has a free slot it waits in one FIFO queue.
  Two options describe ``sunjax cluster`` (``serve.cluster``) as it runs:
  ``prefill_shared``: the ``prefill_instances`` (default 1) each host every task and serve
  one queue in turn (one prefill process holding all task modules), instead of instances
  per task; ``route="before_prefill"``: the frontend reserves a decode slot first and only
  then sends the prefill, so a request waits in the FIFO queue *before* its prefill and the
  reserved slot stays empty through prefill and hand-off. Each control message between
  processes costs the table's ``hop`` (0 in tables without one): a freed slot reaches the
  frontend one hop after its step (the step's ``host_time`` covers the tokens message),
  the prefill request one hop after routing, and the decode request two hops (prefilled ->
  frontend -> decode instance) after the prefill. A table's ``handoff_decode`` (the
  hand-off's work in the decode instance's own loop) is added to the step a request joins.
* ``mode="engine"``: the single-process serving loop of ``serve.loop.replay`` /
  ``serve.Scheduler.step`` on one host: every iteration admits what fits (prefill and hand-off
  of each admitted request in turn), then runs one decode step of the whole pool (all
  ``decode_instances`` workers in one dispatch), then frees finished slots. Nothing overlaps,
  so the CPU engine's throughput, TPOT and decode steps can be predicted and checked.

Routers are the engine's own (``serve.LeastLoaded``, ``serve.ModelAffine``). No time in this
module is a constant: prefill, hand-off, decode step, release and host work all come from the
table.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np
import simpy

from apps.simulate.tables import StepTable
from serve import LeastLoaded, ModelAffine

POLICIES = ("sun", "qsun", "conventional")
MODES = ("cluster", "engine")
SPLITS = ("even", "popularity")
ROUTES = ("after_prefill", "before_prefill")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    policy: str = "sun"  # "sun" | "qsun" (shared decode pool) | "conventional" (per model)
    decode_instances: int = 4
    slots: int = 8  # decode slots per instance
    prefill_instances: int | None = None  # cluster mode; None = one per task model. Split
    # over tasks in proportion to their traffic, at least one each, the same for every policy
    mode: str = "cluster"  # "cluster" | "engine"
    split: str = "even"  # conventional: "even" (ModelAffine.split) or "popularity"
    prefill_shared: bool = False  # cluster mode: prefill instances host every task, one queue
    route: str = "after_prefill"  # cluster mode: "before_prefill" = reserve the slot first

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} must be one of {POLICIES}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} must be one of {SPLITS}")
        if self.route not in ROUTES:
            raise ValueError(f"route={self.route!r} must be one of {ROUTES}")
        for name in ("decode_instances", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.prefill_instances is not None and self.prefill_instances < 1:
            raise ValueError(f"prefill_instances={self.prefill_instances} must be >= 1 or None")

    @property
    def shared(self) -> bool:
        return self.policy != "conventional"


@dataclasses.dataclass(frozen=True)
class SimRequest:
    id: str
    at: float  # arrival (s)
    model: str
    prompt_len: int
    output_len: int  # tokens generated (the first by prefill), i.e. max_tokens without EOS


# -- workloads --------------------------------------------------------------------------------
def from_arrivals(arrivals) -> list[SimRequest]:
    """``serve.workload.make_workload`` arrivals -> requests (the engine's exact workload)."""
    return [
        SimRequest(a.request.id, a.at, a.request.model, len(a.request.prompt), a.request.max_tokens)
        for a in arrivals
    ]


def read_jsonl(path: str) -> list[SimRequest]:
    """A request file as ``sunjax serve-loop`` reads it: per line ``model``, ``arrival`` (s),
    ``max_tokens`` and ``prompt_ids`` (or ``prompt_len`` when only lengths are known)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            if "prompt_ids" in d:
                plen = len(d["prompt_ids"])
            elif "prompt_len" in d:
                plen = int(d["prompt_len"])
            else:
                raise ValueError(f"{path}:{n}: needs prompt_ids or prompt_len")
            out.append(
                SimRequest(
                    str(d.get("id", f"line-{n}")),
                    float(d.get("arrival", 0.0)),
                    d["model"],
                    plen,
                    int(d.get("max_tokens", 64)),
                )
            )
    return sorted(out, key=lambda r: r.at)


def synthetic(
    *,
    requests: int,
    rate: float,
    zipf_alpha: float,
    tasks: Sequence[str],
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int = 0,
) -> list[SimRequest]:
    """Poisson arrivals at ``rate``/s, Zipf(alpha) over ``tasks``, uniform lengths (inclusive
    ranges): the distributions of ``serve.workload.make_workload`` without the token ids."""
    if requests < 1 or rate <= 0 or zipf_alpha < 0 or not tasks:
        raise ValueError(
            f"need requests >= 1, rate > 0, zipf_alpha >= 0, tasks; got "
            f"{requests=} {rate=} {zipf_alpha=} {tasks=}"
        )
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, requests)
    at = np.cumsum(gaps) - gaps[0]
    which = rng.choice(len(tasks), size=requests, p=zipf_weights(len(tasks), zipf_alpha))
    plen = rng.integers(prompt_len[0], prompt_len[1] + 1, requests)
    olen = rng.integers(output_len[0], output_len[1] + 1, requests)
    return [
        SimRequest(f"req-{i}", float(at[i]), tasks[which[i]], int(plen[i]), int(olen[i]))
        for i in range(requests)
    ]


def zipf_weights(m: int, alpha: float) -> np.ndarray:
    w = 1.0 / np.arange(1, m + 1, dtype=np.float64) ** alpha
    return w / w.sum()


def proportional(workers: int, weights: Sequence[float]) -> list[int]:
    """``workers`` split in proportion to ``weights`` (largest remainder), at least one each."""
    m = len(weights)
    if m > workers:
        raise ValueError(f"need a worker per model: {m} models > {workers=}")
    w = np.asarray(weights, float) / np.sum(weights)
    share = 1 + w * (workers - m)
    n = np.floor(share).astype(int)
    for i in np.argsort(-(share - n))[: workers - int(n.sum())]:
        n[i] += 1
    return [int(k) for k in n]


def popularity_split(tasks: Sequence[str], workers: int, weights: Sequence[float]) -> ModelAffine:
    """Model-affine assignment with workers in proportion to traffic, at least one each: the
    strongest static conventional deployment for a known skew."""
    n = proportional(workers, weights)
    assignment, start = {}, 0
    for t, k in zip(tasks, n, strict=True):
        assignment[t] = tuple(range(start, start + int(k)))
        start += int(k)
    return ModelAffine(assignment)


# -- the model --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Live:
    req: SimRequest
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    worker: int | None = None

    @property
    def ctx(self) -> int:
        return self.req.prompt_len + self.tokens


@dataclasses.dataclass
class _Counters:
    steps: int = 0
    occupancy: float = 0.0  # sum over steps of batch / slots
    busy: float = 0.0  # decode-instance seconds spent stepping


class _Instance:
    def __init__(self, env: simpy.Environment, slots: int):
        self.env, self.slots = env, slots
        self.active: list[_Live] = []
        self.joining: list[_Live] = []
        self.reserved = 0
        self.wake = env.event()

    @property
    def free(self) -> int:
        return self.slots - len(self.active) - len(self.joining) - self.reserved

    def notify(self) -> None:
        if not self.wake.triggered:
            self.wake.succeed()


class Simulation:
    def __init__(
        self,
        config: ClusterConfig,
        table: StepTable,
        tasks: Sequence[str],
        weights: Sequence[float] | None = None,
    ):
        self.config, self.table = config, table
        self.tasks = list(tasks)
        self.tree = table.tree_for(config.policy)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.tasks)
        if config.prefill_shared:
            self.prefill = [config.prefill_instances or 1]  # one pool serving every task
        else:
            self.prefill = proportional(config.prefill_instances or len(self.tasks), self.weights)
        n = config.decode_instances
        if config.shared:
            self.router = LeastLoaded(n)
        elif config.split == "popularity":
            self.router = popularity_split(self.tasks, n, self.weights)
        else:
            self.router = ModelAffine.split(self.tasks, n)
        if config.mode == "engine" and table.pool:
            want = (table.pool["workers"], table.pool["slots_per_worker"])
            if want != (n, config.slots):
                raise ValueError(
                    f"engine mode on a table measured for workers x slots = {want} cannot "
                    f"model decode_instances={n} x slots={config.slots}"
                )

    def run(self, requests: Sequence[SimRequest]) -> dict:
        if not requests:
            raise ValueError("no requests")
        unknown = sorted({r.model for r in requests} - set(self.tasks))
        if unknown:
            raise ValueError(f"requests name unknown task models {unknown}; known {self.tasks}")
        env = simpy.Environment()
        lives = [_Live(r) for r in sorted(requests, key=lambda r: r.at)]
        counters = _Counters()
        if self.config.mode == "engine":
            env.process(self._engine(env, lives, counters))
        else:
            self._cluster(env, lives, counters)
        env.run()
        return self._summary(lives, counters)

    # -- engine mode: one host loop, nothing overlaps ----------------------------------------
    def _engine(self, env, lives: list[_Live], c: _Counters):
        t, cfg = self.table, self.config
        W, B = cfg.decode_instances, cfg.slots
        queue: collections.deque[_Live] = collections.deque()
        slots: list[_Live | None] = [None] * (W * B)
        i = 0
        while i < len(lives) or queue or any(s is not None for s in slots):
            arrived = 0
            while i < len(lives) and lives[i].req.at <= env.now:
                queue.append(lives[i])
                i, arrived = i + 1, arrived + 1
            if arrived:
                yield env.timeout(t.submit * arrived)
            free = [sum(s is None for s in slots[w * B : (w + 1) * B]) for w in range(W)]
            for live in list(queue):
                if not any(free):
                    break
                w = self.router.pick(live.req.model, free)
                if w is None:
                    continue
                queue.remove(live)
                yield env.timeout(t.admit + t.prefill_time(live.req.prompt_len))
                live.first, live.tokens, live.worker = env.now, 1, w
                if live.tokens >= live.req.output_len:
                    live.done = env.now
                    continue
                yield env.timeout(t.handoff_time(live.req.prompt_len))
                local = next(k for k in range(B) if slots[w * B + k] is None)
                slots[w * B + local] = live
                free[w] -= 1
            active = [s for s in slots if s is not None]
            if not active:
                if i < len(lives) and not queue:
                    yield env.timeout(max(lives[i].req.at - env.now, 0.0))
                continue
            ctx = float(np.mean([s.ctx for s in active]))
            dt = t.decode_time(self.tree, len(active), ctx) + t.host_time(len(active))
            yield env.timeout(dt)
            c.steps += 1
            c.occupancy += len(active) / len(slots)
            c.busy += dt * W
            freed = False
            for k, s in enumerate(slots):
                if s is None:
                    continue
                s.tokens += 1
                if s.tokens >= s.req.output_len:
                    s.done, slots[k], freed = env.now, None, True
            if freed:
                yield env.timeout(t.release)

    # -- cluster mode: instances run side by side --------------------------------------------
    def _cluster(self, env, lives: list[_Live], c: _Counters) -> None:
        t, cfg = self.table, self.config
        instances = [_Instance(env, cfg.slots) for _ in range(cfg.decode_instances)]
        if cfg.prefill_shared:
            pool = simpy.Resource(env, capacity=self.prefill[0])
            prefill = dict.fromkeys(self.tasks, pool)
        else:
            prefill = {
                m: simpy.Resource(env, capacity=k)
                for m, k in zip(self.tasks, self.prefill, strict=True)
            }
        pending: collections.deque[_Live] = collections.deque()
        before = cfg.route == "before_prefill"

        def run_prefill(live: _Live):
            with prefill[live.req.model].request() as slot:
                yield slot
                yield env.timeout(t.prefill_time(live.req.prompt_len))
            live.first, live.tokens = env.now, 1

        def reserved(live: _Live, inst: _Instance):  # route="before_prefill": slot held
            yield env.timeout(t.hop)  # frontend -> prefill instance
            yield from run_prefill(live)
            if live.tokens >= live.req.output_len:
                live.done = env.now
                inst.reserved -= 1
                drain()
                return
            yield env.timeout(2 * t.hop)  # prefilled -> frontend -> decode instance
            yield from handoff(live, inst)

        def handoff(live: _Live, inst: _Instance):
            yield env.timeout(t.handoff_time(live.req.prompt_len))
            inst.reserved -= 1
            inst.joining.append(live)
            inst.notify()

        def place(live: _Live) -> bool:
            w = self.router.pick(live.req.model, [x.free for x in instances])
            if w is None:
                return False
            live.worker = w
            instances[w].reserved += 1
            env.process((reserved if before else handoff)(live, instances[w]))
            return True

        def drain() -> None:
            blocked: set[str] = set()  # models none of whose instances has a free slot
            kept: list[_Live] = []
            while pending:
                live = pending.popleft()
                if live.req.model in blocked or not place(live):
                    blocked.add(live.req.model)
                    kept.append(live)
                    if len(blocked) == len(self.tasks) or self.config.shared:
                        break
            pending.extendleft(reversed(kept))

        def request(live: _Live):
            yield env.timeout(live.req.at)
            if before:
                if pending or not place(live):
                    pending.append(live)
                    drain()
                return
            yield from run_prefill(live)
            if live.tokens >= live.req.output_len:
                live.done = env.now
                return
            if pending or not place(live):
                pending.append(live)
                drain()

        def drain_later(delay: float):
            yield env.timeout(delay)
            drain()

        def decode(inst: _Instance):
            while True:
                joined = sum(t.handoff_decode_time(j.req.prompt_len) for j in inst.joining)
                inst.active += inst.joining
                inst.joining = []
                if not inst.active:
                    inst.wake = env.event()
                    yield inst.wake
                    continue
                n = len(inst.active)
                ctx = sum(s.ctx for s in inst.active) / n
                dt = t.decode_time(self.tree, n, ctx) + t.host_time(n) + joined
                yield env.timeout(dt)
                c.steps += 1
                c.occupancy += n / inst.slots
                c.busy += dt
                still = []
                for s in inst.active:
                    s.tokens += 1
                    if s.tokens >= s.req.output_len:
                        s.done = env.now
                    else:
                        still.append(s)
                if len(still) < n:
                    inst.active = still
                    if t.release:
                        yield env.timeout(t.release)
                    if t.hop:
                        env.process(drain_later(t.hop))  # the tokens message in flight
                    else:
                        drain()
                if not inst.joining and not inst.active:
                    inst.wake = env.event()

        for live in lives:
            env.process(request(live))
        for inst in instances:
            env.process(decode(inst))

    # -- results --------------------------------------------------------------------------------
    def _summary(self, lives: list[_Live], c: _Counters) -> dict:
        cfg = self.config
        if any(x.done is None for x in lives):
            raise RuntimeError("simulation ended with unfinished requests")
        start = min(x.req.at for x in lives)
        wall = max(x.done for x in lives) - start
        tokens = sum(x.tokens for x in lives)
        ttft = [x.first - x.req.at for x in lives]
        tpot = [(x.done - x.first) / (x.tokens - 1) for x in lives if x.tokens > 1]
        pct = lambda v, q: float(np.percentile(v, q)) * 1e3 if v else None
        decode_gpus = cfg.decode_instances
        prefill_gpus = 0 if cfg.mode == "engine" else sum(self.prefill)
        gpus = decode_gpus + prefill_gpus
        return {
            "policy": cfg.policy,
            "mode": cfg.mode,
            "table": self.table.label,
            "decode_tree": self.tree,
            "requests": len(lives),
            "output_tokens": tokens,
            "decode_steps": c.steps,
            "wall_s": wall,
            "throughput_tok_s": tokens / wall if wall > 0 else None,
            "gpus": gpus,
            "decode_gpus": decode_gpus,
            "throughput_per_gpu": tokens / wall / gpus if wall > 0 else None,
            "ttft_ms_p50": pct(ttft, 50),
            "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50),
            "tpot_ms_p99": pct(tpot, 99),
            "tpot_ms_mean": float(np.mean(tpot)) * 1e3 if tpot else None,
            "mean_batch_occupancy": c.occupancy / max(c.steps, 1),
            "decode_utilization": c.busy / (wall * decode_gpus) if wall > 0 else None,
        }


def simulate(
    config: ClusterConfig,
    table: StepTable,
    requests: Sequence[SimRequest],
    tasks: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict:
    """Run ``requests`` through the model; returns the summary (``serve.loop`` field names)."""
    tasks = list(tasks) if tasks is not None else sorted({r.model for r in requests})
    w = None if weights is None else [weights[m] for m in tasks]
    return Simulation(config, table, tasks, w).run(requests)
