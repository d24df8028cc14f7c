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

Prefill options (``Scheduler(...)`` keywords):

* ``prefix_cache`` (paged only): the full page-sized blocks of every prefilled prompt stay
  in its worker's pool, keyed by ``sunjax.paged.block_keys``: the prefill tree's content hash
  (``sunjax.export.fingerprint``, computed once per registered tree) chained with the
  tokens up to and through the block.  A new request is routed to the worker holding the
  longest run of its leading blocks (among those the router allows), shares those pages
  read-only (``PageAllocator.allocate(shared=...)``; ``insert`` never writes them), reads
  them back as a dense cache (``DecodePool.read_pages``) and prefills only the rest with its
  own prefill tree.  At least the last prompt token is always prefilled, so the first token
  comes from the prefill tree's logits as without the cache.  Cached pages no sequence holds
  are evicted least recently used first when an allocation runs short.  Counters:
  ``prefix_hits`` (requests that reused a block), ``prefix_tokens_saved``.
* ``prefill_chunk`` C > 0: a prompt with more than C tokens left to prefill is prefilled C
  tokens per ``step()`` (first chunk into a fresh dense cache, later ones after it with the
  same prefill tree), one chunk between two decode steps; its slot and pages are reserved
  when it starts and it joins the decode batch after its last chunk.
* ``prefill_batch_tokens`` > 0: new cache-miss prompts of the same model that fit in one
  step are prefilled in one call (``Engine.prefill_batch``) while their true tokens stay
  within this budget; one batch counts as one prefill toward ``prefills_per_step``.
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
from sunjax.export import fingerprint
from sunjax.paged import NULL_PAGE, OutOfPages, PageAllocator, block_keys


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
    slot: int = -1  # its decode slot once admitted (reserved while it is prefilled)
    keys: tuple[str, list[bytes]] = ("", [])  # (prefill fingerprint, its prompt's block keys)
    shared: int = 0  # leading pages shared from the prefix cache
    done: int = 0  # prompt tokens prefilled so far (shared ones included)
    prior: KVCache | None = None  # dense cache of those tokens, while it is prefilled
    size: int = 0  # positions of that dense cache

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


def enqueue(sched, request: Request, on_text: StreamCallback | None, arrival: float | None):
    """What every scheduler (in-process or cluster frontend) does to take ``request``:
    validate it, refuse it over the queue bound (``QueueFull``), queue it; returns its
    ``Result``."""
    sched.validate(request)
    if len(sched.queue) >= sched.max_queue:
        raise QueueFull(
            f"request {request.id!r} refused: {len(sched.queue)} requests already wait "
            f"(max_queue={sched.max_queue})"
        )
    result = Result(
        id=request.id,
        model=request.model,
        tokens=[],
        arrival=sched.clock() if arrival is None else arrival,
    )
    sched.queue.append(_Live(request, result, Detokenizer(sched.tokenizer, request.stop), on_text))
    return result


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
        prefix_cache: bool = False,
        prefill_chunk: int = 0,
        prefill_batch_tokens: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """``prefills_per_step`` > 0 caps the prefill calls (a prompt, a chunk or a batch)
        between two decode steps while slots are decoding, so arriving prompts stall running
        streams by at most that many (0: admit whatever fits).  ``prefix_cache``,
        ``prefill_chunk`` and ``prefill_batch_tokens``: see the module docstring."""
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        if prefills_per_step < 0:
            raise ValueError(f"prefills_per_step={prefills_per_step} must be >= 0")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 0")
        if prefill_batch_tokens < 0:
            raise ValueError(f"prefill_batch_tokens={prefill_batch_tokens} must be >= 0")
        if prefix_cache and not pool.config.paged:
            raise ValueError("prefix_cache=True needs a paged pool (EngineConfig.page_size)")
        self.prefills_per_step = prefills_per_step
        self.prefix_cache = prefix_cache
        self.prefill_chunk = prefill_chunk
        self.prefill_batch_tokens = prefill_batch_tokens
        self.prefix_hits = 0  # requests that reused at least one cached block
        self.prefix_tokens_saved = 0  # prompt tokens not prefilled thanks to the cache
        self.prefill_calls = 0  # prefill dispatches (a prompt, a chunk or a batch)
        self.prefill_tokens = 0  # prompt tokens prefilled (true, not padded)
        self._fingerprints: dict[str, tuple[Params, str]] = {}
        self._chunking: _Live | None = None  # the prompt being prefilled chunk by chunk
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
        if prefix_cache:
            for model in self.prefill_params:
                self.fingerprint(model)

    def fingerprint(self, model: str) -> str:
        """Content hash of ``model``'s prefill tree, computed once per tree object (a tree
        put in ``prefill_params`` under an old name is hashed anew)."""
        tree = self.prefill_params[model]
        known = self._fingerprints.get(model)
        if known is None or known[0] is not tree:
            known = self._fingerprints[model] = (tree, fingerprint(tree))
        return known[1]

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
        return enqueue(self, request, on_text, arrival)

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
                if live is self._chunking:
                    self._chunking, live.prior = None, None
                self._free(slot, reason)
                self.pool.set_active(self.active)
                return True
        return False

    # -- the loop ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.queue) or bool(self.active.any()) or self._chunking is not None

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
            sum(live is None for live in self.slots[w * B : (w + 1) * B])
            for w in range(self.pool.config.workers)
        ]

    # -- internals -----------------------------------------------------------------------
    def _all(self):
        yield from self.queue
        yield from (live for live in self.slots if live is not None)

    def _admit(self) -> None:
        """Advance the chunked prefill (one chunk), then admit waiting requests while slots,
        pages and the per-step prefill budget allow: resume preempted ones, prefill new ones
        (one by one, chunked, after cached blocks, or batched per model)."""
        budget = self.prefills_per_step if self.active.any() else 0
        calls = 0
        if self._chunking is not None:
            self._prefill_piece(self._chunking)
            calls += 1
        free = self.free_slots()
        spare = self._spare_pages()
        batches: dict[str, list[_Live]] = {}
        # models that found no worker this step: their later requests wait without a look
        # (under skew a model-affine queue holds many of them, scanned every step)
        blocked: set[str] = set()
        for live in list(self.queue):
            if not any(free):
                break
            if budget and calls >= budget:
                break
            req = live.request
            if req.model in blocked and live.swapped is None:
                continue
            need = live.cached_after_step()
            hits = self._hits(live) if live.swapped is None else [[] for _ in self.allocators]
            fits = free
            if self.allocators:  # a free slot on a worker with pages for it
                fits = [
                    f if a.cost(need, h) <= s else 0
                    for f, s, a, h in zip(free, spare, self.allocators, hits, strict=True)
                ]
            worker = self._pick(req.model, fits, [len(h) for h in hits])
            if worker is None:
                if live.swapped is not None:
                    break  # a preempted request resumes before anything newer starts
                blocked.add(req.model)
                continue  # this model's workers are full; later requests may fit elsewhere
            chunked = self._needs_chunks(live, len(hits[worker]) if hits else 0)
            if chunked and self._chunking is not None:
                continue  # one prompt is prefilled in chunks at a time
            self.queue.remove(live)
            B = self.pool.config.slots_per_worker
            local = next(s for s in range(B) if self.slots[worker * B + s] is None)
            live.slot = slot = worker * B + local
            self.slots[slot] = live  # reserved; active once inserted
            free[worker] -= 1
            live.result.worker = worker
            if self.allocators:
                alloc = self.allocators[worker]
                shared = alloc.lookup(live.keys[1][: len(hits[worker])])
                spare[worker] -= alloc.cost(need, shared)
                alloc.allocate(req.id, need, shared)
                live.shared, live.done = len(shared), len(shared) * alloc.page_size
            if live.swapped is not None:  # resume: the host K/V goes back in with its last token
                sp = self._sampling(req)
                prefix = Prefix(
                    cache=live.swapped,
                    token=jnp.int32(live.result.tokens[-1]),
                    length=jnp.int32(need - 1),
                    sampling=sp,
                    model=req.model,
                )
                live.swapped = None
                self._insert(live, prefix)
                calls += 1
                continue
            live.result.admitted_at = self.clock()
            live.order, self._admitted = self._admitted, self._admitted + 1
            if live.done:
                self.prefix_hits += 1
                self.prefix_tokens_saved += live.done
            group = batches.get(req.model)
            if chunked or live.done or not self.prefill_batch_tokens:
                if chunked:
                    self._chunking = live
                self._prefill_piece(live)
                calls += 1
            elif group and sum(len(x.request.prompt) for x in group) + len(req.prompt) <= (
                self.prefill_batch_tokens
            ):
                group.append(live)
            else:
                if group:
                    self._prefill_batch(group)
                batches[req.model] = [live]
                calls += 1
        for group in batches.values():
            self._prefill_batch(group)

    def _hits(self, live: _Live) -> list[list[int]]:
        """Per worker: the cached pages of ``live``'s leading prompt blocks (never the block
        of its last token, which must be prefilled for the first token's logits)."""
        if not self.prefix_cache:
            return [[] for _ in self.allocators]
        req = live.request
        fp = self.fingerprint(req.model)
        if live.keys[0] != fp:
            live.keys = (fp, block_keys(fp, req.prompt, self.pool.config.page_size))
        usable = live.keys[1][: (len(req.prompt) - 1) // self.pool.config.page_size]
        return [a.peek(usable) for a in self.allocators]

    def _pick(self, model: str, fits: list[int], hits: list[int]) -> int | None:
        """The router's pick among the workers holding most cached blocks, else its pick."""
        best = max((h for h, f in zip(hits, fits, strict=False) if f), default=0)
        if best:
            preferred = [f if h == best else 0 for f, h in zip(fits, hits, strict=True)]
            worker = self.router.pick(model, preferred)
            if worker is not None:
                return worker
        return self.router.pick(model, fits)

    def _needs_chunks(self, live: _Live, hit_blocks: int) -> bool:
        rest = len(live.request.prompt) - hit_blocks * (self.pool.config.page_size or 0)
        return live.swapped is None and 0 < self.prefill_chunk < rest

    @staticmethod
    def _sampling(req: Request):
        return sampling_params(
            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed
        )

    def _prefill_piece(self, live: _Live) -> None:
        """Prefill ``live``'s next piece (its next chunk, or all that is left) after what it
        has (cached blocks or earlier chunks); after the last one, start it decoding."""
        req = live.request
        n, start, C = len(req.prompt), live.done, self.prefill_chunk
        end = min(n, start + C) if C else n
        worker = live.slot // self.pool.config.slots_per_worker
        if not live.size:
            starts = range(start, n, C) if C else [start]
            live.size = self.engine.prefill_size([(s, min(n, s + (C or n)) - s) for s in starts])
        if start and live.prior is None:  # cached blocks: read them back from the pool
            row = self.allocators[worker].page_row(req.id)
            live.prior = self.pool.read_pages(worker, row, start, live.size)
        prefix = self.engine.prefill(
            self.prefill_params[req.model],
            req.prompt[start:end],
            self._sampling(req),
            model=req.model,
            prior=live.prior,
            size=None if live.prior is not None else live.size,
        )
        self.prefill_calls += 1
        self.prefill_tokens += end - start
        live.done = end
        if end < n:
            live.prior = prefix.cache
            return
        live.prior = None
        if live is self._chunking:
            self._chunking = None
        self._start(live, prefix)

    def _prefill_batch(self, group: list[_Live]) -> None:
        """Prefill cache-miss prompts of one model in one call, then start each."""
        req = group[0].request
        if len(group) == 1:
            self._prefill_piece(group[0])
            return
        prefixes = self.engine.prefill_batch(
            self.prefill_params[req.model],
            [x.request.prompt for x in group],
            [self._sampling(x.request) for x in group],
            model=req.model,
        )
        self.prefill_calls += 1
        self.prefill_tokens += sum(len(x.request.prompt) for x in group)
        for live, prefix in zip(group, prefixes, strict=True):
            live.done = len(live.request.prompt)
            self._start(live, prefix)

    def _start(self, live: _Live, prefix: Prefix) -> None:
        """Record a prefilled request's first token; unless that ends it, put it in its
        reserved slot and cache its prompt's full blocks."""
        req = live.request
        lp = None if req.logprobs is None else jax.device_get(prefix.logprobs)
        reason = self._append(live, int(prefix.token), lp, 0)
        if reason:
            self._free(live.slot, reason)
            return
        self._insert(live, prefix)
        if self.prefix_cache:
            alloc = self.allocators[live.slot // self.pool.config.slots_per_worker]
            alloc.cache_blocks(req.id, live.keys[1])

    def _insert(self, live: _Live, prefix: Prefix) -> None:
        worker, local = divmod(live.slot, self.pool.config.slots_per_worker)
        row = None
        if self.allocators:
            row = self.page_table[live.slot] = self.allocators[worker].page_row(live.request.id)
        self.pool.insert(prefix, worker, local, row, live.shared)
        self.active[live.slot] = True

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
