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
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))


def test_every_model_config_file_loads():
    files = sorted((CONFIGS / "models").glob("*.yaml"))
    assert files
    for f in files:
        assert load_model_config(f).n_layers >= 1
