"""The paged KV cache in the serving stack: parity with generate and with the dense pool,
page accounting under churn and cancellation, and preemption that changes no token.

Pools of 4 emulated workers x 2 slots, pages of 4 tokens; ``PAGES`` per worker is too few
for both slots of a worker at full length, so long requests preempt each other."""

import numpy as np
import pytest

from serve.engine import EngineConfig
from serve.pool import DecodePool
from serve.router import LeastLoaded, ModelAffine
from serve.scheduler import Request, Scheduler
from sunjax.paged import NULL_PAGE
from tests.serve.conftest import MAX_LEN, MODELS, SLOTS, WORKERS
from tests.serve.conftest import reference as _reference

PAGE, PAGES = 4, 24  # 23 usable pages of 4 tokens per worker; one sequence needs <= 16
SAMPLED = {"temperature": 0.8, "top_k": 30, "top_p": 0.9}


@pytest.fixture(scope="module")
def paged_config():
    return EngineConfig(
        workers=WORKERS, slots_per_worker=SLOTS, max_len=MAX_LEN, page_size=PAGE, num_pages=PAGES
    )


@pytest.fixture(scope="module")
def paged_sun_pool(tiny, paged_config):
    cfg, decode, _ = tiny
    return DecodePool(cfg, paged_config, decode_params=decode)


def _requests(n, seed=0, prompt_len=(1, 24), max_tokens=(8, 9), sampled_every=3):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        prompt = tuple(rng.integers(0, 97, rng.integers(*prompt_len)).tolist())
        sampling = SAMPLED | {"seed": i} if i % sampled_every == sampled_every - 1 else {}
        reqs.append(
            Request(
                id=f"r{i}",
                model=MODELS[i % 3],
                prompt=prompt,
                max_tokens=int(rng.integers(*max_tokens)),
                **sampling,
            )
        )
    return reqs


def _run(sched, reqs):
    for r in reqs:
        sched.submit(r)
    while sched.busy:
        sched.step()
        _check_pages(sched)
    return {r.id: sched.results[r.id].tokens for r in reqs}


def _check_pages(sched):
    """Every allocator's invariants; its sequences are exactly its workers' live slots and
    the host page table holds their rows (null rows for free slots)."""
    B = sched.pool.config.slots_per_worker
    for w, alloc in enumerate(sched.allocators):
        alloc.check()
        slots = [s for s in range(w * B, (w + 1) * B) if sched.active[s]]
        live = {sched.slots[s].request.id: s for s in slots}
        assert len(alloc) == len(live)
        for rid, slot in live.items():
            np.testing.assert_array_equal(sched.page_table[slot], alloc.page_row(rid))
    if sched.allocators:
        assert (sched.page_table[~sched.active] == NULL_PAGE).all()


def test_sun_paged_matches_generate_and_dense(tiny, paged_sun_pool, sun_pool):
    cfg, decode, tasks = tiny
    reqs = _requests(12)
    paged = _run(Scheduler(paged_sun_pool, tasks, LeastLoaded(WORKERS)), reqs)
    dense = _run(Scheduler(sun_pool, tasks, LeastLoaded(WORKERS)), reqs)
    assert paged == dense
    for r in reqs:
        assert paged[r.id] == _reference(cfg, tasks[r.model], decode, r), r.id


def test_conventional_paged_matches_full_trees(tiny, paged_config):
    cfg, _, tasks = tiny
    owners = ["math", "math", "code", "tool"]
    pool = DecodePool(cfg, paged_config, worker_params=[tasks[m] for m in owners])
    router = ModelAffine.split(MODELS, WORKERS)
    sched = Scheduler(pool, tasks, router)
    reqs = _requests(9, seed=1, max_tokens=(6, 20))
    out = _run(sched, reqs)
    for r in reqs:
        assert sched.results[r.id].worker in router.workers_for(r.model)
        assert out[r.id] == _reference(cfg, tasks[r.model], None, r), r.id


def test_preemption_gives_the_uninterrupted_tokens(tiny, paged_sun_pool):
    """Two long sequences per worker need up to 32 pages of the 23 a worker has."""
    cfg, decode, tasks = tiny
    sched = Scheduler(paged_sun_pool, tasks, LeastLoaded(WORKERS))
    reqs = _requests(10, seed=2, prompt_len=(16, 30), max_tokens=(30, 34), sampled_every=2)
    out = _run(sched, reqs)
    assert sched.preemptions > 0
    for r in reqs:
        assert sched.results[r.id].finish_reason == "length"
        assert out[r.id] == _reference(cfg, tasks[r.model], decode, r), r.id
    assert all(a.num_free == a.capacity for a in sched.allocators)


def test_500_requests_with_cancellations_leak_no_page(tiny, paged_sun_pool):
    _, _, tasks = tiny
    sched = Scheduler(paged_sun_pool, tasks, LeastLoaded(WORKERS), max_queue=500)
    rng = np.random.default_rng(5)
    reqs = []
    for i in range(500):
        prompt = tuple(rng.integers(0, 97, rng.integers(1, 40)).tolist())
        reqs.append(
            Request(
                id=f"q{i}",
                model=MODELS[rng.integers(3)],
                prompt=prompt,
                max_tokens=int(rng.integers(1, min(24, MAX_LEN - len(prompt)))),
                temperature=float(rng.choice([0.0, 1.0])),
                seed=i,
            )
        )
    for r in reqs:
        sched.submit(r)
    live_ids = lambda: [live.request.id for live in sched._all()]
    while sched.busy:
        sched.step()
        _check_pages(sched)
        if rng.random() < 0.3 and live_ids():  # a queued, running or preempted request
            assert sched.cancel(str(rng.choice(live_ids())))
            _check_pages(sched)
    assert set(sched.results) == {r.id for r in reqs}
    cancelled = [r for r in sched.results.values() if r.finish_reason == "cancelled"]
    assert len(cancelled) > 50
    for r in reqs:
        res = sched.results[r.id]
        if res.finish_reason == "length":
            assert len(res.tokens) == r.max_tokens
    assert sched.preemptions > 0
    assert not sched.active.any() and all(s is None for s in sched.slots)
    for alloc in sched.allocators:
        alloc.check()
        assert len(alloc) == 0 and alloc.num_free == alloc.capacity


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_pages": 10}, "num_pages=10 needs a page_size"),
        ({"page_size": 0}, "page_size=0"),
        ({"page_size": 4, "num_pages": 16}, "num_pages=16 cannot hold one sequence"),
    ],
)
def test_paged_config_errors_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        EngineConfig(max_len=64, **kwargs)


def test_paged_config_default_pages_fit_every_slot():
    config = EngineConfig(slots_per_worker=3, max_len=64, page_size=16)
    assert (config.pages_per_seq, config.num_pages) == (4, 13)
