"""Scheduler over 4 emulated decode workers: parity with generate, routing, churn, errors."""

import numpy as np
import pytest

from serve.router import LeastLoaded, ModelAffine
from serve.scheduler import QueueFull, Request, Scheduler
from tests.serve.conftest import MODELS
from tests.serve.conftest import reference as _reference

N_NEW = 8
SAMPLED = {"temperature": 0.8, "top_k": 30, "top_p": 0.9}


def _requests(n, seed=0, max_len=24):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        prompt = tuple(rng.integers(0, 97, rng.integers(1, max_len)).tolist())
        sampling = SAMPLED | {"seed": i} if i % 3 == 2 else {}
        reqs.append(
            Request(id=f"r{i}", model=MODELS[i % 3], prompt=prompt, max_tokens=N_NEW, **sampling)
        )
    return reqs


def test_sun_mixed_batch_matches_each_request_alone(tiny, sun_pool):
    cfg, decode, tasks = tiny
    sched = Scheduler(sun_pool, tasks, LeastLoaded(4))
    reqs = _requests(12)
    for r in reqs:
        sched.submit(r)
    sched.run_until_idle()
    for r in reqs:
        assert sched.results[r.id].tokens == _reference(cfg, tasks[r.model], decode, r), r.id
    # the trees are distinguishable: the wrong prefill or decode tree changes the output
    r = reqs[0]
    assert _reference(cfg, tasks["code"], decode, r) != sched.results[r.id].tokens
    assert _reference(cfg, tasks[r.model], tasks[r.model], r) != sched.results[r.id].tokens


def test_conventional_model_affine_matches_full_trees(tiny, conv_pool):
    cfg, _, tasks = tiny
    router = ModelAffine.split(MODELS, 4)
    sched = Scheduler(conv_pool, tasks, router)
    reqs = _requests(9, seed=1)
    for r in reqs:
        sched.submit(r)
    sched.run_until_idle()
    for r in reqs:
        res = sched.results[r.id]
        assert res.worker in router.workers_for(r.model)
        assert res.tokens == _reference(cfg, tasks[r.model], None, r), r.id


def test_least_loaded_spreads_and_model_affine_stays_home(tiny, sun_pool, conv_pool):
    _, _, tasks = tiny
    sched = Scheduler(sun_pool, tasks, LeastLoaded(4))
    for i in range(4):
        sched.submit(Request(id=f"s{i}", model="math", prompt=(1, 2, 3), max_tokens=4))
    sched.step()
    assert sched.free_slots() == [1, 1, 1, 1]  # one math request on every worker
    sched.run_until_idle()

    router = ModelAffine.split(MODELS, 4)
    sched = Scheduler(conv_pool, tasks, router)
    for i in range(6):
        sched.submit(Request(id=f"c{i}", model="code", prompt=(4, 5), max_tokens=4))
    sched.step()
    assert sched.free_slots() == [2, 2, 0, 2]  # only code's worker; 4 requests still wait
    assert len(sched.queue) == 4
    sched.run_until_idle()
    assert {res.worker for res in sched.results.values()} == {2}


def test_200_requests_with_cancellations_all_accounted(tiny, sun_pool):
    _, _, tasks = tiny
    sched = Scheduler(sun_pool, tasks, LeastLoaded(4), max_queue=200)
    rng = np.random.default_rng(3)
    reqs = []
    for i in range(200):
        prompt = tuple(rng.integers(0, 97, rng.integers(1, 30)).tolist())
        reqs.append(
            Request(
                id=f"q{i}",
                model=MODELS[rng.integers(3)],
                prompt=prompt,
                max_tokens=int(rng.integers(1, 20)),
                temperature=float(rng.choice([0.0, 1.0])),
                seed=i,
            )
        )
    to_cancel = [r.id for r in reqs[::7]]  # cancelled in submission order: deterministic
    for r in reqs:
        sched.submit(r)
    steps = 0
    while sched.busy:
        sched.step()
        steps += 1
        if steps % 3 == 0 and to_cancel:
            sched.cancel(to_cancel.pop(0))
    assert set(sched.results) == {r.id for r in reqs}
    for r in reqs:
        res = sched.results[r.id]
        assert res.finish_reason in ("length", "cancelled"), res
        if res.finish_reason == "length":
            assert len(res.tokens) == r.max_tokens
    assert any(res.finish_reason == "cancelled" and res.tokens for res in sched.results.values())
    assert not sched.active.any() and all(s is None for s in sched.slots)
    assert sched.free_slots() == [2, 2, 2, 2]
    assert not np.asarray(sun_pool.state.active).any()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"model": "poetry"}, "poetry"),
        ({"prompt": ()}, "empty"),
        ({"prompt": (1,) * 70}, "70"),
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"max_tokens": 60, "prompt": (1,) * 10}, "max_tokens=60"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_k": -3}, "top_k=-3"),
        ({"prompt": (1, 500)}, "500"),
    ],
)
def test_bad_requests_raise_and_others_continue(tiny, sun_pool, change, needle):
    cfg, decode, tasks = tiny
    sched = Scheduler(sun_pool, tasks, LeastLoaded(4))
    good = Request(id="good", model="tool", prompt=(7, 8, 9), max_tokens=5)
    sched.submit(good)
    bad = Request(**({"id": "bad", "model": "math", "prompt": (1, 2), "max_tokens": 4} | change))
    with pytest.raises(ValueError, match=needle):
        sched.submit(bad)
    sched.run_until_idle()
    assert set(sched.results) == {"good"}
    assert sched.results["good"].tokens == _reference(cfg, tasks["tool"], decode, good)


def test_queue_bound_refuses_with_clear_error(tiny, sun_pool):
    _, _, tasks = tiny
    sched = Scheduler(sun_pool, tasks, LeastLoaded(4), max_queue=2)
    sched.submit(Request(id="a", model="math", prompt=(1,), max_tokens=3))
    sched.submit(Request(id="b", model="math", prompt=(1,), max_tokens=3))
    with pytest.raises(QueueFull, match="max_queue=2"):
        sched.submit(Request(id="c", model="math", prompt=(1,), max_tokens=3))
    sched.run_until_idle()
    assert sorted(sched.results) == ["a", "b"]
