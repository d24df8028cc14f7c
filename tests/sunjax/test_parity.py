"""Logits parity with Hugging Face transformers (the oracle) on tiny random models."""

import numpy as np
import pytest
import torch

import sunjax
from tests.conftest import make_hf_model

VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama-bias": ("llama", {"attention_bias": True}),
    "mistral": ("mistral", {"head_dim": 24}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant, scan_layers):
    model_type, overrides = VARIANTS[variant]
    path, hf = make_hf_model(tmp_path, model_type, **overrides)
    cfg, params = sunjax.load_hf(path, scan_layers=scan_layers)
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 40))
    ours = np.asarray(sunjax.forward(cfg, params, tokens))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_config_from_hf_reads_each_option(tmp_path):
    path, _ = make_hf_model(tmp_path, "qwen2", num_key_value_heads=1)
    cfg = sunjax.ModelConfig.from_hf(path)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm, cfg.n_kv_heads) == (True, False, False, 1)
    path, _ = make_hf_model(tmp_path, "qwen3", head_dim=40)
    cfg = sunjax.ModelConfig.from_hf(path)
    assert (cfg.qk_norm, cfg.head_dim, cfg.qkv_bias) == (True, 40, False)
