"""Prefix caching keyed by the task's prefill module, chunked prefill and batched prefill in
the scheduler: tokens identical to ``generate``, hits only where the K/V is the same, cached
pages never written, page accounting under churn.

Paged pools of 4 emulated workers x 2 slots, pages of 4 tokens."""

import dataclasses

import jax
import numpy as np
import pytest

from serve.engine import EngineConfig
from serve.pool import DecodePool
from serve.router import LeastLoaded
from serve.scheduler import Request, Scheduler
from sunjax import init_params
from sunjax.paged import NULL_PAGE
from tests.serve.conftest import MAX_LEN, MODELS, SLOTS, WORKERS
from tests.serve.conftest import reference as _reference

PAGE = 4
SAMPLED = {"temperature": 0.8, "top_k": 30, "top_p": 0.9}
SYSTEM = tuple(range(3, 23))  # a 20-token shared prefix: 5 full blocks


@pytest.fixture(scope="module")
def pool(tiny):
    cfg, decode, _ = tiny
    config = EngineConfig(
        workers=WORKERS, slots_per_worker=SLOTS, max_len=MAX_LEN, page_size=PAGE, num_pages=40
    )
    return DecodePool(cfg, config, decode_params=decode)


@pytest.fixture(scope="module")
def small_pool(tiny):
    """24 pages per worker (23 usable): the cache must evict to admit."""
    cfg, decode, _ = tiny
    config = EngineConfig(
        workers=WORKERS, slots_per_worker=SLOTS, max_len=MAX_LEN, page_size=PAGE, num_pages=24
    )
    return DecodePool(cfg, config, decode_params=decode)


def _check(sched):
    """Allocator invariants; live slots' host rows are their pages, every other row null."""
    B = sched.pool.config.slots_per_worker
    for w, alloc in enumerate(sched.allocators):
        alloc.check()
        for s in range(w * B, (w + 1) * B):
            if sched.active[s]:
                rid = sched.slots[s].request.id
                np.testing.assert_array_equal(sched.page_table[s], alloc.page_row(rid))
            else:
                assert (sched.page_table[s] == NULL_PAGE).all()


def _run(sched, reqs, on_step=None):
    for r in reqs:
        sched.submit(r)
    while sched.busy:
        sched.step()
        _check(sched)
        if on_step is not None:
            on_step(sched)
    return {r.id: sched.results[r.id].tokens for r in reqs}


def _run_pairs(sched, reqs):
    """Two at a time: both fit on the worker that holds the cached blocks (2 slots each)."""
    out = {}
    for i in range(0, len(reqs), 2):
        out |= _run(sched, reqs[i : i + 2])
    return out


def _drain(sched):
    """Clear every cache: then every page must be free (nothing leaked)."""
    assert not sched.busy
    for alloc in sched.allocators:
        alloc.clear_cache()
        alloc.check()
        assert len(alloc) == 0 and len(alloc._free) == alloc.capacity


def _with_system(n, seed, model=None, tail=(1, 12), max_tokens=8):
    rng = np.random.default_rng(seed)
    return [
        Request(
            id=f"s{seed}-{i}",
            model=model or MODELS[i % 3],
            prompt=SYSTEM + tuple(rng.integers(0, 97, rng.integers(*tail)).tolist()),
            max_tokens=max_tokens,
            **(SAMPLED | {"seed": i} if i % 2 else {}),
        )
        for i in range(n)
    ]


def _cached_pages(sched):
    """Every worker's cached pages' K/V on the host, by (worker, page)."""
    B = sched.pool.config.slots_per_worker
    k = np.asarray(sched.pool.state.cache.k[0])  # [W * K, A, P, H]
    K = k.shape[0] // sched.pool.config.workers
    del B
    return {
        (w, p): k[w * K : (w + 1) * K, p].copy()
        for w, a in enumerate(sched.allocators)
        for p in a._block
    }


def test_same_prefix_same_module_hits_and_changes_no_token(tiny, pool):
    cfg, decode, tasks = tiny
    sched = Scheduler(pool, tasks, LeastLoaded(WORKERS), prefix_cache=True)
    warm = _with_system(1, seed=0, model="math")
    _run(sched, warm)
    assert sched.prefix_hits == 0
    before = _cached_pages(sched)
    assert len(before) == 5 + (len(warm[0].prompt) - 20) // PAGE
    reqs = _with_system(6, seed=1, model="math")
    out = _run_pairs(sched, reqs)
    assert sched.prefix_hits == 6
    assert sched.prefix_tokens_saved == 6 * 20
    after = _cached_pages(sched)
    for key, kv in before.items():  # read-only: cached pages never written
        np.testing.assert_array_equal(after[key], kv)
    for r in reqs:
        assert out[r.id] == _reference(cfg, tasks["math"], decode, r), r.id
    _drain(sched)


def test_same_prefix_other_module_misses(tiny, pool):
    cfg, decode, tasks = tiny
    sched = Scheduler(pool, tasks, LeastLoaded(WORKERS), prefix_cache=True)
    _run(sched, _with_system(1, seed=2, model="math"))
    reqs = _with_system(3, seed=3, model="code")
    out = _run_pairs(sched, reqs)
    assert sched.prefix_hits == 2  # the 2nd and 3rd code requests hit the 1st one's blocks
    for r in reqs:
        assert out[r.id] == _reference(cfg, tasks["code"], decode, r), r.id
    _drain(sched)


def test_reloaded_module_under_the_same_name_misses(tiny, pool):
    cfg, decode, tasks = tiny
    sched = Scheduler(pool, tasks, LeastLoaded(WORKERS), prefix_cache=True)
    _run(sched, _with_system(1, seed=4, model="math"))
    retrained = init_params(cfg, jax.random.PRNGKey(77))
    sched.prefill_params["math"] = retrained
    req = _with_system(1, seed=5, model="math")
    out = _run(sched, req)
    assert sched.prefix_hits == 0
    assert out[req[0].id] == _reference(cfg, retrained, decode, req[0])
    same = dataclasses.replace(req[0], id="again")  # the reloaded tree's own blocks hit
    assert _run(sched, [same])["again"] == out[req[0].id]
    assert sched.prefix_hits == 1
    _drain(sched)


def test_eviction_under_page_pressure_leaks_nothing(tiny, small_pool):
    cfg, decode, tasks = tiny
    sched = Scheduler(small_pool, tasks, LeastLoaded(WORKERS), prefix_cache=True, max_queue=99)
    rng = np.random.default_rng(6)
    reqs = []
    for i in range(40):
        head = SYSTEM if i % 2 else tuple(rng.integers(0, 97, 20).tolist())
        prompt = head + tuple(rng.integers(0, 97, rng.integers(1, 16)).tolist())
        reqs.append(Request(id=f"e{i}", model=MODELS[i % 3], prompt=prompt, max_tokens=12))
    out = _run(sched, reqs)
    assert sum(a.evictions for a in sched.allocators) > 0
    assert sched.prefix_hits > 0
    for r in reqs[:6]:
        assert out[r.id] == _reference(cfg, tasks[r.model], decode, r), r.id
    _drain(sched)


def test_chunked_prefill_matches_and_runs_one_chunk_per_step(tiny, pool):
    cfg, decode, tasks = tiny
    sched = Scheduler(pool, tasks, LeastLoaded(WORKERS), prefill_chunk=8, prefills_per_step=1)
    rng = np.random.default_rng(7)
    short = [Request(id="short", model="tool", prompt=(5, 6, 7), max_tokens=30)]
    long = [
        Request(
            id=f"c{i}",
            model=MODELS[i % 3],
            prompt=tuple(rng.integers(0, 97, rng.integers(20, 40)).tolist()),
            max_tokens=10,
            **(SAMPLED | {"seed": i} if i % 2 else {}),
        )
        for i in range(4)
    ]
    calls = []

    def per_step(s):
        calls.append(s.prefill_calls)

    out = _run(sched, short + long, per_step)
    steps = np.diff([0, *calls])
    # the first step has no stream to stall (no budget); after it, one prefill call at most
    # between two decode steps: a chunk, or a short prompt
    assert steps[0] == 2 and steps[1:].max() == 1
    assert sched.prefill_calls == sum(-(-len(r.prompt) // 8) for r in long) + 1
    for r in short + long:
        assert out[r.id] == _reference(cfg, tasks[r.model], decode, r), r.id


def test_batched_prefill_matches_one_by_one(tiny, pool):
    cfg, decode, tasks = tiny
    sched = Scheduler(pool, tasks, LeastLoaded(WORKERS), prefill_batch_tokens=64)
    rng = np.random.default_rng(8)
    reqs = [
        Request(
            id=f"b{i}",
            model=MODELS[i % 2],
            prompt=tuple(rng.integers(0, 97, rng.integers(1, 20)).tolist()),
            max_tokens=6,
            logprobs=2 if i == 3 else None,
            **(SAMPLED | {"seed": i} if i % 3 == 2 else {}),
        )
        for i in range(8)
    ]
    out = _run(sched, reqs)
    assert sched.prefill_calls < len(reqs)
    for r in reqs:
        assert out[r.id] == _reference(cfg, tasks[r.model], decode, r), r.id
    assert len(sched.results["b3"].logprobs) == 6


def test_all_three_with_cancellations_leak_no_page(tiny, small_pool):
    _, _, tasks = tiny
    sched = Scheduler(
        small_pool,
        tasks,
        LeastLoaded(WORKERS),
        prefix_cache=True,
        prefill_chunk=8,
        prefill_batch_tokens=48,
        max_queue=200,
    )
    rng = np.random.default_rng(9)
    reqs = []
    for i in range(120):
        head = SYSTEM[: rng.integers(0, 21)] if i % 2 else ()
        prompt = head + tuple(rng.integers(0, 97, rng.integers(1, 30)).tolist())
        reqs.append(
            Request(
                id=f"x{i}",
                model=MODELS[rng.integers(3)],
                prompt=prompt,
                max_tokens=int(rng.integers(1, min(20, MAX_LEN - len(prompt)))),
                temperature=float(rng.choice([0.0, 1.0])),
                seed=i,
            )
        )
    for r in reqs:
        sched.submit(r)
    live_ids = lambda: [live.request.id for live in sched._all()]
    while sched.busy:
        sched.step()
        _check(sched)
        if rng.random() < 0.2 and live_ids():
            assert sched.cancel(str(rng.choice(live_ids())))
            _check(sched)
    assert set(sched.results) == {r.id for r in reqs}
    assert sched.prefix_hits > 0
    assert all(s is None for s in sched.slots) and sched._chunking is None
    _drain(sched)


def test_chunked_prefill_on_a_dense_pool(tiny, sun_pool):
    cfg, decode, tasks = tiny
    sched = Scheduler(sun_pool, tasks, LeastLoaded(WORKERS), prefill_chunk=12)
    rng = np.random.default_rng(10)
    reqs = [
        Request(
            id=f"d{i}",
            model=MODELS[i % 3],
            prompt=tuple(rng.integers(0, 97, n).tolist()),
            max_tokens=MAX_LEN - n,
        )
        for i, n in enumerate((60, 30, 13, 5))
    ]
    out = _run(sched, reqs)
    for r in reqs:
        assert out[r.id] == _reference(cfg, tasks[r.model], decode, r), r.id


def test_prefix_cache_needs_a_paged_pool(tiny, sun_pool):
    with pytest.raises(ValueError, match="prefix_cache=True needs a paged pool"):
        Scheduler(sun_pool, tiny[2], LeastLoaded(WORKERS), prefix_cache=True)
