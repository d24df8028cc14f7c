"""sunjax: SUN (Shared Use of Next-token Prediction) in JAX.

Many task-specific prefill modules share one frozen decode module, so decode steps of
different fine-tuned models batch together on the same workers.
"""

from sunjax.cache import KVCache
from sunjax.config import ModelConfig, RopeScaling
from sunjax.export import fingerprint
from sunjax.model import Transformer, init_params
from sunjax.params import param_count, stack_layers, unstack_layers
from sunjax.steps import (
    count_compiles,
    decode_and_sample,
    decode_step,
    extend,
    forward,
    prefill,
    prefill_and_sample,
)
from sunjax.sun import SunParams, sun_loss
from sunjax.weights_gguf import load_gguf
from sunjax.weights_hf import load_hf

__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "SunParams",
    "Transformer",
    "count_compiles",
    "decode_and_sample",
    "decode_step",
    "extend",
    "fingerprint",
    "forward",
    "init_params",
    "load_gguf",
    "load_hf",
    "param_count",
    "prefill",
    "prefill_and_sample",
    "stack_layers",
    "sun_loss",
    "unstack_layers",
]
