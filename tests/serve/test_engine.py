"""Engine: prefill / insert / generate equal the reference generate; buckets bound compiles."""

import numpy as np

from serve.engine import Engine, EngineConfig, sampling_params
from sunjax import count_compiles
from sunjax.generate import buckets, generate


def _run_alone(eng, prefill_tree, decode_tree, prompt, n, **sampling):
    state = eng.init_decode_state()
    prefix = eng.prefill(prefill_tree, prompt, sampling_params(**sampling))
    state = eng.insert(prefix, state, slot=1)
    out = [int(prefix.token)]
    for _ in range(n - 1):
        state, tokens = eng.generate(decode_tree, state)
        out.append(int(tokens[1]))
    return out


def test_engine_matches_generate_greedy_and_sampled(tiny):
    cfg, decode, tasks = tiny
    eng = Engine(cfg, EngineConfig(slots_per_worker=3, max_len=64))
    prompt = [5, 17, 33, 2, 90]
    for sampling in ({}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7}):
        want = generate(
            cfg, tasks["code"], [prompt], max_new_tokens=8, decode_params=decode, **sampling
        ).tokens[0]
        assert _run_alone(eng, tasks["code"], decode, prompt, 8, **sampling) == want


def test_prompt_buckets_bound_compilations(tiny):
    cfg, decode, tasks = tiny
    eng = Engine(cfg, EngineConfig(slots_per_worker=2, max_len=64))
    rng = np.random.default_rng(0)
    state = eng.init_decode_state()
    # prompt lengths 1..32 -> buckets 8, 12, 16, 24, 32: warm each bucket once ...
    assert buckets(8, 32) == [8, 12, 16, 24, 32]
    for i, n in enumerate(buckets(8, 32)):
        prefix = eng.prefill(tasks["math"], [1] * n, sampling_params(seed=i))
        state = eng.insert(prefix, state, slot=i % 2)
        state, _ = eng.generate(decode, state)
    # ... then 30 requests of random lengths, models and slots compile nothing more
    with count_compiles() as compiles:
        for i in range(30):
            prompt = rng.integers(0, cfg.vocab_size, rng.integers(1, 33)).tolist()
            model = ("math", "code", "tool")[i % 3]
            prefix = eng.prefill(tasks[model], prompt, sampling_params(seed=i))
            state = eng.insert(prefix, state, slot=i % 2)
            state, _ = eng.generate(decode, state)
    assert compiles.n == 0
