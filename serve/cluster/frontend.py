"""The cluster frontend: ``ClusterScheduler`` routes requests over prefill and decode
instances in other processes, behind the same interface as the in-process ``Scheduler``, so
the OpenAI server (``serve.server``) runs over it unchanged.

Per request: queued -> ``prefill`` sent to the least-busy live prefill instance of its task,
with a decode slot reserved on the instance the router picks (least-loaded over the shared
pool for SUN, the model's own instances for conventional) -> ``prefilled`` (first token) ->
``decode`` sent to the reserved instance, which pulls the KV -> ``started``: the frontend
tells the prefill instance to ``release`` the offer -> ``tokens`` until EOS, the token budget
or a stop string (then ``cancel``).

Failure: an instance silent for ``lost_after_s`` (or back with a new epoch) is lost (silence
counts only while the frontend's own loop runs: a frontend paused or starved along with
its instances, e.g. the whole host stopped for a while, does not then declare them all
lost before their first heartbeat arrives); its
requests end with ``finish_reason="error"`` and ``Result.error`` saying which instance was
lost (the server answers 503). With ``reprefill_lost`` they go back to the head of the queue
instead and run again from the prompt on the survivors: sampling is seeded per position, so
the re-run regenerates the tokens already streamed; the frontend checks them against what it
sent and suppresses them (a mismatch ends the request with an error, never a wrong
continuation), then streams the rest. Each attempt has its own wire id (``id``, ``id~1``,
...), so a late message of an abandoned attempt cannot land in the new one. A decode
instance's ``failed`` with ``retry`` (its KV pull failed: the prefill died under it) re-runs
the request the same way.

New requests whose task has no live prefill instance, or whose model has no live decode
instance, are refused with a 503 naming the instances. A lost instance that heartbeats again
rejoins.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from serve.cluster import wire
from serve.cluster.config import ClusterConfig
from serve.engine import Engine, EngineConfig, Logprobs
from serve.router import LeastLoaded, ModelAffine
from serve.scheduler import (
    Request,
    Result,
    StreamCallback,
    Tokenizer,
    _Live,
    check_request,
    enqueue,
    finish_live,
    record_token,
)
from serve.server.errors import APIError
from sunjax.config import ModelConfig

log = logging.getLogger("sunjax.cluster")


@dataclasses.dataclass
class Instance:
    name: str
    role: str  # "prefill" | "decode"
    tasks: tuple[str, ...] = ()  # prefill: the task modules it holds
    model: str | None = None  # decode, conventional: the model it decodes
    slots: int = 0  # decode: from the config until the instance says
    up: bool = False
    epoch: str = ""
    transfer: str = ""
    last_seen: float = 0.0
    assigned: int = 0  # requests reserved on it (prefill: waiting for their prefill)
    handled: int = 0  # requests it took since the frontend started
    lost: int = 0  # times it was lost
    most_models: int = 0  # decode: most distinct models one of its decode steps advanced
    processes: int = 1  # decode: the processes (one JAX mesh) the instance spans
    landed: tuple[int, ...] = ()  # decode over processes: requests each process pulled

    def view(self) -> dict:
        out = {"role": self.role, "up": self.up, "handled": self.handled, "lost": self.lost}
        if self.role == "decode":
            out["most_models_in_a_step"] = self.most_models
            if self.processes > 1:
                out |= {"processes": self.processes, "landed_by_process": list(self.landed)}
        return out | ({"assigned": self.assigned} if self.up else {})


MAX_ATTEMPTS = 4  # reprefill_lost: a request lost this many times ends with an error


@dataclasses.dataclass
class Flight:
    live: _Live
    phase: str  # "prefill" | "handoff" | "decode"
    prefill: str
    decode: str
    wire: str  # the id its messages carry: the request id, then id~1, id~2 for re-runs
    uuid: int | None = None  # the prefill instance's offer, until released
    handoff_at: float = 0.0
    kv_bytes: int = 0
    replay: tuple[int, ...] = ()  # tokens already streamed, that this re-run must regenerate
    matched: int = 0  # how many of them it has regenerated so far


@dataclasses.dataclass(frozen=True)
class Handoff:
    """One request's KV hand-off: frontend-observed (prefilled -> started) and pull time."""

    id: str
    model: str
    decode: str
    kv_bytes: int
    seconds: float  # prefilled message in -> started message in (routing, pull, insert)
    pull_seconds: float  # inside the decode instance: pull + insert


class _PoolView:
    """What the server reads of a pool: its config (one worker per decode instance)."""

    def __init__(self, config: EngineConfig):
        self.config = config


class ClusterScheduler:
    """The ``Scheduler`` interface over remote instances; owns the frontend's ROUTER socket.

    ``busy`` is always true: the step also reads heartbeats. ``step`` waits at most
    ``poll_s`` for messages."""

    def __init__(
        self,
        config: ClusterConfig,
        cfg: ModelConfig,
        *,
        tokenizer: Tokenizer | None = None,
        eos_ids: Sequence[int] = (),
        metrics=None,
        poll_s: float = 0.005,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.config, self.tokenizer, self.metrics = config, tokenizer, metrics
        self.eos = frozenset(int(e) for e in eos_ids)
        self.max_queue, self.poll_s, self.clock = config.max_queue, poll_s, clock
        engine_config = EngineConfig(
            workers=len(config.decode),
            slots_per_worker=config.slots,
            max_len=config.max_len,
            min_bucket=min(config.min_bucket, config.max_len),
        )
        self.engine = Engine(cfg, engine_config)  # validation only: it runs nothing here
        self.pool = _PoolView(engine_config)
        self.prefill_params = {t: None for t in config.tasks}  # what the server may serve
        self.prefills = {s.name: Instance(s.name, "prefill", tasks=s.tasks) for s in config.prefill}
        self.decodes = [
            Instance(s.name, "decode", model=s.model, slots=config.slots) for s in config.decode
        ]
        if config.policy == "sun":
            self.router = LeastLoaded(len(self.decodes))
        else:
            owners = collections.defaultdict(list)
            for i, s in enumerate(config.decode):
                owners[s.model].append(i)
            self.router = ModelAffine(owners)
        self.queue: collections.deque[_Live] = collections.deque()
        self.flights: dict[str, Flight] = {}  # by wire id
        self.attempts: dict[str, int] = {}  # request id -> re-runs so far (reprefill_lost)
        self.reprefills = 0  # requests sent back to the queue after an instance was lost
        # /v1/models/load: (prefill instance, task) -> the callback awaiting its answer
        self.loading: dict[tuple[str, str], Callable[[str | None], None]] = {}
        self.results: dict[str, Result] = {}
        self.handoffs: list[Handoff] = []
        self.decode_steps = 0  # decode steps of all decode instances
        self.decode_rows = 0  # requests those steps advanced (occupancy = rows / steps / slots)
        self.hub = wire.Hub(f"tcp://{config.host}:{config.control_port}")
        self._checked: float | None = None  # when step last looked for lost instances
        self._fingerprint: str | None = None
        self.snapshot: dict = self._health()
        if metrics is not None:
            for inst in self.instances():
                metrics.instance(inst.name, inst.role, inst.up)

    # -- what the server reads -------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return True

    @property
    def slots(self) -> list[_Live]:
        return [f.live for f in self.flights.values()]

    def free_slots(self) -> list[int]:
        return [max(d.slots - d.assigned, 0) if d.up else 0 for d in self.decodes]

    def instances(self) -> list[Instance]:
        return [*self.prefills.values(), *self.decodes]

    def health(self) -> dict:
        """Per-instance state (a snapshot the step replaces: safe from any thread)."""
        return self.snapshot

    def _health(self) -> dict:
        lost = [i.name for i in self.instances() if not i.up]
        out = {"instances": {i.name: i.view() for i in self.instances()}, "down": lost}
        return out | ({"reprefilled": self.reprefills} if self.config.reprefill_lost else {})

    # -- requests in -------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """ValueError naming a bad value; APIError 503 when no live instance can serve it."""
        check_request(self, request)
        why = self._unservable(request.model)
        if why:
            raise APIError(503, why, code="instance_unavailable", headers={"Retry-After": "1"})

    def _unservable(self, model: str) -> str:
        holders = [p for p in self.prefills.values() if model in p.tasks]
        if not any(p.up for p in holders):
            return f"no prefill instance of task {model!r} is up ({[p.name for p in holders]} down)"
        owners = [self.decodes[i] for i in self.router.workers_for(model)]
        if not any(d.up for d in owners):
            return f"no decode instance for {model!r} is up ({[d.name for d in owners]} down)"
        return ""

    def submit(
        self,
        request: Request,
        on_text: StreamCallback | None = None,
        *,
        arrival: float | None = None,
    ) -> Result:
        return enqueue(self, request, on_text, arrival)

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        for live in self.queue:
            if live.request.id == request_id:
                self.queue.remove(live)
                self.attempts.pop(request_id, None)
                finish_live(live, reason, now=self.clock(), results=self.results)
                return True
        flight = next((f for f in self.flights.values() if f.live.request.id == request_id), None)
        if flight is None:
            return False
        self._end(flight, reason)
        return True

    def _all(self):
        yield from self.queue
        yield from (f.live for f in self.flights.values())

    # -- model management (the server's /v1/models/load|unload) -----------------------------
    def load_task(self, name: str, root: str, done: Callable[[str | None], None]) -> None:
        """Have the live prefill instance with the fewest tasks load task ``name`` of the
        export at ``root`` (a path it can read); ``done(None)`` once it serves it, else
        ``done(why)``."""
        up = [p for p in self.prefills.values() if p.up]
        if not up:
            raise APIError(503, "no prefill instance is up to load a model", code="unavailable")
        inst = min(up, key=lambda p: len(p.tasks))
        self.loading[(inst.name, name)] = done
        self.hub.send(inst.name, {"op": "load", "task": name, "root": root})

    def unload_task(self, name: str) -> None:
        """Drop task ``name`` from every prefill instance (no request of it is in flight)."""
        self.prefill_params.pop(name, None)
        for inst in self.prefills.values():
            if name in inst.tasks:
                inst.tasks = tuple(t for t in inst.tasks if t != name)
                if inst.up:
                    self.hub.send(inst.name, {"op": "unload", "task": name})

    def _loaded(self, inst: Instance, msg: dict) -> None:
        done = self.loading.pop((inst.name, msg["task"]), None)
        if msg["op"] == "loaded":
            if msg["task"] not in inst.tasks:
                inst.tasks = (*inst.tasks, msg["task"])
            self.prefill_params[msg["task"]] = None
        if done is not None:
            done(None if msg["op"] == "loaded" else f"prefill {inst.name!r}: {msg['error']}")

    # -- the loop --------------------------------------------------------------------------
    def step(self) -> None:
        """Read messages (up to ``poll_s``), find lost instances, dispatch what fits."""
        for name, msg in self.hub.recv(self.poll_s):
            try:
                self._handle(name, msg)
            except (KeyError, TypeError, ValueError) as e:  # a malformed message: log it
                log.warning("bad message from %s: %s (%r)", name, msg.get("op"), e)
        now = time.monotonic()
        if self._checked is not None:
            stall = now - self._checked - self.poll_s - self.config.heartbeat_s
            if stall > 0:  # this loop did not run (paused, starved): not the instances' silence
                for inst in self.instances():
                    inst.last_seen += stall
        self._checked = now
        for inst in self.instances():
            if inst.up and now - inst.last_seen > self.config.lost_after_s:
                self._lose(inst, f"no heartbeat for {now - inst.last_seen:.1f} s")
        self._dispatch()
        self.snapshot = self._health()

    def run_until_idle(self, timeout_s: float = 600.0) -> None:
        """Step until nothing waits or runs (in-process use: tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while self.queue or self.flights:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.queue) + len(self.flights)} requests still live")
            self.step()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Step until every configured instance is up."""
        deadline = time.monotonic() + timeout_s
        while not all(i.up for i in self.instances()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"instances not up: {self.snapshot['down']}")
            self.step()

    def _dispatch(self) -> None:
        free = self.free_slots()
        for live in list(self.queue):
            model = live.request.model
            why = self._unservable(model)
            if why:
                self.queue.remove(live)
                self._fail(live, why)
                continue
            w = self.router.pick(model, free)
            if w is None:
                continue
            holders = [p for p in self.prefills.values() if p.up and model in p.tasks]
            pre = min(holders, key=lambda p: p.assigned)
            dec = self.decodes[w]
            req = live.request
            self.queue.remove(live)
            if live.result.admitted_at is None:
                live.result.admitted_at = self.clock()
            live.result.worker = w
            free[w] -= 1
            pre.assigned += 1
            dec.assigned += 1
            pre.handled += 1
            attempt = self.attempts.get(req.id, 0)
            wire_id = f"{req.id}~{attempt}" if attempt else req.id
            self.flights[wire_id] = Flight(
                live, "prefill", pre.name, dec.name, wire_id, replay=tuple(live.result.tokens)
            )
            self.hub.send(
                pre.name,
                {
                    "op": "prefill",
                    "id": wire_id,
                    "model": model,
                    "prompt": list(req.prompt),
                    "max_tokens": req.max_tokens,
                    "sampling": {
                        "temperature": req.temperature,
                        "top_k": req.top_k,
                        "top_p": req.top_p,
                        "seed": req.seed,
                    },
                    "logprobs": req.logprobs is not None,
                },
            )

    # -- messages --------------------------------------------------------------------------
    def _handle(self, name: str, msg: dict) -> None:
        op = msg["op"]
        if op == "heartbeat":
            return self._heartbeat(name, msg)
        inst = self._instance(name)
        if inst is None or not inst.up:
            log.warning("ignored %s from %s (not a live instance)", op, name)
            return
        flight = self.flights.get(msg.get("id", ""))
        if op == "prefilled":
            self._prefilled(inst, flight, msg)
        elif op == "started":
            self._started(inst, flight, msg)
        elif op == "tokens":
            self._tokens(inst, msg)
        elif op in ("loaded", "load_failed"):
            self._loaded(inst, msg)
        elif op == "failed":
            if flight is not None and name in (flight.prefill, flight.decode):
                error = f"{inst.role} instance {name!r}: {msg['error']}"
                if not (msg.get("retry") and self._rerun(flight)):
                    self._end(flight, "error", error)
        else:
            log.warning("unknown op %r from %s", op, name)

    def _instance(self, name: str) -> Instance | None:
        if name in self.prefills:
            return self.prefills[name]
        return next((d for d in self.decodes if d.name == name), None)

    def _heartbeat(self, name: str, msg: dict) -> None:
        inst = self._instance(name)
        if inst is None or msg.get("role") != inst.role:
            log.warning(
                "heartbeat from %r (role %r) not in the cluster config", name, msg.get("role")
            )
            return
        if self._fingerprint is None:
            self._fingerprint = msg["fingerprint"]
        if msg["fingerprint"] != self._fingerprint:
            log.error(
                "%s holds decode tree %s, the cluster %s: ignored",
                name,
                msg["fingerprint"],
                self._fingerprint,
            )
            return
        if inst.up and inst.epoch != msg["epoch"]:
            self._lose(inst, "it restarted")
        if not inst.up:
            log.warning("%s instance %s is up (epoch %s)", inst.role, name, msg["epoch"])
            inst.up, inst.epoch, inst.assigned = True, msg["epoch"], 0
            if self.metrics is not None:
                self.metrics.instance(name, inst.role, True)
        inst.transfer = msg["transfer"]
        inst.slots = int(msg.get("slots", inst.slots))
        inst.processes = int(msg.get("processes", 1))
        inst.landed = tuple(int(n) for n in msg.get("landed", ()))
        if inst.role == "prefill" and "tasks" in msg:  # what it holds now (loads, restarts)
            inst.tasks = tuple(msg["tasks"])
        inst.last_seen = time.monotonic()

    def _prefilled(self, inst: Instance, flight: Flight | None, msg: dict) -> None:
        if flight is None or flight.prefill != inst.name or flight.phase != "prefill":
            self.hub.send(inst.name, {"op": "release", "uuid": msg["uuid"]})  # cancelled meanwhile
            return
        inst.assigned -= 1
        flight.uuid = int(msg["uuid"])
        lp = None
        if "logprob" in msg:
            top_ids, top_lps = msg["top"]
            lp = Logprobs(
                logprob=np.array([msg["logprob"]]),
                top_ids=np.array([top_ids]),
                top_logprobs=np.array([top_lps]),
            )
        reason, error = self._record(flight, int(msg["token"]), lp)
        if reason:
            return self._end(flight, reason, error)
        req = flight.live.request
        dec = self._instance(flight.decode)
        flight.phase, flight.handoff_at = "handoff", time.monotonic()
        flight.kv_bytes = int(msg["kv_bytes"])
        dec.handled += 1
        self.hub.send(
            dec.name,
            {
                "op": "decode",
                "id": flight.wire,
                "transfer": inst.transfer,
                "uuid": flight.uuid,
                "bucket": int(msg["bucket"]),
                "leaves": msg["leaves"],
                "max_tokens": req.max_tokens - 1,
                "eos": sorted(self.eos),
                "ignore_eos": req.ignore_eos,
                "logprobs": req.logprobs is not None,
            },
        )

    def _started(self, inst: Instance, flight: Flight | None, msg: dict) -> None:
        if flight is None or flight.decode != inst.name or flight.phase != "handoff":
            self.hub.send(inst.name, {"op": "cancel", "id": msg["id"]})
            return
        flight.phase = "decode"
        self._release(flight)
        h = Handoff(
            id=flight.live.request.id,
            model=flight.live.request.model,
            decode=inst.name,
            kv_bytes=flight.kv_bytes,
            seconds=time.monotonic() - flight.handoff_at,
            pull_seconds=float(msg["pull_s"]),
        )
        self.handoffs.append(h)
        if self.metrics is not None:
            self.metrics.handoff(h.seconds, h.kv_bytes)

    def _tokens(self, inst: Instance, msg: dict) -> None:
        self.decode_steps += 1
        self.decode_rows += len(msg["items"])
        done = set(msg["done"])
        models = {
            self.flights[i[0]].live.request.model for i in msg["items"] if i[0] in self.flights
        }
        inst.most_models = max(inst.most_models, len(models))
        for item in msg["items"]:
            rid, token = item[0], int(item[1])
            flight = self.flights.get(rid)
            if flight is None or flight.decode != inst.name or flight.phase != "decode":
                if rid not in done:  # a request the frontend gave up: free its slot
                    self.hub.send(inst.name, {"op": "cancel", "id": rid})
                continue
            lp = None
            if len(item) > 2:
                top_ids, top_lps = item[3]
                lp = Logprobs(
                    logprob=np.array([item[2]]),
                    top_ids=np.array([top_ids]),
                    top_logprobs=np.array([top_lps]),
                )
            reason, error = self._record(flight, token, lp)
            if not reason and rid in done:  # the instance stopped it (EOS / budget)
                reason = "length"
            if reason:
                self._end(flight, reason, error, cancel=rid not in done)

    def _record(self, flight: Flight, token: int, lp: Logprobs | None) -> tuple[str, str | None]:
        """Record ``token``, or check it against the replay; (finish reason or "", error)."""
        if flight.matched < len(flight.replay):
            want = flight.replay[flight.matched]
            if token != want:
                return "error", (
                    f"re-run of request {flight.live.request.id!r} after a lost instance "
                    f"diverged at token {flight.matched}: {token} != {want} already sent"
                )
            flight.matched += 1
            return "", None
        return record_token(flight.live, token, lp, 0, eos=self.eos, now=self.clock()), None

    # -- endings ---------------------------------------------------------------------------
    def _release(self, flight: Flight) -> None:
        pre = self.prefills[flight.prefill]
        if flight.uuid is not None and pre.up:
            self.hub.send(pre.name, {"op": "release", "uuid": flight.uuid})
        flight.uuid = None

    def _drop(self, flight: Flight, cancel: bool = True) -> None:
        """Take ``flight`` off the instances: free its reservations, release its offer,
        cancel its decode slot."""
        del self.flights[flight.wire]
        pre, dec = self.prefills[flight.prefill], self._instance(flight.decode)
        if flight.phase == "prefill":
            pre.assigned -= 1
        self._release(flight)
        if cancel and flight.phase in ("handoff", "decode") and dec.up:
            self.hub.send(dec.name, {"op": "cancel", "id": flight.wire})
        dec.assigned -= 1

    def _end(self, flight: Flight, reason: str, error: str | None = None, cancel: bool = True):
        """Finish a request in flight: free its reservation, tell its instances."""
        self._drop(flight, cancel)
        self.attempts.pop(flight.live.request.id, None)
        if error is not None:
            self._fail(flight.live, error)
        else:
            finish_live(flight.live, reason, now=self.clock(), results=self.results)

    def _fail(self, live: _Live, error: str) -> None:
        live.result.error = error
        finish_live(live, "error", now=self.clock(), results=self.results)

    def _lose(self, inst: Instance, why: str) -> None:
        log.error("%s instance %s lost: %s", inst.role, inst.name, why)
        inst.up, inst.lost = False, inst.lost + 1
        for key in [k for k in self.loading if k[0] == inst.name]:
            self.loading.pop(key)(f"prefill instance {inst.name!r} was lost ({why})")
        if self.metrics is not None:
            self.metrics.instance(inst.name, inst.role, False)
        # oldest first: each re-run goes to the head of the queue, so walk the newest first
        for flight in reversed(list(self.flights.values())):
            on_prefill = flight.prefill == inst.name and flight.phase in ("prefill", "handoff")
            if (on_prefill or flight.decode == inst.name) and not self._rerun(flight):
                self._end(flight, "error", f"{inst.role} instance {inst.name!r} was lost ({why})")
        inst.assigned = 0

    def _rerun(self, flight: Flight) -> bool:
        """With ``reprefill_lost``: take ``flight`` off its instances and queue its request
        again, at the head (a client waits mid-stream). False when off, or when the request
        has used up its ``MAX_ATTEMPTS``."""
        rid = flight.live.request.id
        if not self.config.reprefill_lost or self.attempts.get(rid, 0) + 1 >= MAX_ATTEMPTS:
            return False
        self._drop(flight)
        self.attempts[rid] = self.attempts.get(rid, 0) + 1
        self.queue.appendleft(flight.live)
        self.reprefills += 1
        return True

    def close(self) -> None:
        self.hub.close()
