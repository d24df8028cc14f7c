"""Generation: greedy equals transformers' greedy generate; sampling is seeded and per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sunjax
from sunjax.generate import bucket, buckets, generate
from sunjax.sampling import SamplingParams, sample
from tests.conftest import make_hf_model


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_greedy_equals_transformers_generate(tmp_path, model_type):
    path, hf = make_hf_model(tmp_path, model_type, seed=3)
    cfg, params = sunjax.load_hf(path)
    rng = np.random.RandomState(4)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (5, 9)]
    ours = generate(cfg, params, prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, ours.tokens, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert got == ref
    assert ours.finish_reason == ["length", "length"]


def test_eos_stops_each_sequence_and_is_included(tmp_path):
    path, _ = make_hf_model(tmp_path, "llama", seed=5)
    cfg, params = sunjax.load_hf(path)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = generate(cfg, params, prompts, max_new_tokens=10)
    eos = free.tokens[0][3]
    stopped = generate(cfg, params, prompts, max_new_tokens=10, eos_ids=[eos])
    first = free.tokens[0].index(eos)
    assert stopped.tokens[0] == free.tokens[0][: first + 1]
    assert stopped.finish_reason[0] == "stop"
    # row 1 stops at its own first EOS (or runs to the length), whatever row 0 did
    row1 = free.tokens[1]
    cut = row1.index(eos) + 1 if eos in row1 else len(row1)
    assert stopped.tokens[1] == row1[:cut]
    assert stopped.finish_reason[1] == ("stop" if eos in row1 else "length")


def test_sampling_is_seeded_per_row_and_respects_top_k():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50))
    sp = SamplingParams.create(4, temperature=1.0, top_k=3, seed=7)
    pos = jnp.arange(4)
    a, b = sample(logits, sp, pos), sample(logits, sp, pos)
    np.testing.assert_array_equal(a, b)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for _ in range(5):
        pos = pos + 10
        drawn = np.asarray(sample(logits, sp, pos))
        assert all(drawn[i] in top3[i] for i in range(4))
    greedy = SamplingParams.create(4)
    np.testing.assert_array_equal(sample(logits, greedy, pos), np.argmax(logits, -1))


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.05, 0.05]]))
    sp = SamplingParams.create(1, temperature=1.0, top_p=0.5, seed=1)
    draws = {int(sample(logits, sp, jnp.array([i]))[0]) for i in range(30)}
    assert draws == {0}
    sp = SamplingParams.create(1, temperature=1.0, top_p=0.85, seed=1)
    draws = {int(sample(logits, sp, jnp.array([i]))[0]) for i in range(60)}
    assert draws == {0, 1}


def _kept_by_sorting(x: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """The nucleus as a descending sort defines it (the oracle for the sort-free cut)."""
    order = np.argsort(-x, kind="stable")
    k = top_k or len(x)
    kth = x[order[k - 1]]
    kept = [i for i in order if x[i] >= kth]
    if top_p >= 1:  # no nucleus cut (a float cumsum reaches 1 before the last tiny tokens)
        return set(kept)
    p = np.exp(x[kept] - x[kept].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    return {i for i, b in zip(kept, before, strict=True) if b < top_p}


def test_sort_free_cut_keeps_what_sorting_keeps():
    from sunjax.sampling import _cut

    rng = np.random.default_rng(0)
    B, V = 12, 3000
    x = rng.normal(size=(B, V)).astype(np.float32) * rng.uniform(0.5, 8, size=(B, 1))
    x[0, :50] = x[0, 0]  # ties at the cut
    x[1, 100:] = -np.inf  # masked entries
    x[2] = np.round(x[2])  # many ties
    top_k = np.array([0, 5, 1, 50, 0, 0, 2999, 3000, 7, 0, 40, 0])
    top_p = np.array([0.9, 1, 1, 0.95, 0.3, 0.999, 1, 0.5, 0.2, 1e-6, 1, 1.0])
    sp = SamplingParams.create(B, temperature=1.0, top_k=top_k, top_p=top_p)
    cut = np.asarray(_cut(jnp.asarray(x), sp))
    for b in range(B):
        kept = set(np.flatnonzero(np.isfinite(cut[b])).tolist())
        want = _kept_by_sorting(x[b], int(top_k[b]), float(top_p[b]))
        assert kept == want, (b, len(kept), len(want))


def test_bucket_lengths():
    assert [bucket(n) for n in (1, 8, 9, 13, 17, 25, 37, 49, 65, 97)] == [
        8, 8, 12, 16, 24, 32, 48, 64, 96, 128
    ]  # fmt: skip
    for n in range(1, 2000):
        b = bucket(n)
        assert n <= b and (b == 8 or 3 * n > 2 * b), n  # padding < a third of the bucket
    assert buckets(8, 100) == [8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert set(buckets(8, 256)) == {bucket(n) for n in range(1, 257)}
