"""sunjax: SUN (Shared Use of Next-token Prediction) in JAX.

Many task-specific prefill modules share one frozen decode module, so decode steps of
different fine-tuned models batch together on the same workers.
"""

from sunjax.cache import KVCache
from sunjax.config import ModelConfig, RopeScaling
from sunjax.model import Transformer, decode_step, extend, forward, init_params, prefill
from sunjax.params import param_count, stack_layers, unstack_layers
from sunjax.sun import SunParams, fingerprint, merge, split, sun_loss
from sunjax.weights_gguf import load_gguf
from sunjax.weights_hf import load_hf

__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "decode_step",
    "extend",
    "forward",
    "init_params",
    "load_gguf",
    "load_hf",
    "param_count",
    "prefill",
    "stack_layers",
    "SunParams",
    "fingerprint",
    "merge",
    "split",
    "sun_loss",
    "unstack_layers",
]
