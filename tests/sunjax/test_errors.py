"""Bad input a user can cause raises ValueError naming the offending value."""

import json
import os

import jax
import numpy as np
import pytest

import sunjax
from sunjax.generate import generate
from tests.conftest import make_hf_model


@pytest.fixture(scope="module")
def tiny():
    cfg = sunjax.ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        ffn_dim=64,
        max_position_embeddings=32,
    )
    return cfg, sunjax.init_params(cfg, jax.random.PRNGKey(0))


def test_prompt_longer_than_cache(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="max_len=8"):
        sunjax.prefill(cfg, params, np.ones((1, 10), int), np.array([10]), cfg.init_cache(1, 8))


def test_prompt_beyond_max_positions(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        sunjax.forward(cfg, params, np.ones((1, 40), int))
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        generate(cfg, params, [[1] * 30], max_new_tokens=5)


def test_token_outside_vocabulary(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="token id 50 is outside"):
        sunjax.forward(cfg, params, np.array([[1, 50]]))
    with pytest.raises(ValueError, match="token id -1"):
        generate(cfg, params, [[1, -1]], max_new_tokens=2)


def test_bad_generation_arguments(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(cfg, params, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        generate(cfg, params, [[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(cfg, params, [[1]], max_new_tokens=1, top_p=1.5)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(cfg, params, [[1]], max_new_tokens=1, temperature=-1.0)


def test_unknown_model_type_and_options(tmp_path):
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        sunjax.ModelConfig.from_hf({"model_type": "gpt2"})
    path, _ = make_hf_model(tmp_path, "llama")
    hf = json.load(open(os.path.join(path, "config.json")))
    for key, value, pattern in [
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 2.0}, "'yarn'"),
        ("mlp_bias", True, "mlp_bias"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            sunjax.ModelConfig.from_hf({**hf, key: value})


def test_missing_and_corrupt_weight_files(tmp_path):
    path, _ = make_hf_model(tmp_path, "llama")
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        sunjax.load_hf(path)
    os.remove(weights)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        sunjax.load_hf(path)
    with pytest.raises(ValueError, match="does not exist"):
        sunjax.load_hf(tmp_path / "nowhere")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="bad.gguf"):
        sunjax.load_gguf(bad)


def test_checkpoint_missing_a_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = make_hf_model(tmp_path, "llama")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        sunjax.load_hf(path)
