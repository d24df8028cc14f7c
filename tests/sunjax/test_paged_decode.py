"""Paged decode through ``steps.decode_and_sample`` equals the dense decode step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sunjax import ModelConfig, init_params
from sunjax.sampling import SamplingParams
from sunjax.steps import decode_and_sample, prefill_logits, run

PROMPTS = ([1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17])


@pytest.mark.parametrize(
    "layout", [{}, {"scan_layers": True, "sliding_window": 5}], ids=["unrolled", "scan_window"]
)
def test_paged_decode_equals_dense(layout):
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_dim=48,
        **layout,
    )
    params = init_params(cfg, jax.random.PRNGKey(0))
    B, S, P = len(PROMPTS), 32, 4
    dense = cfg.init_cache(B, S)
    paged = cfg.init_paged_cache(B, S, num_pages=40, page_size=P)
    alloc = paged.allocator()
    for b, prompt in enumerate(PROMPTS):
        tokens = np.zeros((1, 16), np.int32)
        tokens[0, : len(prompt)] = prompt
        _, prefix = prefill_logits(
            cfg, params, jnp.asarray(tokens), jnp.array([len(prompt)]), cfg.init_cache(1, 16)
        )
        dense = dense.insert(prefix, b)
        alloc.allocate(b, len(prompt) + 1)
        row = jnp.asarray(alloc.page_row(b))
        paged = paged.insert(prefix, b, row)
        back = paged.read_prefix(b, row, len(prompt))  # the swap-out copy is the prefix
        np.testing.assert_array_equal(back.k[1], prefix.k[1][:, :, : len(prompt)])
    sp = SamplingParams.create(B)
    step = jax.jit(lambda c, t: decode_and_sample(cfg, params, t, c, sp))
    tok = jnp.array([3, 4, 5])
    for i in range(10):  # crosses page boundaries; the window drops early pages
        for b, prompt in enumerate(PROMPTS):
            alloc.extend(b, len(prompt) + 1 + i)
        table = jnp.asarray(alloc.page_table(range(B)))
        paged = type(paged)(k=paged.k, v=paged.v, page_table=table, lengths=paged.lengths)
        want, want_logits, dense = step(dense, tok)
        got, got_logits, paged = step(paged, tok)
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got, want)
        tok = want
    np.testing.assert_array_equal(paged.lengths, dense.lengths)


def test_paged_cache_takes_one_token_per_slot():
    cfg = ModelConfig(
        vocab_size=31, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=16
    )
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache = cfg.init_paged_cache(2, 8, num_pages=4, page_size=4)
    with pytest.raises(ValueError, match=r"one token per slot, got tokens \(2, 3\)"):
        run(cfg, params, jnp.zeros((2, 3), jnp.int32), cache, jnp.zeros((2,), jnp.int32))
