"""The QSUN spec: how a shared decode tree is quantized, as a manifest records it.

A spec is ``{"bits", "group_size", "method", "scale_dtype", "int8"}`` (``QUANT_KEYS``; ``int8``
lists the linears kept at int8 in an otherwise int4 tree). ``normalize_quant`` checks one and
writes it canonically, ``decode_quant_of`` reads it off a tree's leaves, and
``abstract_decode`` gives the exact abstract tree a spec describes (``jax.eval_shape`` of the
real quantizer, so it can never drift from what ``quantize_tree`` builds): the Orbax restore
target of a quantized decode tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.quant_matmul import QuantizedWeight
from sunjax.config import ModelConfig
from sunjax.linear import ScaledWeight
from sunjax.model import init_params
from sunjax.quant.layout import LINEAR_NAMES, check_int8
from sunjax.quant.rtn import quantize_tree

QUANT_KEYS = ("bits", "group_size", "method", "scale_dtype", "int8")
# int4 AWQ, but v_proj and down_proj int8 (as llama.cpp's Q4_K_M keeps attn_v / ffn_down at
# higher precision): on SmolLM2's tool task (400 test examples, one SUN module) the decode module
# at all-int4 cost 3.5 points, with these two int8 (28% of the linear weights, 0.73 vs 0.63
# B/param) 1.5; group 128 cost 13 (reports/qsun/README.md).
QUANT_DEFAULTS = {
    "bits": 4,
    "group_size": 64,
    "method": "awq",
    "scale_dtype": "float32",
    "int8": ["down_proj", "v_proj"],
}


def _is_kernel(x) -> bool:
    return isinstance(x, (QuantizedWeight, ScaledWeight))


def _linear_name(path) -> str | None:
    """The linear (``"down_proj"``, ...) a kernel's tree path lies under, if any."""
    keys = [str(getattr(k, "key", "")) for k in path]
    return next((k for k in reversed(keys) if k in LINEAR_NAMES), None)


def decode_quant_of(tree) -> dict | None:
    """The spec read off a decode tree's leaves, or ``None`` for a plain tree. ``group_size``
    is ``None`` for int8 (per output column); ``method`` is ``"awq"`` when ``ScaledWeight``
    kernels are present, else ``"rtn"``; ``int8`` names the linears that are int8 in every
    layer of an otherwise int4 tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_kernel)[0]
    kernels = [(_linear_name(path), x) for path, x in flat if _is_kernel(x)]
    if not kernels:
        return None
    qws = [(n, k.weight if isinstance(k, ScaledWeight) else k) for n, k in kernels]
    if not all(isinstance(q, QuantizedWeight) for _, q in qws):
        raise ValueError("decode tree mixes plain and quantized kernels: cannot describe it")
    bits = {q.bits for _, q in qws}
    scale_dtypes = {str(q.scales.dtype) for _, q in qws}
    groups = {q.group_size for _, q in qws if q.bits == 4} or {None}
    bits_of = {n: {q.bits for m, q in qws if m == n} for n, _ in qws}
    int8 = sorted(n for n, b in bits_of.items() if b == {8}) if bits == {4, 8} else []
    if (
        len(scale_dtypes) != 1
        or len(groups) != 1
        or any(len(b) != 1 for b in bits_of.values())
        or (bits == {4, 8} and None in bits_of)
    ):
        raise ValueError(
            f"decode tree is not uniformly quantized (bits per linear {bits_of}, group sizes "
            f"{sorted(groups, key=str)}, scale dtypes {sorted(scale_dtypes)})"
        )
    return {
        "bits": min(bits),
        "group_size": groups.pop(),
        "method": "awq" if any(isinstance(k, ScaledWeight) for _, k in kernels) else "rtn",
        "scale_dtype": scale_dtypes.pop(),
        "int8": int8,
    }


def normalize_quant(quant: dict | None) -> dict | None:
    """``quant`` with checked keys and canonical values (ValueError naming a bad one)."""
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ValueError(f"decode_quant must be a mapping or null, got {quant!r}")
    quant = {"int8": [], **quant}  # manifests written before mixed precision have no "int8"
    if set(quant) != set(QUANT_KEYS):
        raise ValueError(f"decode_quant must have exactly the keys {QUANT_KEYS}, got {quant}")
    if quant["bits"] not in (4, 8):
        raise ValueError(f"decode_quant bits must be 4 or 8, got {quant['bits']!r}")
    quant["bits"] = int(quant["bits"])
    gs = quant["group_size"]
    if quant["bits"] == 4 and (not isinstance(gs, int) or isinstance(gs, bool) or gs < 2):
        raise ValueError(f"decode_quant group_size must be an int >= 2 for int4, got {gs!r}")
    quant["group_size"] = None if quant["bits"] == 8 else gs
    if quant["scale_dtype"] not in ("float32", "bfloat16", jnp.float32, jnp.bfloat16):
        raise ValueError(
            f"decode_quant scale_dtype must be float32 or bfloat16, got {quant['scale_dtype']!r}"
        )
    quant["scale_dtype"] = str(jnp.dtype(quant["scale_dtype"]))
    if quant["method"] not in ("rtn", "awq"):
        raise ValueError(f"decode_quant method must be 'rtn' or 'awq', got {quant['method']!r}")
    int8 = check_int8(quant["int8"])
    if int8 == tuple(sorted(LINEAR_NAMES)):  # every linear int8: that is the int8 tree
        quant["bits"], quant["group_size"] = 8, None
    quant["int8"] = [] if quant["bits"] == 8 else list(int8)
    return quant


def abstract_decode(cfg: ModelConfig, quant: dict | None):
    """The abstract (``ShapeDtypeStruct``) decode tree of ``cfg`` quantized as ``quant``:
    ``jax.eval_shape`` of the real ``quantize_tree`` (AWQ traced on a 2-token calibration
    batch with one grid point and no clipping: the searches change values, not the layout)."""
    quant = normalize_quant(quant)

    def build():
        params = init_params(cfg, jax.random.PRNGKey(0))
        if quant is None:
            return params
        return quantize_tree(
            cfg,
            params,
            bits=quant["bits"],
            group_size=quant["group_size"] or 128,
            method=quant["method"],
            calib_tokens=np.zeros((1, 2), np.int32),
            scale_dtype=jnp.dtype(quant["scale_dtype"]),
            grid=1,
            clip=False,
            int8=tuple(quant["int8"]),
        )

    return jax.eval_shape(build)


def check_restorable(cfg: ModelConfig, tree, quant: dict | None) -> None:
    """Raise unless ``abstract_decode(cfg, quant)`` has ``tree``'s structure, shapes, dtypes."""
    want = abstract_decode(cfg, quant)
    got = jax.eval_shape(lambda: tree)
    if jax.tree.structure(want) != jax.tree.structure(got) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True)
    ):
        raise ValueError(
            f"the decode tree does not have the layout of a decode tree quantized as "
            f"decode_quant={quant} for this config, so it could not be restored exactly"
        )
