"""YAML overlays on the frozen config dataclasses (files under ``configs/``)."""

from __future__ import annotations

import dataclasses
import os
from typing import TypeVar

import yaml

from sunjax.config import ModelConfig

T = TypeVar("T")


def read_yaml(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    return data


def overlay(cls: type[T], data: dict, **overrides) -> T:
    """``cls(**data, **overrides)`` with unknown keys reported by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}")
    return cls(**{**data, **overrides})


def load_model_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a YAML file such as ``configs/models/llama-3.1-8b.yaml``."""
    return overlay(ModelConfig, read_yaml(path), **overrides)
