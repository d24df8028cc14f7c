"""Full-size configs, shape-checked without allocating; every file in configs/models loads."""

import pathlib

import jax
import pytest

import sunjax
from sunjax.configs import load_model_config

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize(
    "name, published",
    [("llama-3.1-8b", 8_030_261_248), ("qwen3-8b", 8_190_735_360), ("llama-3.2-1b", 1_235_814_400)],
)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_full_size_parameter_count(name, published, scan_layers):
    cfg = load_model_config(CONFIGS / "models" / f"{name}.yaml", scan_layers=scan_layers)
    shapes = jax.eval_shape(lambda k: sunjax.init_params(cfg, k), jax.random.PRNGKey(0))
    assert sunjax.param_count(shapes) == published
    # the embedding and one layer's projections have the published shapes
    layer = shapes["layers"] if scan_layers else shapes["layers_0"]
    lead = (cfg.n_layers,) if scan_layers else ()
    assert shapes["embed"]["embedding"].shape == (cfg.vocab_size, cfg.d_model)
    assert layer["attn"]["k_proj"]["kernel"].shape == lead + (
        cfg.d_model,
        cfg.n_kv_heads * cfg.head_dim,
    )
    assert layer["mlp"]["down_proj"]["kernel"].shape == lead + (cfg.ffn_dim, cfg.d_model)


# what each file in configs/models must say (checked against the published model cards)
MODEL_FILES = {
    "llama-3.1-8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256),
    "llama-3.2-1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256),
    "qwen3-8b": dict(d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, qk_norm=True),
    "smollm2-135m": dict(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152),
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=49152),
}


def test_every_model_config_file_loads_with_its_shape():
    files = {f.stem: f for f in (CONFIGS / "models").glob("*.yaml")}
    assert set(files) == set(MODEL_FILES), "a config file was added or removed: list it here"
    for name, want in MODEL_FILES.items():
        cfg = load_model_config(files[name])
        assert {k: getattr(cfg, k) for k in want} == want, name
