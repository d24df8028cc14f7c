"""The SUN loss equals the NLL of actually serving: prefill (prefill tree) + decode_step
(decode tree), teacher-forced; gradients reach only the prefill tree."""

import jax
import jax.numpy as jnp
import numpy as np

import sunjax
from sunjax.sun import make_batch, sun_loss, sun_token_nll


def _cfg():
    return sunjax.ModelConfig(
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_dim=48,
        max_position_embeddings=64,
    )


def test_sun_loss_equals_serving_path_nll():
    cfg = _cfg()
    pre = sunjax.init_params(cfg, jax.random.PRNGKey(1))
    dec = sunjax.init_params(cfg, jax.random.PRNGKey(2))
    rng = np.random.RandomState(0)
    pairs = [
        (rng.randint(0, 61, 5).tolist(), rng.randint(0, 61, 4).tolist()),
        (rng.randint(0, 61, 9).tolist(), rng.randint(0, 61, 7).tolist()),
    ]
    batch = make_batch(pairs, prompt_len=12, response_len=8)
    nll, mask = sun_token_nll(cfg, pre, dec, batch)
    for i, (p, r) in enumerate(pairs):
        cache = cfg.init_cache(1, 32)
        logits, cache = sunjax.prefill(cfg, pre, [p], [len(p)], cache)
        want = [-jax.nn.log_softmax(logits[0])[r[0]]]
        for j in range(len(r) - 1):
            logits, cache = sunjax.decode_step(cfg, dec, [r[j]], cache)
            want.append(-jax.nn.log_softmax(logits[0])[r[j + 1]])
        np.testing.assert_allclose(nll[i, : len(r)], want, atol=1e-5, rtol=0)
        assert float(mask[i].sum()) == len(r) and not np.asarray(nll[i, len(r) :]).any()
    loss, metrics = sun_loss(cfg, pre, dec, batch)
    np.testing.assert_allclose(loss, float(nll.sum() / mask.sum()), rtol=1e-6)
    assert float(metrics["tokens"]) == 11


def test_gradient_reaches_prefill_tree_only_through_kv_and_first_token():
    cfg = _cfg()
    pre = sunjax.init_params(cfg, jax.random.PRNGKey(1))
    dec = sunjax.init_params(cfg, jax.random.PRNGKey(2))
    batch = make_batch([([1, 2, 3], [4, 5, 6])], prompt_len=4, response_len=4)
    grads = jax.grad(lambda p: sun_loss(cfg, p, dec, batch)[0])(pre)
    # Every layer's K/V projections get gradient (the decode tree reads that KV) ...
    for i in range(cfg.n_layers):
        assert float(jnp.abs(grads[f"layers_{i}"]["attn"]["k_proj"]["kernel"]).sum()) > 0
    # ... and with a one-token response (first-token logits only) the prefill tree still
    # learns through the last prompt position: its MLP and its attention over the prompt.
    one = make_batch([([1, 2, 3], [4])], prompt_len=4, response_len=4)
    g1 = jax.grad(lambda p: sun_loss(cfg, p, dec, one)[0])(pre)
    last = g1[f"layers_{cfg.n_layers - 1}"]
    assert float(jnp.abs(last["mlp"]["up_proj"]["kernel"]).sum()) > 0
    assert float(jnp.abs(last["attn"]["k_proj"]["kernel"]).sum()) > 0


def test_first_and_later_token_metrics():
    """first_* cover the prefill tree's token, rest_* the decode tree's; accuracy is argmax."""
    from sunjax.sun import sun_logits

    cfg = _cfg()
    pre = sunjax.init_params(cfg, jax.random.PRNGKey(1))
    dec = sunjax.init_params(cfg, jax.random.PRNGKey(2))
    rng = np.random.RandomState(3)
    pairs = [(rng.randint(0, 61, 6).tolist(), rng.randint(0, 61, n).tolist()) for n in (1, 3, 5)]
    batch = make_batch(pairs, prompt_len=8, response_len=6)
    nll, mask = sun_token_nll(cfg, pre, dec, batch)
    pred = np.asarray(jnp.argmax(sun_logits(cfg, pre, dec, batch), -1))
    first_hits = [pred[i, 0] == r[0] for i, (_, r) in enumerate(pairs)]
    rest_hits = [pred[i, j] == r[j] for i, (_, r) in enumerate(pairs) for j in range(1, len(r))]
    _, m = sun_loss(cfg, pre, dec, batch)
    np.testing.assert_allclose(m["first_nll"], float(nll[:, 0].mean()), rtol=1e-6)
    np.testing.assert_allclose(m["rest_nll"], float(nll[:, 1:].sum() / 6), rtol=1e-6)
    np.testing.assert_allclose(m["first_acc"], np.mean(first_hits), rtol=1e-6)
    np.testing.assert_allclose(m["rest_acc"], np.mean(rest_hits), rtol=1e-6)
    # a decode tree that is the prefill tree changes the later tokens' scores, not the first's
    _, same = sun_loss(cfg, pre, pre, batch)
    np.testing.assert_allclose(same["first_nll"], m["first_nll"], rtol=1e-6)
    assert abs(float(same["rest_nll"]) - float(m["rest_nll"])) > 1e-3
