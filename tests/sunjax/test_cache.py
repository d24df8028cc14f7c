"""prefill + decode_step + extend agree with forward; padding and batching change nothing."""

import chex
import jax
import numpy as np
import pytest

import sunjax
from sunjax.generate import pad_prompts


def _model(scan_layers=False, **kw):
    cfg = sunjax.ModelConfig(
        vocab_size=97,
        d_model=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=12,
        ffn_dim=80,
        max_position_embeddings=128,
        scan_layers=scan_layers,
        **kw,
    )
    return cfg, sunjax.init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_prefill_then_decode_reproduces_forward(scan_layers):
    cfg, params = _model(scan_layers)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 20))
    full = np.asarray(sunjax.forward(cfg, params, tokens))
    n_prompt = 7
    cache = cfg.init_cache(3, 32)
    logits, cache = sunjax.prefill(cfg, params, tokens[:, :n_prompt], np.full(3, n_prompt), cache)
    np.testing.assert_allclose(logits, full[:, n_prompt - 1], atol=1e-5, rtol=0)
    for t in range(n_prompt, 20):
        logits, cache = sunjax.decode_step(cfg, params, tokens[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.lengths, [20, 20, 20])


def test_extend_after_prefill_reproduces_forward():
    cfg, params = _model()
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 16))
    full = np.asarray(sunjax.forward(cfg, params, tokens))
    _, cache = sunjax.prefill(cfg, params, tokens[:, :5], np.array([5, 5]), cfg.init_cache(2, 16))
    logits, cache = sunjax.extend(cfg, params, tokens[:, 5:], cache)
    np.testing.assert_allclose(logits, full[:, 5:], atol=1e-5, rtol=0)


def test_right_padded_batch_equals_each_sequence_alone():
    cfg, params = _model()
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (3, 11, 8)]
    tokens, lengths = pad_prompts(prompts, 16)
    batch_logits, batch_cache = sunjax.prefill(cfg, params, tokens, lengths, cfg.init_cache(3, 24))
    nxt = rng.randint(0, cfg.vocab_size, 3)
    step_logits, _ = sunjax.decode_step(cfg, params, nxt, batch_cache)
    for i, p in enumerate(prompts):
        one = np.asarray(sunjax.forward(cfg, params, np.array([p + [int(nxt[i])]])))
        np.testing.assert_allclose(batch_logits[i], one[0, len(p) - 1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(step_logits[i], one[0, len(p)], atol=1e-5, rtol=0)


def test_scan_and_unrolled_trees_convert_both_ways():
    cfg, params = _model(scan_layers=True)
    unrolled = sunjax.unstack_layers(cfg, params)
    chex.assert_trees_all_equal(sunjax.stack_layers(cfg, unrolled), params)
    tokens = np.arange(10)[None] % cfg.vocab_size
    a = sunjax.forward(cfg, params, tokens)
    b = sunjax.forward(cfg.replace(scan_layers=False), unrolled, tokens)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_cache_insert_copies_one_slot():
    cfg, params = _model()
    pool = cfg.init_cache(4, 24)
    _, one = sunjax.prefill(
        cfg, params, np.array([[5, 6, 7, 0]]), np.array([3]), cfg.init_cache(1, 16)
    )
    pool = pool.insert(one, 2)
    np.testing.assert_array_equal(pool.lengths, [0, 0, 3, 0])
    np.testing.assert_array_equal(pool.k[1][2, :, :16], one.k[1][0])
    assert not np.asarray(pool.k[1])[[0, 1, 3]].any()
