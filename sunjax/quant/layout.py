"""Which kernels QSUN quantizes, and the helpers every quantizer shares.

Every linear kernel inside the layers (``attn/{q,k,v,o}_proj``, ``mlp/{gate,up,down}_proj``)
is quantized; embeddings, norms and ``lm_head`` stay as they are. Mixed precision: the
linears named in ``int8`` (e.g. ``("down_proj",)``) are int8 in every layer and the rest int4.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from sunjax.config import ModelConfig
from sunjax.params import stack_layers, unstack_layers

LINEARS = (
    ("attn", "q_proj"),
    ("attn", "k_proj"),
    ("attn", "v_proj"),
    ("attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)
LINEAR_NAMES = tuple(name for _, name in LINEARS)
METHODS = ("rtn", "awq")


def check_int8(int8) -> tuple[str, ...]:
    """The ``int8`` linear names, checked (ValueError naming a bad value), sorted, unique."""
    if isinstance(int8, str) or not all(isinstance(n, str) and n in LINEAR_NAMES for n in int8):
        raise ValueError(f"int8 must list linear names from {list(LINEAR_NAMES)}, got {int8!r}")
    return tuple(sorted(set(int8)))


def bits_of(bits: int, int8) -> Callable[[str], int]:
    """``name -> bits`` of a linear (``LINEAR_NAMES``) given the ``int8`` names."""
    int8 = check_int8(int8)
    return lambda name: 8 if name in int8 else bits


def check_clip(clip) -> None:
    if not isinstance(clip, (bool, np.bool_)):
        raise ValueError(f"clip must be True or False, got {clip!r}")


def copy_tree(tree):
    """Copy of the nested dicts (leaves shared)."""
    return {k: copy_tree(v) if isinstance(v, dict) else v for k, v in tree.items()}


def unrolled(cfg: ModelConfig, params):
    """``(restack, cfg, params)`` in the unrolled layout; ``restack`` puts a tree in the layout
    ``params`` came in."""
    if not cfg.scan_layers:
        return (lambda tree: tree), cfg, params
    return (
        functools.partial(stack_layers, cfg),
        dataclasses.replace(cfg, scan_layers=False),
        unstack_layers(cfg, params),
    )
