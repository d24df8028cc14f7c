"""QSUN quantization: the quantized matmul, int4 trees in the model, AWQ folding, real SmolLM2."""

import dataclasses
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sunjax
from kernels_pallas.quant_matmul import QuantizedWeight, dequantize, quantize
from sunjax import quant
from sunjax.configs import load_model_config
from sunjax.export import fingerprint
from sunjax.linear import ScaledWeight, matmul

HI = jax.lax.Precision.HIGHEST


def _tiny(scan: bool = False, spread_norms: bool = True):
    """Tiny float32 Llama; norm scales log-normal so channels differ and AWQ has work to do."""
    cfg = load_model_config(
        "configs/models/tiny.yaml", dtype="float32", param_dtype="float32", scan_layers=False
    )
    params = sunjax.init_params(cfg, jax.random.key(0))
    if spread_norms:
        keys = iter(jax.random.split(jax.random.key(1), 2 * cfg.n_layers))
        for i in range(cfg.n_layers):
            for n in ("input_norm", "post_attn_norm"):
                scale = jnp.exp(jax.random.normal(next(keys), (cfg.d_model,)))
                params[f"layers_{i}"][n]["scale"] = scale
    if scan:
        params = sunjax.stack_layers(dataclasses.replace(cfg, scan_layers=True), params)
        cfg = dataclasses.replace(cfg, scan_layers=True)
    return cfg, params


def _tokens(cfg, shape, seed=2):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 0)])
def test_matmul_quantized_equals_dequantized(bits, group_size):
    kx, kw, ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, 96), jnp.float32)
    qw = quantize(jax.random.normal(kw, (96, 40)), bits=bits, group_size=group_size or 128)
    ref = jnp.einsum("...k,kn->...n", x, dequantize(qw), precision=HI)
    np.testing.assert_allclose(matmul(x, qw), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(matmul)(x, qw), ref, rtol=1e-5, atol=1e-5)
    c = jnp.exp(jax.random.normal(ks, (96,)))
    ref_scaled = jnp.einsum("...k,kn->...n", x * c, dequantize(qw), precision=HI)
    got = jax.jit(matmul)(x, ScaledWeight(qw, c))
    np.testing.assert_allclose(got, ref_scaled, rtol=1e-5, atol=1e-5)
    assert matmul(x.astype(jnp.bfloat16), qw).dtype == jnp.bfloat16


def test_int4_tree_layout_and_size():
    cfg, params = _tiny()
    q = quant.quantize_tree(cfg, params, bits=4, group_size=32)
    for i in range(cfg.n_layers):
        for mod, name in quant.LINEARS:
            k = q[f"layers_{i}"][mod][name]["kernel"]
            assert isinstance(k, QuantizedWeight) and k.bits == 4 and k.group_size == 32
            assert k.shape == params[f"layers_{i}"][mod][name]["kernel"].shape
        for n in ("input_norm", "post_attn_norm"):
            assert q[f"layers_{i}"][n]["scale"] is params[f"layers_{i}"][n]["scale"]
    assert q["embed"] is params["embed"] and q["final_norm"] is params["final_norm"]
    rep = quant.bytes_report(q)
    # int4 payload 0.5 B + float32 scale and zero per 32 weights (8 / 32 B)
    assert rep["linear_bytes_per_param"] == pytest.approx(0.75)
    assert rep["params"] == sunjax.param_count(params)
    assert quant.bytes_report(params)["bytes_per_param"] == 4.0
    assert quant.tree_bytes(q) == rep["bytes"] < quant.tree_bytes(params)


def test_forward_and_decode_with_int4_tree_close_to_fp32():
    cfg, params = _tiny(spread_norms=False)
    q = quant.quantize_tree(cfg, params, bits=4, group_size=32)
    tokens = _tokens(cfg, (2, 12))
    ref = sunjax.forward(cfg, params, tokens)
    got = sunjax.forward(cfg, q, tokens)
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    # Gaussian weights at int4 g32: ~0.1 relative error per matmul (SQNR ~20 dB), 4 layers deep
    assert rel < 0.3, rel
    # the decode path reads the same quantized tree: step-by-step == full forward
    cache = cfg.init_cache(2, 12)
    steps = []
    for t in range(12):
        logits, cache = sunjax.decode_step(cfg, q, tokens[:, t], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.stack(steps, 1), got, rtol=1e-4, atol=1e-4)
    # int8 is much closer still
    q8 = quant.quantize_tree(cfg, params, bits=8)
    rel8 = float(jnp.linalg.norm(sunjax.forward(cfg, q8, tokens) - ref) / jnp.linalg.norm(ref))
    assert rel8 < rel / 4, (rel8, rel)


@pytest.mark.parametrize("scan", [False, True])
def test_awq_folding_is_exact_before_rounding(scan):
    cfg, params = _tiny(scan=scan)
    tokens = _tokens(cfg, (2, 64))
    scaled, alphas = quant.awq_scale(cfg, params, tokens, bits=4, group_size=32, grid=10)
    assert len(alphas) == cfg.n_layers
    assert any(a > 0 for layer in alphas for a in layer.values()), alphas  # scales are not 1
    o = scaled["layers" if scan else "layers_0"]["attn"]["o_proj"]["kernel"]
    assert isinstance(o, ScaledWeight)
    held = _tokens(cfg, (2, 16), seed=3)
    np.testing.assert_allclose(
        sunjax.forward(cfg, scaled, held), sunjax.forward(cfg, params, held), rtol=1e-5, atol=1e-5
    )


def test_awq_int4_beats_rtn_on_tiny_and_scan_matches_unrolled():
    cfg, params = _tiny()
    calib, held = _tokens(cfg, (2, 64)), _tokens(cfg, (2, 32), seed=3)
    ref = sunjax.forward(cfg, params, held)
    err = {}
    for method in ("rtn", "awq"):
        q = quant.quantize_tree(
            cfg, params, group_size=32, method=method, calib_tokens=calib, grid=10
        )
        err[method] = float(jnp.linalg.norm(sunjax.forward(cfg, q, held) - ref))
    assert err["awq"] < err["rtn"], err
    cfg_s, params_s = _tiny(scan=True)
    q_s = quant.quantize_tree(
        cfg_s, params_s, group_size=32, method="awq", calib_tokens=calib, grid=10
    )
    chex.assert_trees_all_close(
        sunjax.unstack_layers(cfg_s, q_s), q, rtol=1e-6, atol=1e-6
    )  # same scales, same codes


def _layer_errors(x, w, v, group_size):
    """(whole-layer ``||x (w - Q(v))||^2``, sum over groups of ``||x_g (w_g - Q(v)_g)||^2``)."""
    d = w - dequantize(quantize(v, group_size=group_size))
    k, n = w.shape
    per_group = jnp.einsum(
        "mgk,gkn->mgn",
        x.reshape(-1, k // group_size, group_size),
        d.reshape(k // group_size, group_size, n),
        precision=HI,
    )
    return float(jnp.sum(jnp.square(jnp.dot(x, d, precision=HI)))), float(
        jnp.sum(jnp.square(per_group))
    )


@pytest.mark.parametrize("outliers", [False, True])
def test_awq_clip_search_never_raises_layer_error(outliers):
    kx, kw, ks = jax.random.split(jax.random.key(4), 3)
    K, N, gs = 128, 48, 32
    x = jax.random.normal(kx, (256, K)) * jnp.exp(jax.random.normal(ks, (K,)))
    w = jax.random.normal(kw, (K, N))
    if outliers:  # 2 huge weights per group of 32 rows, on input channels that are nearly off
        x, w = x.at[:, ::16].multiply(0.01), w.at[::16].multiply(20.0)
    ratios = jnp.asarray(quant.CLIP_RATIOS)
    clipped, r = quant.awq._clip_search(ratios, x, w, bits=4, group_size=gs)
    assert r.shape == (K // gs, N) and float(jnp.min(r)) >= 0.5 and float(jnp.max(r)) == 1.0
    # the clipped kernel's own round-to-nearest grid is the searched one: scale = r * range / 15
    wg = w.reshape(K // gs, gs, N)
    span = jnp.maximum(wg.max(1), 0.0) - jnp.minimum(wg.min(1), 0.0)
    np.testing.assert_allclose(quantize(clipped, group_size=gs).scales, r * span / 15, rtol=1e-5)
    before, after = _layer_errors(x, w, w, gs), _layer_errors(x, w, clipped, gs)
    assert after[0] <= before[0] and after[1] <= before[1], (before, after)
    # clipping pays even on Gaussian weights; with outliers on quiet inputs it pays a lot
    assert after[0] < (0.5 if outliers else 0.9) * before[0], (before, after)
    assert float(jnp.mean(r)) < (0.7 if outliers else 0.97), float(jnp.mean(r))


def test_awq_clip_leaves_q_and_k_alone():
    cfg, params = _tiny()
    calib = _tokens(cfg, (2, 64))
    kw = dict(group_size=32, method="awq", calib_tokens=calib, grid=4)
    plain = quant.quantize_tree(cfg, params, clip=False, **kw)
    clipped = quant.quantize_tree(cfg, params, **kw)  # clip=True is the default
    for mod, name in quant.LINEARS:
        a, b = (t["layers_0"][mod][name]["kernel"] for t in (plain, clipped))
        a, b = (k.weight if isinstance(k, ScaledWeight) else k for k in (a, b))
        same = bool(jnp.array_equal(a.data, b.data) and jnp.array_equal(a.scales, b.scales))
        assert same == (name in ("q_proj", "k_proj")), name


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_mixed_precision_int8_linears(method):
    """``int8=("down_proj", "v_proj")``: those kernels int8 in every layer, the rest int4; the
    model is closer to float32 than the all-int4 tree, and AWQ searches each at its bits."""
    cfg, params = _tiny()
    calib, held = _tokens(cfg, (2, 64)), _tokens(cfg, (2, 32), seed=3)
    kw = dict(group_size=32, method=method, calib_tokens=calib, grid=6)
    int4 = quant.quantize_tree(cfg, params, **kw)
    mixed = quant.quantize_tree(cfg, params, int8=("down_proj", "v_proj"), **kw)
    for i in range(cfg.n_layers):
        for mod, name in quant.LINEARS:
            k = mixed[f"layers_{i}"][mod][name]["kernel"]
            k = k.weight if isinstance(k, ScaledWeight) else k
            assert k.bits == (8 if name in ("down_proj", "v_proj") else 4), (i, name)
    ref = sunjax.forward(cfg, params, held)
    err = lambda q: float(jnp.linalg.norm(sunjax.forward(cfg, q, held) - ref))
    assert err(mixed) < err(int4), (err(mixed), err(int4))
    assert (
        quant.bytes_report(int4)["bytes"]
        < quant.bytes_report(mixed)["bytes"]
        < quant.bytes_report(quant.quantize_tree(cfg, params, bits=8))["bytes"]
    )
    cfg_s, params_s = _tiny(scan=True)  # the scanned layout stacks int8 kernels the same way
    q_s = quant.quantize_tree(cfg_s, params_s, int8=("down_proj", "v_proj"), **kw)
    chex.assert_trees_all_close(sunjax.unstack_layers(cfg_s, q_s), mixed, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise_value_error():
    cfg, params = _tiny(spread_norms=False)
    with pytest.raises(ValueError, match="'gptq'"):
        quant.quantize_tree(cfg, params, method="gptq")
    with pytest.raises(ValueError, match="calib_tokens"):
        quant.quantize_tree(cfg, params, method="awq")
    with pytest.raises(ValueError, match="clip must be True or False"):
        quant.quantize_tree(cfg, params, method="awq", calib_tokens=np.arange(8), clip="yes")
    with pytest.raises(ValueError, match="clip must be True or False"):
        quant.awq_scale(cfg, params, np.arange(8), clip=None)
    with pytest.raises(ValueError, match="3"):
        quant.quantize_tree(cfg, params, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_tree(cfg, params, group_size=7)
    with pytest.raises(ValueError, match="int8 must list linear names.*'down'"):
        quant.quantize_tree(cfg, params, int8=("down",))
    with pytest.raises(ValueError, match="int8 must list linear names.*'down_proj'"):
        quant.quantize_tree(cfg, params, int8="down_proj")
    q = quant.quantize_tree(cfg, params, group_size=32)
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_tree(cfg, q, group_size=32)
    with pytest.raises(ValueError, match="window"):
        quant.perplexity(cfg, params, np.arange(10), 64)
    with pytest.raises(ValueError, match="nope"):
        quant.read_text("nope")


@pytest.mark.slow
def test_smollm2_awq_int4_perplexity(smollm2):
    """Real SmolLM2-135M on held-out prose: fp32 < AWQ int4 < RTN int4, AWQ close to fp32.

    group_size 64: d_model 576 = 4.5 x 128 is not a multiple of 128 (64 divides 576 and 1536).
    The GGUF weights are already Q4_1 with 32-wide blocks, so group 32 would partly re-find
    that grid; 64 does not line up with it and is the honest test of AWQ vs RTN.
    """
    cfg, params, tok = smollm2
    t0 = time.perf_counter()
    held = np.asarray(tok.encode(quant.read_text("heldout"), add_special_tokens=False))
    calib = np.asarray(tok.encode(quant.read_text("calib"), add_special_tokens=False))
    held, calib = held[:1536], calib[:256].reshape(1, 256)
    gs, window = 64, 512
    rtn = quant.quantize_tree(cfg, params, group_size=gs)
    awq, secs = {}, {}
    for clip in (False, True):
        t = time.perf_counter()
        awq[clip] = jax.block_until_ready(
            quant.quantize_tree(
                cfg, params, group_size=gs, method="awq", calib_tokens=calib, grid=10, clip=clip
            )
        )
        secs[clip] = time.perf_counter() - t
    ppl = {
        "fp32": quant.perplexity(cfg, params, held, window),
        "rtn": quant.perplexity(cfg, rtn, held, window),
        "awq": quant.perplexity(cfg, awq[False], held, window),
        "awq_clip": quant.perplexity(cfg, awq[True], held, window),
    }
    rep = quant.bytes_report(awq[True])
    print(
        f"\nSmolLM2-135M held-out perplexity ({held.size} tokens, window {window}, int4 g{gs}): "
        f"fp32 {ppl['fp32']:.2f}  RTN {ppl['rtn']:.2f}  AWQ {ppl['awq']:.2f}  "
        f"AWQ+clip {ppl['awq_clip']:.2f}; linear kernels "
        f"{rep['linear_bytes_per_param']:.3f} B/param; AWQ quantization {secs[False]:.0f} s, "
        f"AWQ+clip {secs[True]:.0f} s; {time.perf_counter() - t0:.0f} s"
    )
    assert ppl["fp32"] < ppl["awq"] < ppl["rtn"], ppl
    assert ppl["awq"] < 1.2 * ppl["fp32"], ppl
    # AWQ+clip vs AWQ is not asserted: on these 256 calibration tokens clipping measured
    # slightly worse (34.62 vs 34.53); on 512 it measured better (34.16 vs 34.33).
    assert ppl["awq_clip"] < ppl["rtn"], ppl
    awq = awq[False]
    assert fingerprint(awq) != fingerprint(params) != fingerprint(rtn) != fingerprint(awq)
