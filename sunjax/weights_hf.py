"""Hugging Face checkpoints: a local directory with config.json and safetensors (no torch)."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open

from sunjax.config import ModelConfig
from sunjax.params import from_hf_tensors


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of a model directory: single file or sharded with an index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"safetensors index {index!r} is unreadable: {e!r}") from e
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
    else:
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
        )
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r}")
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"safetensors shard {f!r} listed in the index does not exist")
    return files


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
    """All tensors of the files as float32 numpy arrays (bf16 is widened exactly)."""
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read safetensors file {file!r}: {e}") from e
    return tensors


def load_hf(path: str | os.PathLike, *, dtype: str = "float32", **cfg_overrides):
    """Load ``(cfg, params)`` from a local Hugging Face model directory.

    ``dtype`` sets both the parameter and compute dtype; ``cfg_overrides`` replace other
    ``ModelConfig`` fields (e.g. ``scan_layers=True``).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"model directory {path!r} does not exist")
    overrides = {"param_dtype": dtype, "dtype": dtype, **cfg_overrides}
    cfg = ModelConfig.from_hf(path, **overrides)
    params = from_hf_tensors(cfg, read_safetensors(safetensors_files(path)), source=path)
    return cfg, params
