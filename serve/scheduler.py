"""Continuous batching over a decode pool: admit, prefill, hand off, decode, stream, free.

The scheduler is host code around three jitted calls (prefill, insert, the pool step). Every
``step()`` admits what fits (prefill with the request's task tree, route, insert), runs one
decode step of all workers, then finishes slots on an EOS id, a stop string or ``max_tokens``.
A finished or cancelled request frees its slot at once. Tokenizing, detokenizing and
bookkeeping never enter the jitted step.

Paged pools (``EngineConfig.page_size``): one host ``PageAllocator`` per worker.  A request
is admitted where a slot is free and the worker's free pages hold its prompt + 1 token on
top of what the worker's live sequences need for the coming step.  Before every step each
live sequence is ``extend``ed to its length after the step (changed page-table rows are
pushed to the device); where a worker runs out, its most recently admitted sequence is
preempted: its K/V is copied to host memory (``DecodePool.read_prefix``), its pages are
freed and it waits at the front of the queue; on resume it gets new pages and its K/V back
through the same ``insert`` as a prefix, with its last token and its sampling settings, so
the output is exactly the uninterrupted one (sampling keys depend only on the position).
Finishing or cancelling frees a sequence's pages.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from serve.engine import TOP_LOGPROBS, Logprobs, Params, Prefix, sampling_params
from serve.pool import DecodePool
from serve.router import Router
from sunjax.cache import KVCache
from sunjax.paged import NULL_PAGE, OutOfPages, PageAllocator


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the request was refused, retry later."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    id: str
    model: str
    prompt: tuple[int, ...]  # token ids
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks on identical work)
    logprobs: int | None = None  # record each token's logprob and this many alternatives


@dataclasses.dataclass
class Result:
    id: str
    model: str
    tokens: list[int]
    text: str = ""
    finish_reason: str = ""  # "stop" | "length" | "cancelled" | "refused" (never admitted)
    # (or the reason given to cancel)
    arrival: float = 0.0
    admitted_at: float | None = None  # prefill started
    first_token_at: float | None = None
    finished_at: float | None = None
    worker: int | None = None
    error: str | None = None  # why a refused request was refused
    logprobs: list[float] = dataclasses.field(default_factory=list)  # per token, if asked
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None or len(self.tokens) < 2:
            return None
        return (self.finished_at - self.first_token_at) / (len(self.tokens) - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.arrival


StreamCallback = Callable[[str, str, bool], None]  # (request id, text delta, finished)


class Detokenizer:
    """Incremental detokenization that never emits half a UTF-8 character or part of a stop
    string: ``push`` ids, ``take`` the text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # complete characters decoded so far (cut at a stop string)
        self.emitted = 0
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        if self.tok is None or self.stopped:
            return
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._append(full[len(prefix) :])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def flush(self) -> None:
        """At the end: whatever is left (an incomplete character decodes to U+FFFD)."""
        if self.tok is None or self.stopped:
            return
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self._append(full[len(prefix) :])
        self.prefix_offset = self.read_offset = len(self.ids)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def take(self, final: bool = False) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            end -= max(
                (n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])),
                default=0,
            )
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta


@dataclasses.dataclass
class _Live:
    request: Request
    result: Result
    detok: Detokenizer
    on_text: StreamCallback | None
    order: int = -1  # admission order (first admission; kept across preemption)
    swapped: KVCache | None = None  # host copy of the K/V of a preempted request

    def cached_after_step(self) -> int:
        """Tokens in its cache once the next decode step has written its last token."""
        return len(self.request.prompt) + max(len(self.result.tokens), 1)


def check_request(sched, request: Request) -> None:
    """What every scheduler (in-process or cluster frontend) checks before queueing
    ``request``: ValueError naming the offending value."""
    if request.model not in sched.prefill_params:
        raise ValueError(f"unknown model {request.model!r}; known: {sorted(sched.prefill_params)}")
    if request.id in sched.results or any(live.request.id == request.id for live in sched._all()):
        raise ValueError(f"duplicate request id {request.id!r}")
    sched.engine.check_prompt(request.prompt, request.max_tokens)
    sampling_params(
        temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=request.seed
    )
    if request.stop and sched.tokenizer is None:
        raise ValueError(f"stop={request.stop} needs a tokenizer")
    if request.logprobs is not None and not 0 <= request.logprobs <= TOP_LOGPROBS:
        raise ValueError(f"logprobs={request.logprobs} must lie in [0, {TOP_LOGPROBS}]")


class Scheduler:
    """Requests in, results (and streamed text) out, over one ``DecodePool``.

    ``prefill_params`` maps each task model to its prefill tree (SUN: fine-tuned prefill
    module; conventional: the model's full fine-tuned tree).
    """

    def __init__(
        self,
        pool: DecodePool,
        prefill_params: Mapping[str, Params],
        router: Router,
        *,
        tokenizer: Tokenizer | None = None,
        eos_ids: Sequence[int] = (),
        max_queue: int = 256,
        prefills_per_step: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """``prefills_per_step`` > 0 caps the prompts prefilled between two decode steps
        while slots are decoding, so arriving prompts stall running streams by at most that
        many prefills (0: admit whatever fits)."""
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        if prefills_per_step < 0:
            raise ValueError(f"prefills_per_step={prefills_per_step} must be >= 0")
        self.prefills_per_step = prefills_per_step
        self.pool, self.router, self.tokenizer = pool, router, tokenizer
        self.prefill_params = dict(prefill_params)
        self.engine = pool.engine
        self.eos = frozenset(int(e) for e in eos_ids)
        self.max_queue, self.clock = max_queue, clock
        self.queue: collections.deque[_Live] = collections.deque()
        self.slots: list[_Live | None] = [None] * pool.slots
        self.active = np.zeros(pool.slots, bool)
        self.results: dict[str, Result] = {}
        self.decode_steps = 0
        self.occupancy_sum = 0.0  # sum over decode steps of the fraction of slots in use
        self.preemptions = 0
        self._admitted = 0
        config = pool.config
        self.allocators: list[PageAllocator] = (
            [self.engine.allocator() for _ in range(config.workers)] if config.paged else []
        )
        self.page_table = (
            np.full((pool.slots, config.pages_per_seq), NULL_PAGE, np.int32)
            if config.paged
            else None
        )  # [W * B, M], host truth; pushed to the device before a step when changed
        self._table_dirty = config.paged  # the pool may hold an earlier scheduler's rows

    # -- requests in ---------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """ValueError naming the offending value; the scheduler is unchanged."""
        check_request(self, request)
        self.router.workers_for(request.model)

    def submit(
        self,
        request: Request,
        on_text: StreamCallback | None = None,
        *,
        arrival: float | None = None,
    ) -> Result:
        """Queue ``request``; returns its ``Result``, filled in as it runs. Raises ValueError
        (bad request) or QueueFull (over the bound)."""
        self.validate(request)
        if len(self.queue) >= self.max_queue:
            raise QueueFull(
                f"request {request.id!r} refused: {len(self.queue)} requests already wait "
                f"(max_queue={self.max_queue})"
            )
        result = Result(
            id=request.id,
            model=request.model,
            tokens=[],
            arrival=self.clock() if arrival is None else arrival,
        )
        self.queue.append(
            _Live(request, result, Detokenizer(self.tokenizer, request.stop), on_text)
        )
        return result

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stop a queued or running request now (its slot is freed) with finish reason
        ``reason``; False if not live."""
        for live in self.queue:
            if live.request.id == request_id:
                self.queue.remove(live)
                self._finish(live, reason)
                return True
        for slot, live in enumerate(self.slots):
            if live is not None and live.request.id == request_id:
                self._free(slot, reason)
                self.pool.set_active(self.active)
                return True
        return False

    # -- the loop ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.queue) or bool(self.active.any())

    def step(self) -> None:
        """Admit what fits, then one decode step of every worker, then finish slots."""
        self._admit()
        if self.allocators:
            self._grow()
        if not self.active.any():
            return
        live = [int(s) for s in np.flatnonzero(self.active)]
        if any(self.slots[s].request.logprobs is not None for s in live):
            tokens, lp = self.pool.step_logprobs()
        else:
            tokens, lp = self.pool.step(), None
        self.decode_steps += 1
        self.occupancy_sum += self.active.mean()
        freed = False
        for slot in live:
            reason = self._append(self.slots[slot], int(tokens[slot]), lp, slot)
            if reason:
                self._free(slot, reason)
                freed = True
        if freed:
            self.pool.set_active(self.active)

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()

    def free_slots(self) -> list[int]:
        B = self.pool.config.slots_per_worker
        return [
            int(B - self.active[w * B : (w + 1) * B].sum()) for w in range(self.pool.config.workers)
        ]

    # -- internals -----------------------------------------------------------------------
    def _all(self):
        yield from self.queue
        yield from (live for live in self.slots if live is not None)

    def _admit(self) -> None:
        free = self.free_slots()
        spare = self._spare_pages()
        waiting = list(self.queue)
        budget = self.prefills_per_step if self.active.any() else 0
        for live in waiting:
            if not any(free):
                break
            if budget and len(waiting) - len(self.queue) >= budget:
                break
            fits = free
            if self.allocators:  # a free slot on a worker with pages for it
                need = self.allocators[0].pages_needed(None, live.cached_after_step())
                fits = [f if need <= p else 0 for f, p in zip(free, spare, strict=True)]
            worker = self.router.pick(live.request.model, fits)
            if worker is None:
                if live.swapped is not None:
                    break  # a preempted request resumes before anything newer starts
                continue  # this model's workers are full; later requests may fit elsewhere
            self.queue.remove(live)
            req = live.request
            sp = sampling_params(
                temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed
            )
            live.result.worker = worker
            if live.swapped is None:
                live.result.admitted_at = self.clock()
                live.order, self._admitted = self._admitted, self._admitted + 1
                prefix = self.engine.prefill(
                    self.prefill_params[req.model], req.prompt, sp, model=req.model
                )
                lp = None if req.logprobs is None else jax.device_get(prefix.logprobs)
                reason = self._append(live, int(prefix.token), lp, 0)
                if reason:
                    self._finish(live, reason)
                    continue
            else:  # resume: the host K/V goes back in as a prefix, with its last token
                prefix = Prefix(
                    cache=live.swapped,
                    token=jnp.int32(live.result.tokens[-1]),
                    length=jnp.int32(live.cached_after_step() - 1),
                    sampling=sp,
                    model=req.model,
                )
                live.swapped = None
            B = self.pool.config.slots_per_worker
            local = next(s for s in range(B) if not self.active[worker * B + s])
            slot = worker * B + local
            row = None
            if self.allocators:
                alloc = self.allocators[worker]
                alloc.allocate(req.id, live.cached_after_step())
                row = self.page_table[slot] = alloc.page_row(req.id)
                spare[worker] -= len(alloc.pages(req.id))
            self.pool.insert(prefix, worker, local, row)
            self.slots[slot], self.active[slot] = live, True
            free[worker] -= 1

    def _spare_pages(self) -> list[int]:
        """Per worker: free pages left once its live sequences have grown for the next step."""
        spare = [a.num_free for a in self.allocators]
        for slot in np.flatnonzero(self.active) if self.allocators else ():
            live, w = self.slots[slot], slot // self.pool.config.slots_per_worker
            need = live.cached_after_step()
            spare[w] -= self.allocators[w].pages_needed(live.request.id, need)
        return spare

    def _grow(self) -> None:
        """Extend every live sequence to its length after the coming step, oldest first;
        preempt a worker's most recently admitted sequence while it is out of pages. Pushes
        the page table and the active mask when they changed."""
        preempted = False
        for w, alloc in enumerate(self.allocators):
            for slot in self._live_on(w):
                while self.active[slot]:  # until extended, or preempted itself
                    live = self.slots[slot]
                    try:
                        if alloc.extend(live.request.id, live.cached_after_step()):
                            self.page_table[slot] = alloc.page_row(live.request.id)
                            self._table_dirty = True
                        break
                    except OutOfPages:
                        self._preempt(self._live_on(w)[-1])
                        preempted = True
        if preempted:
            self.pool.set_active(self.active)
        if self._table_dirty:
            self.pool.set_page_table(self.page_table)
            self._table_dirty = False

    def _live_on(self, worker: int) -> list[int]:
        """Worker ``worker``'s live slots, in admission order."""
        B = self.pool.config.slots_per_worker
        live = [s for s in range(worker * B, (worker + 1) * B) if self.active[s]]
        return sorted(live, key=lambda s: self.slots[s].order)

    def _preempt(self, slot: int) -> None:
        """Swap ``slot``'s K/V to host memory, free its pages and requeue it at the front."""
        live = self.slots[slot]
        B = self.pool.config.slots_per_worker
        worker, local = divmod(slot, B)
        length = live.cached_after_step() - 1  # tokens in its cache now
        live.swapped = self.pool.read_prefix(worker, local, self.page_table[slot], length)
        self._release_pages(slot)
        self.slots[slot], self.active[slot] = None, False
        self.queue.appendleft(live)
        self.preemptions += 1

    def _release_pages(self, slot: int) -> None:
        if self.allocators:
            live = self.slots[slot]
            self.allocators[slot // self.pool.config.slots_per_worker].free(live.request.id)
            self.page_table[slot] = NULL_PAGE
            self._table_dirty = True

    def _append(self, live: _Live, token: int, lp: Logprobs | None = None, row: int = 0) -> str:
        return record_token(live, token, lp, row, eos=self.eos, now=self.clock())

    def _free(self, slot: int, reason: str) -> None:
        live = self.slots[slot]
        self._release_pages(slot)
        self.slots[slot], self.active[slot] = None, False
        self._finish(live, reason)

    def _finish(self, live: _Live, reason: str) -> None:
        finish_live(live, reason, now=self.clock(), results=self.results)


def record_token(
    live: _Live, token: int, lp: Logprobs | None, row: int, *, eos: frozenset[int], now: float
) -> str:
    """Record one new token of ``live`` (and its logprobs, row ``row`` of ``lp``, if the
    request asks for them), stream the text that is safe to show; returns the finish reason
    or "". Shared by the in-process scheduler and the cluster frontend."""
    res = live.result
    if res.first_token_at is None:
        res.first_token_at = now
    res.tokens.append(token)
    if live.request.logprobs is not None and lp is not None:
        res.logprobs.append(float(lp.logprob[row]))
        top = zip(lp.top_ids[row].tolist(), lp.top_logprobs[row].tolist(), strict=True)
        res.top_logprobs.append(list(top)[: live.request.logprobs])
    if token in eos and not live.request.ignore_eos:
        return "stop"
    live.detok.push(token)
    if live.detok.stopped:
        return "stop"
    if len(res.tokens) >= live.request.max_tokens:
        return "length"
    if live.on_text is not None:
        delta = live.detok.take()
        if delta:
            live.on_text(res.id, delta, False)
    return ""


def finish_live(live: _Live, reason: str, *, now: float, results: dict[str, Result]) -> Result:
    """End ``live`` with ``reason``: flush its text, stamp it, file it in ``results``, then
    send the last delta (whose callback may take it out of ``results`` again)."""
    live.detok.flush()
    delta = live.detok.take(final=True)
    res = live.result
    res.text, res.finish_reason, res.finished_at = live.detok.text, reason, now
    results[res.id] = res
    if live.on_text is not None:
        live.on_text(res.id, delta, True)
    return res
