"""Orbax exports: one shared decode tree, one prefill module per task, and a manifest.

Layout of an export root::

    <root>/LATEST                 name of the newest complete version (atomically replaced)
    <root>/v<N>/decode/           the shared decode tree (Orbax, tensorstore; no pickle)
    <root>/v<N>/prefill/<task>/   one prefill tree per task
    <root>/v<N>/manifest.json     config, tokenizer source, dtypes, tasks, training metadata,
                                  the sha256 fingerprint of the decode tree and how it is
                                  quantized (``decode_quant``, null for a plain tree)

A version becomes visible only when ``LATEST`` names it, after everything is written, so an
export killed half-way leaves the previous one readable and is never listed as complete.
Prefill modules are bound to the decode tree they were trained against: loading one against
a decode tree with another fingerprint raises ``ValueError``.

QSUN: the decode tree may be quantized (``sunjax.quant.quantize_tree``: ``QuantizedWeight``
kernels, and for AWQ ``o_proj`` kernels wrapped in ``ScaledWeight``). The manifest's
``decode_quant`` (``{"bits", "group_size", "method", "scale_dtype", "int8"}``; ``int8`` lists
the linears kept at int8 in a mixed int4 tree) is enough to rebuild the exact abstract tree
(``abstract_decode``), so Orbax restores it bitwise. Prefill modules are always plain trees.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from kernels_pallas.quant_matmul import QuantizedWeight
from sunjax.config import ModelConfig
from sunjax.linear import ScaledWeight
from sunjax.model import init_params
from sunjax.quant import LINEAR_NAMES, check_int8, quantize_tree
from sunjax.sun import fingerprint

MANIFEST_VERSION = 1
QUANT_KEYS = ("bits", "group_size", "method", "scale_dtype", "int8")


def _versions(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"v(\d+)", d)))


def _is_kernel(x) -> bool:
    return isinstance(x, (QuantizedWeight, ScaledWeight))


def decode_quant_of(tree) -> dict | None:
    """``{"bits", "group_size", "method", "scale_dtype", "int8"}`` read off a decode tree's
    leaves, or ``None`` for a plain tree. ``group_size`` is ``None`` for int8 (per output
    column); ``method`` is ``"awq"`` when ``ScaledWeight`` kernels are present, else ``"rtn"``;
    ``int8`` names the linears that are int8 in every layer of an otherwise int4 tree."""
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


def _linear_name(path) -> str | None:
    """The linear (``"down_proj"``, ...) a kernel's tree path lies under, if any."""
    keys = [str(getattr(k, "key", "")) for k in path]
    return next((k for k in reversed(keys) if k in LINEAR_NAMES), None)


def normalize_quant(quant: dict | None) -> dict | None:
    """``quant`` with checked keys and canonical values (ValueError naming a bad one)."""
    if quant is None:
        return None
    quant = {"int8": [], **quant}  # manifests written before mixed precision have no "int8"
    if set(quant) != set(QUANT_KEYS):
        raise ValueError(f"decode_quant must have exactly the keys {QUANT_KEYS}, got {quant}")
    quant = dict(quant)
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
    """The abstract (``ShapeDtypeStruct``) decode tree of ``cfg`` quantized as ``quant``
    (a manifest's ``decode_quant``): the Orbax restore target."""
    quant = normalize_quant(quant)

    def build():
        params = init_params(cfg, jax.random.PRNGKey(0))
        if quant is None:
            return params
        if quant["method"] == "awq":  # same structure as awq_scale's: o_proj in ScaledWeight
            params = dict(params)
            for name in [k for k in params if re.fullmatch(r"layers(_\d+)?", k)]:
                layer = {**params[name], "attn": dict(params[name]["attn"])}
                o = dict(layer["attn"]["o_proj"])
                w = o["kernel"]
                o["kernel"] = ScaledWeight(w, jnp.ones(w.shape[:-1], jnp.float32))
                layer["attn"]["o_proj"] = o
                params[name] = layer
        return quantize_tree(
            cfg,
            params,
            bits=quant["bits"],
            group_size=quant["group_size"] or 128,
            method="rtn",
            scale_dtype=jnp.dtype(quant["scale_dtype"]),
            int8=tuple(quant["int8"]),
        )

    return jax.eval_shape(build)


def _check_restorable(cfg: ModelConfig, tree, quant: dict | None) -> None:
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


def export(
    root: str,
    cfg: ModelConfig,
    decode_params,
    prefill: dict[str, dict],
    *,
    tokenizer_source: str,
    tokenizer=None,
    metadata: dict | None = None,
    decode_quant: dict | None = None,
) -> str:
    """Write a new complete version under ``root``; returns its directory. A ``tokenizer``
    (transformers) is saved inside the version, making the export self-contained.

    ``decode_quant`` (``QUANT_KEYS``) says how the decode tree is quantized; ``None`` infers it
    from the tree's leaves (``decode_quant_of``). Either way it is checked against the tree
    before anything is written."""
    if not prefill:
        raise ValueError("an export needs at least one task prefill module")
    for task in prefill:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", task):
            raise ValueError(f"task name {task!r} must match [A-Za-z0-9_.-]+")
    inferred = decode_quant_of(decode_params)
    quant = inferred if decode_quant is None else normalize_quant(decode_quant)
    if quant != inferred:
        raise ValueError(f"decode_quant={quant} but the decode tree is quantized as {inferred}")
    if quant is not None:
        _check_restorable(cfg, decode_params, quant)
    for task, tree in prefill.items():
        if decode_quant_of(tree) is not None:
            raise ValueError(f"prefill module {task!r} is quantized; prefill trees must be plain")
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    version = f"v{(_versions(root) or [0])[-1] + 1}"
    vdir = os.path.join(root, version)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(vdir, "decode"), decode_params)
    for task, tree in prefill.items():
        ckpt.save(os.path.join(vdir, "prefill", task), tree)
    ckpt.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(vdir, "tokenizer"))
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "model_config": cfg.to_dict(),
        "tokenizer_source": tokenizer_source,
        "tokenizer": "tokenizer" if tokenizer is not None else None,
        "param_dtype": cfg.param_dtype,
        "decode_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(decode_params)}),
        "tasks": sorted(prefill),
        "decode_fingerprint": fingerprint(decode_params),
        "decode_quant": quant,
        "metadata": metadata or {},
    }
    with open(os.path.join(vdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    tmp = os.path.join(root, "LATEST.tmp")
    with open(tmp, "w") as f:
        f.write(version)
    os.replace(tmp, os.path.join(root, "LATEST"))
    return vdir


def latest(root: str) -> str:
    """Directory of the newest complete version under ``root``."""
    pointer = os.path.join(root, "LATEST")
    if not os.path.isfile(pointer):
        raise ValueError(f"{root!r} holds no complete export (no LATEST file)")
    with open(pointer) as f:
        return os.path.join(os.path.abspath(root), f.read().strip())


def read_manifest(root: str) -> dict:
    """The newest manifest; its ``tokenizer`` entry resolved to an absolute path."""
    with open(os.path.join(latest(root), "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("tokenizer"):
        manifest["tokenizer"] = os.path.join(latest(root), manifest["tokenizer"])
    return manifest


def load_decode(root: str):
    """``(cfg, decode_tree, manifest)`` of the newest export."""
    manifest = read_manifest(root)
    cfg = ModelConfig.from_dict(manifest["model_config"])
    abstract = abstract_decode(cfg, manifest.get("decode_quant"))
    tree = ocp.StandardCheckpointer().restore(os.path.join(latest(root), "decode"), abstract)
    if fingerprint(tree) != manifest["decode_fingerprint"]:
        raise ValueError(f"decode tree in {latest(root)!r} does not match its manifest")
    return cfg, tree, manifest


def load_prefill(root: str, task: str, decode_params) -> dict:
    """Task ``task``'s prefill module, refused unless ``decode_params`` is the exact decode tree
    it was trained against."""
    manifest = read_manifest(root)
    if task not in manifest["tasks"]:
        raise ValueError(f"task {task!r} is not in the export; it has {manifest['tasks']}")
    got = fingerprint(decode_params)
    if got != manifest["decode_fingerprint"]:
        want_q, got_q = manifest.get("decode_quant"), decode_quant_of(decode_params)
        why = (
            f" (the export's decode tree is quantized as {want_q}, the given one as {got_q})"
            if want_q != got_q
            else ""
        )
        raise ValueError(
            f"prefill module {task!r} was trained against decode tree "
            f"{manifest['decode_fingerprint'][:12]}, not {got[:12]}{why}: refusing to pair them"
        )
    cfg = ModelConfig.from_dict(manifest["model_config"])
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    return ocp.StandardCheckpointer().restore(os.path.join(latest(root), "prefill", task), abstract)


def load_export(root: str):
    """``(cfg, decode_tree, {task: prefill_tree}, manifest)``."""
    cfg, decode, manifest = load_decode(root)
    return cfg, decode, {t: load_prefill(root, t, decode) for t in manifest["tasks"]}, manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sunjax export", description=__doc__)
    p.add_argument("--runs", nargs="+", required=True, help="run directories of `sunjax train`")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from train.launch import load_run

    runs = [load_run(r) for r in args.runs]
    decode_fp = {r["meta"]["decode_fingerprint"] for r in runs}
    if len(decode_fp) != 1:
        raise SystemExit(f"runs were trained against different decode trees: {decode_fp}")
    first = runs[0]
    vdir = export(
        args.out,
        first["cfg"],
        first["decode"],
        {r["meta"]["task"]: r["params"] for r in runs},
        tokenizer_source=first["meta"]["tokenizer_source"],
        tokenizer=first["tokenizer"],
        metadata={r["meta"]["task"]: r["meta"] for r in runs},
    )
    print(f"exported {len(runs)} task(s) to {vdir}")
    return 0
