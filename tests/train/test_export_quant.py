"""QSUN exports: a quantized decode tree (RTN int4 / int8, AWQ with ScaledWeight, either layer
layout) round-trips bitwise; prefill modules stay bound to the exact (quantized or not) tree."""

import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest

import sunjax
from kernels_pallas.quant_matmul import QuantizedWeight
from sunjax.export import export, fingerprint, latest, load_decode, load_export, load_prefill
from sunjax.linear import ScaledWeight
from sunjax.quant import quantize_tree
from tests.train.test_trainer import CFG  # the same tiny model

GROUP = 32


@pytest.fixture(scope="module")
def base():
    return sunjax.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def prefill(base):
    return {"a": jax.tree.map(lambda x: x + 1, base), "b": jax.tree.map(lambda x: x * 2, base)}


def _kernels(tree):
    is_k = lambda x: isinstance(x, (QuantizedWeight, ScaledWeight))
    return [x for x in jax.tree.leaves(tree, is_leaf=is_k) if is_k(x)]


def _round_trip(root, cfg, decode, prefill):
    vdir = export(root, cfg, decode, prefill, tokenizer_source="none")
    got_cfg, got, manifest = load_decode(root)
    assert got_cfg == cfg
    assert jax.tree.structure(got) == jax.tree.structure(decode)  # static fields included
    chex.assert_trees_all_equal(got, decode)
    assert manifest["decode_fingerprint"] == fingerprint(decode) == fingerprint(got)
    with open(os.path.join(vdir, "manifest.json")) as f:
        assert json.load(f)["decode_quant"] == manifest["decode_quant"]
    pickles = [f for d, _, fs in os.walk(vdir) for f in fs if f.endswith((".pkl", ".pickle"))]
    assert not pickles
    return got, manifest


def test_int4_rtn_round_trip_and_pairing(tmp_path, base, prefill):
    q = quantize_tree(CFG, base, bits=4, group_size=GROUP)
    got, manifest = _round_trip(tmp_path / "q", CFG, q, prefill)
    assert manifest["decode_quant"] == {
        "bits": 4,
        "group_size": GROUP,
        "method": "rtn",
        "scale_dtype": "float32",
        "int8": [],
    }
    assert len(_kernels(got)) == 7 * CFG.n_layers
    _, decode, pre, _ = load_export(tmp_path / "q")
    chex.assert_trees_all_equal(pre, prefill)  # prefill modules are plain trees
    # a prefill module exported against the quantized tree refuses the unquantized one
    with pytest.raises(ValueError, match="quantized as .*bits.*, the given one as None"):
        load_prefill(tmp_path / "q", "a", base)
    # and one exported against the unquantized tree refuses the quantized one
    export(tmp_path / "plain", CFG, base, prefill, tokenizer_source="none")
    assert load_decode(tmp_path / "plain")[2]["decode_quant"] is None
    with pytest.raises(ValueError, match="refusing to pair"):
        load_prefill(tmp_path / "plain", "a", q)
    # another quantization of the same base is another tree
    with pytest.raises(ValueError, match="refusing to pair"):
        load_prefill(tmp_path / "q", "a", quantize_tree(CFG, base, bits=4, group_size=16))


def test_awq_round_trip_scanned_and_int8(tmp_path, base, prefill):
    calib = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 16))
    awq = quantize_tree(CFG, base, group_size=GROUP, method="awq", calib_tokens=calib, grid=4)
    got, manifest = _round_trip(tmp_path / "awq", CFG, awq, prefill)
    assert manifest["decode_quant"]["method"] == "awq"
    assert sum(isinstance(k, ScaledWeight) for k in _kernels(got)) == CFG.n_layers
    # scanned layer layout, int8 (no zero points, group size = K)
    cfg = dataclasses.replace(CFG, scan_layers=True)
    q8 = quantize_tree(cfg, sunjax.params.stack_layers(CFG, base), bits=8)
    pre = {"a": sunjax.params.stack_layers(CFG, prefill["a"])}
    _, manifest = _round_trip(tmp_path / "q8", cfg, q8, pre)
    assert manifest["decode_quant"]["bits"] == 8 and manifest["decode_quant"]["group_size"] is None


def test_mixed_precision_round_trip(tmp_path, base, prefill):
    calib = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 16))
    kw = dict(group_size=GROUP, method="awq", calib_tokens=calib, grid=4)
    mixed = quantize_tree(CFG, base, int8=("v_proj", "down_proj"), **kw)
    got, manifest = _round_trip(tmp_path / "mixed", CFG, mixed, prefill)
    assert manifest["decode_quant"] == {
        "bits": 4,
        "group_size": GROUP,
        "method": "awq",
        "scale_dtype": "float32",
        "int8": ["down_proj", "v_proj"],
    }
    assert sorted(k.bits for k in _kernels(got) if isinstance(k, QuantizedWeight)) == (
        [4] * 4 * CFG.n_layers + [8] * 2 * CFG.n_layers
    )
    # the all-int4 tree of the same base is another module: its prefill modules do not pair
    with pytest.raises(ValueError, match="refusing to pair"):
        load_prefill(tmp_path / "mixed", "a", quantize_tree(CFG, base, **kw))


def test_explicit_decode_quant_is_checked(tmp_path, base, prefill):
    q = quantize_tree(CFG, base, bits=4, group_size=GROUP)
    # without "int8" (as manifests before mixed precision were written): all-int4
    spec = {"bits": 4, "group_size": GROUP, "method": "rtn", "scale_dtype": "float32"}
    export(tmp_path / "ok", CFG, q, prefill, tokenizer_source="none", decode_quant=spec)
    chex.assert_trees_all_equal(load_decode(tmp_path / "ok")[1], q)
    for wrong, match in [
        ({"group_size": 16}, "decode_quant="),
        ({"int8": ["down_proj"]}, "decode_quant=.*'int8': \\['down_proj'\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            export(
                tmp_path / "bad",
                CFG,
                q,
                prefill,
                tokenizer_source="none",
                decode_quant=spec | wrong,
            )
    with pytest.raises(ValueError, match="prefill trees must be plain"):
        export(tmp_path / "bad", CFG, q, {"a": q}, tokenizer_source="none")
    assert not os.path.exists(os.path.join(tmp_path, "bad", "LATEST"))
    assert latest(tmp_path / "ok").endswith("v1")


def _flip_bytes(tree_dir, n=64):
    """Flip ``n`` bytes in the middle of the largest data file under ``tree_dir``."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(tree_dir) for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.seek(os.path.getsize(big) // 2)
        data = bytearray(f.read(n))
        f.seek(os.path.getsize(big) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("which", ["prefill/a", "decode"])
def test_corrupted_tree_is_refused_naming_the_module(tmp_path, base, prefill, which):
    vdir = export(tmp_path / "x", CFG, base, prefill, tokenizer_source="none")
    load_export(tmp_path / "x")  # intact: loads
    _flip_bytes(os.path.join(vdir, which))
    name = "prefill module 'a'" if which == "prefill/a" else "the decode tree"
    with pytest.raises(ValueError, match=name):
        load_export(tmp_path / "x")
    if which == "prefill/a":  # the other module is intact and still loads on its own
        _, decode, _ = load_decode(tmp_path / "x")
        chex.assert_trees_all_equal(load_prefill(tmp_path / "x", "b", decode), prefill["b"])


def test_export_of_an_older_manifest_version_is_refused(tmp_path, base, prefill):
    vdir = export(tmp_path / "x", CFG, base, prefill, tokenizer_source="none")
    path = os.path.join(vdir, "manifest.json")
    manifest = json.load(open(path))
    manifest["manifest_version"] = 1
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match="manifest_version=1"):
        load_export(tmp_path / "x")
