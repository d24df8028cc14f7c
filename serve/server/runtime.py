"""The engine thread: the one thread that runs JAX, owning the ``Scheduler``.

HTTP handlers never touch the scheduler. They hand closures to the engine thread through a
thread-safe queue (``_call``) and await asyncio futures; the engine thread runs the closures
between decode steps, and every step's streamed text reaches the event loop in one batch with
``loop.call_soon_threadsafe``. A cancel is a closure too, so a disconnected client's slot is
free before the next decode step.

States: ``loading`` (models load and compile on the engine thread) -> ``ready`` ->
``draining`` (no new requests; in-flight ones finish, the rest are aborted) -> ``stopped``;
any exception in a step -> ``failed`` (every live request gets a 500, ``/health`` says 503).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

from serve.scheduler import QueueFull, Request, Result, Scheduler
from serve.server.errors import APIError
from serve.server.metrics import Metrics
from serve.server.models import Model, ModelSet

log = logging.getLogger("sunjax.serve")


@dataclasses.dataclass
class Chunk:
    """New output of one choice since its previous chunk."""

    index: int  # the choice
    text: str
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None = None  # set on a choice's last chunk

    def then(self, later: Chunk) -> Chunk:
        """This chunk followed by ``later`` (the same choice's next chunk), as one."""
        return Chunk(
            index=self.index,
            text=self.text + later.text,
            tokens=self.tokens + later.tokens,
            logprobs=self.logprobs + later.logprobs,
            top_logprobs=self.top_logprobs + later.top_logprobs,
            finish_reason=later.finish_reason,
        )


@dataclasses.dataclass
class Submission:
    """One HTTP request's choices (``n`` scheduler requests) and the queue their chunks and
    errors arrive on."""

    model: str
    ids: list[str]
    prompt_tokens: int
    events: asyncio.Queue  # Chunk | APIError
    results: list[Result] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Track:
    sub: Submission
    index: int
    sent: int = 0  # tokens already delivered in chunks


Setup = Callable[[], tuple[ModelSet, Scheduler]]


class Runtime:
    """The engine handle ``build_app`` serves."""

    def __init__(self, setup: Setup, *, metrics: Metrics | None = None, policy: str = "sun"):
        self._setup = setup
        self.metrics = metrics or Metrics()
        self.policy = policy
        self.state = "loading"
        self.error: BaseException | None = None
        self.models: dict[str, Model] = {}  # replaced, never mutated: handlers read it
        self.model_set: ModelSet | None = None
        self.sched: Scheduler | None = None
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._outbox: list[tuple[asyncio.Queue, Chunk | APIError]] = []
        self._live: dict[str, _Track] = {}
        self._inflight: collections.Counter[str] = collections.Counter()
        self._unloading: dict[str, list[asyncio.Future]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.max_step_interval = 0.0
        self._hurry = False

    # -- lifecycle (event loop side) -------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._run, name="sunjax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.state != "failed":
            self.state = "stopped"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def health(self) -> dict:
        """What the scheduler adds to ``/health`` (a cluster: its instances)."""
        extra = getattr(self.sched, "health", None)
        return extra() if extra is not None else {}

    @property
    def inflight(self) -> int:
        return sum(self._inflight.values())

    async def drain(self, timeout: float) -> int:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` s, then abort
        the rest (``finish_reason: "abort"``). Returns how many were aborted."""
        if self.state in ("ready", "loading"):
            self.state = "draining"
        deadline = time.monotonic() + timeout
        while (
            self.inflight
            and time.monotonic() < deadline
            and self.state == "draining"
            and not self._hurry
        ):
            await asyncio.sleep(0.02)
        if self.state != "draining" or not self._thread or not self._thread.is_alive():
            return 0
        return await self._call(self._abort_all)

    def hurry(self) -> None:
        """End a drain now (a second signal): abort what is still in flight."""
        self._hurry = True

    # -- requests (event loop side) ---------------------------------------------------------
    async def submit(self, requests: list[Request], prompt_tokens: int) -> Submission:
        """Queue one HTTP request's choices; raises APIError (404 / 503) or QueueFull."""
        sub = Submission(
            model=requests[0].model,
            ids=[r.id for r in requests],
            prompt_tokens=prompt_tokens,
            events=asyncio.Queue(),
        )
        try:
            return await self._call(lambda: self._submit(sub, requests))
        except asyncio.CancelledError:  # the client left before the engine took it
            self.cancel(sub)
            raise

    def cancel(self, sub: Submission) -> None:
        """Cancel whatever of ``sub`` is still live (any thread; returns at once)."""
        self._inbox.put(lambda: self._cancel(sub.ids, "cancelled"))

    async def load(self, model: Model) -> None:
        await self._call(lambda: self._add(model))

    @property
    def remote_models(self) -> bool:
        """Whether task modules live in other processes (the cluster frontend's scheduler
        loads them there: ``load_remote``)."""
        return hasattr(self.sched, "load_task")

    async def load_remote(self, name: str, root: str) -> None:
        """Have the scheduler load task ``name`` of export ``root`` where its prefill runs
        (a cluster's prefill instance); resolves when it is served."""
        fut = self.loop.create_future()

        def done(error: str | None) -> None:  # engine thread, when the instance answers
            if error is not None:
                exc = APIError(400, error, param="path", code="load_failed")
                self.loop.call_soon_threadsafe(_resolve, fut, None, exc)
                return
            self.models = {**self.models, name: Model(name, None, root)}
            self.metrics.add_model(name)
            self.loop.call_soon_threadsafe(_resolve, fut, None, None)

        def start() -> None:
            if self.state != "ready":
                raise self._unavailable()
            if name in self.models:
                raise APIError(
                    409, f"model {name!r} is already served", param="name", code="exists"
                )
            self.sched.load_task(name, root, done)

        await self._call(start)
        await fut

    async def unload(self, name: str) -> None:
        """Refuse new requests for ``name``, wait for its in-flight ones, then drop it."""
        fut = self.loop.create_future()

        def mark():
            if name not in self.models or name in self._unloading:
                known = sorted(m for m in self.models if m not in self._unloading)
                raise APIError(
                    404,
                    f"model {name!r} is not served; served: {known}",
                    param="name",
                    code="model_not_found",
                )
            self._unloading[name] = [fut]

        await self._call(mark)
        await fut

    # -- engine thread -------------------------------------------------------------------
    def _call(self, fn: Callable[[], object]) -> asyncio.Future:
        """Run ``fn`` on the engine thread; its value or exception resolves the future."""
        fut = self.loop.create_future()

        def run():
            try:
                value, exc = fn(), None
            except Exception as e:  # handed to the awaiting handler
                value, exc = None, e
            self.loop.call_soon_threadsafe(_resolve, fut, value, exc)

        if self._stop.is_set() or self.state in ("failed", "stopped"):
            fut.set_exception(self._unavailable())
        else:
            self._inbox.put(run)
        return fut

    def _unavailable(self) -> APIError:
        if self.state == "failed":
            return APIError(503, f"the engine failed: {self.error!r}", code="engine_failed")
        return APIError(503, f"the server is {self.state}", code=self.state)

    def _run(self) -> None:
        try:
            self.model_set, self.sched = self._setup()
            for name in self.model_set.models:
                self.metrics.add_model(name)
            self.models = dict(self.model_set.models)
        except ValueError as e:  # a refused export, a bad flag: the message says it all
            log.error("loading failed: %s", e)
            self.error, self.state = e, "failed"
            return
        except Exception as e:
            log.exception("loading failed")
            self.error, self.state = e, "failed"
            return
        if self.state == "loading":
            self.state = "ready"
        log.info("ready: %s", sorted(self.models))
        last_step: float | None = None
        while not self._stop.is_set():
            self._commands(block=not self.sched.busy)
            self._finish_unloads()
            if not self.sched.busy:
                last_step = None
                self._flush()
                continue
            steps = self.sched.decode_steps
            try:
                self.sched.step()
            except Exception as e:
                log.exception("engine step failed")
                self._fail(e)
                return
            now = time.perf_counter()
            if self.sched.decode_steps > steps:
                interval = None if last_step is None else now - last_step
                if interval is not None:
                    self.max_step_interval = max(self.max_step_interval, interval)
                self.metrics.step(self._slots_in_use(), self._per_worker(), interval)
                last_step = now
            else:
                last_step = None
            self._gauges()
            self._flush()

    def _commands(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._gauges()
        self._flush()

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.loop.call_soon_threadsafe(_deliver, batch)

    def _per_worker(self) -> int:
        return self.sched.pool.config.slots_per_worker

    def _slots_in_use(self) -> list[int]:
        B = self._per_worker()
        return [B - f for f in self.sched.free_slots()]

    def _gauges(self) -> None:
        running = collections.Counter(
            live.request.model for live in self.sched.slots if live is not None
        )
        waiting = collections.Counter(live.request.model for live in self.sched.queue)
        self.metrics.gauges(running, waiting, self._slots_in_use())

    def _submit(self, sub: Submission, requests: list[Request]) -> Submission:
        if self.state != "ready":
            raise self._unavailable()
        if sub.model not in self.models or sub.model in self._unloading:
            served = sorted(m for m in self.models if m not in self._unloading)
            raise APIError(
                404,
                f"model {sub.model!r} is not served; served: {served}",
                param="model",
                code="model_not_found",
            )
        sched = self.sched
        waiting = len(sched.queue)
        if waiting + len(requests) > sched.max_queue:
            raise QueueFull(
                f"{len(requests)} request(s) refused: {waiting} already wait "
                f"(--max-queue {sched.max_queue}); retry later"
            )
        for r in requests:
            sched.validate(r)
        for i, r in enumerate(requests):
            self._live[r.id] = _Track(sub, i)
            sub.results.append(sched.submit(r, on_text=self._on_text))
        self._inflight[sub.model] += len(requests)
        return sub

    def _on_text(self, rid: str, delta: str, finished: bool) -> None:
        track = self._live.get(rid)
        if track is None:
            return
        res = track.sub.results[track.index]
        new = slice(track.sent, len(res.tokens))
        track.sent = len(res.tokens)
        if finished and res.finish_reason == "error":  # a cluster instance was lost under it
            err = APIError(503, res.error or "the request failed", code="instance_lost")
            self._outbox.append((track.sub.events, err))
        else:
            chunk = Chunk(
                index=track.index,
                text=delta,
                tokens=res.tokens[new],
                logprobs=res.logprobs[new],
                top_logprobs=res.top_logprobs[new],
                finish_reason=res.finish_reason if finished else None,
            )
            self._outbox.append((track.sub.events, chunk))
        if finished:
            del self._live[rid]
            self.sched.results.pop(rid, None)
            self._inflight[res.model] -= 1
            if not self._inflight[res.model]:
                del self._inflight[res.model]
            self.metrics.finished(res.model, track.sub.prompt_tokens, res)

    def _cancel(self, ids: list[str], reason: str) -> None:
        for rid in ids:
            self.sched.cancel(rid, reason)

    def _abort_all(self) -> int:
        ids = list(self._live)
        self._cancel(ids, "abort")
        return len(ids)

    def _add(self, model: Model) -> None:
        if self.state != "ready":
            raise self._unavailable()
        if model.name in self.models:
            raise APIError(
                409, f"model {model.name!r} is already served", param="name", code="exists"
            )
        self.sched.prefill_params[model.name] = model.prefill
        self.models = {**self.models, model.name: model}
        self.metrics.add_model(model.name)

    def _finish_unloads(self) -> None:
        for name in [n for n in self._unloading if not self._inflight.get(n)]:
            futs = self._unloading.pop(name)
            if self.remote_models:
                self.sched.unload_task(name)
            self.sched.prefill_params.pop(name, None)
            self.models = {k: v for k, v in self.models.items() if k != name}
            for fut in futs:
                self.loop.call_soon_threadsafe(_resolve, fut, None, None)

    def _fail(self, exc: BaseException) -> None:
        self.error, self.state = exc, "failed"
        err = APIError(500, f"the engine failed: {exc!r}", code="engine_failed")
        for track in self._live.values():
            self._outbox.append((track.sub.events, err))
        self._live.clear()
        self._inflight.clear()
        self._flush()
        while True:  # answer what is still queued for the engine thread (with 503s)
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                break
            try:
                fn()
            except Exception:  # a cancel on the broken scheduler: nothing left to cancel
                log.debug("ignored after the engine failed", exc_info=True)


def _resolve(fut: asyncio.Future, value, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(exc)


def _deliver(batch: list[tuple[asyncio.Queue, Chunk | APIError]]) -> None:
    for q, event in batch:
        q.put_nowait(event)
