"""The export format: one shared decode tree, one prefill module per task, and a manifest.

Layout of an export root::

    <root>/LATEST                 name of the newest complete version (atomically replaced)
    <root>/v<N>/decode/           the shared decode tree (Orbax, tensorstore; no pickle)
    <root>/v<N>/prefill/<task>/   one prefill tree per task
    <root>/v<N>/tokenizer/        the tokenizer files (when one was given)
    <root>/v<N>/manifest.json     config, tokenizer, dtypes, tasks, training metadata, how the
                                  decode tree is quantized (``decode_quant``, null for a plain
                                  tree) and the sha256 content fingerprint of EVERY tree

A version becomes visible only when ``LATEST`` names it, after everything is written, so an
export killed half-way leaves the previous one readable and is never listed as complete.
Every tree is verified against its manifest fingerprint when loaded: a corrupted or
half-replaced file is an error naming the module, never served. Prefill modules are bound to
the decode tree they were trained against: pairing one with another decode tree raises.

QSUN: the decode tree may be quantized (``sunjax.quant``); the manifest's ``decode_quant``
(``sunjax.quant.spec``) rebuilds its exact abstract tree, so Orbax restores it bitwise.
Prefill modules are always plain trees.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from sunjax.config import ModelConfig
from sunjax.model import init_params
from sunjax.quant.spec import abstract_decode, check_restorable, decode_quant_of, normalize_quant

MANIFEST_VERSION = 2  # 2: every tree fingerprinted (version 1 fingerprinted the decode tree only)


def fingerprint(tree) -> str:
    """sha256 over a tree's structure, shapes, dtypes and bytes: binds a prefill module to the
    exact decode tree it was trained against, and every tree on disk to its manifest."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(str(treedef).encode())
    return h.hexdigest()


def _versions(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"v(\d+)", d)))


def check_task_name(task: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", task):
        raise ValueError(f"task name {task!r} must match [A-Za-z0-9_.-]+")


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

    ``decode_quant`` says how the decode tree is quantized; ``None`` infers it from the tree's
    leaves. Either way it is checked against the tree before anything is written."""
    if not prefill:
        raise ValueError("an export needs at least one task prefill module")
    for task in prefill:
        check_task_name(task)
    inferred = decode_quant_of(decode_params)
    quant = inferred if decode_quant is None else normalize_quant(decode_quant)
    if quant != inferred:
        raise ValueError(f"decode_quant={quant} but the decode tree is quantized as {inferred}")
    if quant is not None:
        check_restorable(cfg, decode_params, quant)
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
        "prefill_fingerprints": {t: fingerprint(tree) for t, tree in sorted(prefill.items())},
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
        raise ValueError(f"{str(root)!r} holds no complete export (no LATEST file)")
    with open(pointer) as f:
        return os.path.join(os.path.abspath(root), f.read().strip())


def read_manifest(root: str) -> dict:
    """The newest manifest; its ``tokenizer`` entry resolved to an absolute path."""
    vdir = latest(root)
    with open(os.path.join(vdir, "manifest.json")) as f:
        manifest = json.load(f)
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ValueError(
            f"export {vdir!r} has manifest_version={version!r}; this sunjax reads version "
            f"{MANIFEST_VERSION} (every tree fingerprinted): export it again"
        )
    if manifest.get("tokenizer"):
        manifest["tokenizer"] = os.path.join(vdir, manifest["tokenizer"])
    return manifest


def _checkpointer() -> ocp.StandardCheckpointer:
    """Orbax's checkpointer; in one of several ``jax.distributed`` processes (a decode
    instance over processes) one that reads alone: each process loads its own copy, and
    orbax's cross-process syncs (gloo collectives) are not wanted there."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"sunjax-p{me}"
    )
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def _restore(path: str, abstract, want: str, what: str):
    """Restore one tree and verify its content fingerprint (ValueError naming ``what``)."""
    try:
        if jax.process_count() > 1:  # onto this process's device, not the saver's
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), abstract
            )
        tree = _checkpointer().restore(path, abstract)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ValueError(f"{what} at {path!r} cannot be read: {e}") from e
    got = fingerprint(tree)
    if got != want:
        raise ValueError(
            f"{what} at {path!r} does not match its manifest fingerprint (want {want[:12]}, "
            f"got {got[:12]}): the export is corrupted or half-replaced; refusing to load it"
        )
    return tree


def load_decode(root: str):
    """``(cfg, decode_tree, manifest)`` of the newest export, fingerprint verified."""
    manifest = read_manifest(root)
    cfg = ModelConfig.from_dict(manifest["model_config"])
    abstract = abstract_decode(cfg, manifest.get("decode_quant"))
    path = os.path.join(latest(root), "decode")
    tree = _restore(path, abstract, manifest["decode_fingerprint"], "the decode tree")
    return cfg, tree, manifest


def check_pairing(manifest: dict, task: str, decode_params) -> None:
    """Refuse unless ``decode_params`` is the exact decode tree ``task`` was trained against."""
    got = fingerprint(decode_params)
    want = manifest["decode_fingerprint"]
    if got != want:
        want_q, got_q = manifest.get("decode_quant"), decode_quant_of(decode_params)
        why = (
            f" (the export's decode tree is quantized as {want_q}, the given one as {got_q})"
            if want_q != got_q
            else ""
        )
        raise ValueError(
            f"prefill module {task!r} was trained against decode tree {want[:12]}, not "
            f"{got[:12]}{why}: refusing to pair them"
        )


def load_prefill(root: str, task: str, decode_params) -> dict:
    """Task ``task``'s prefill module (fingerprint verified), refused unless ``decode_params``
    is the exact decode tree it was trained against."""
    manifest = read_manifest(root)
    if task not in manifest["tasks"]:
        raise ValueError(f"task {task!r} is not in the export; it has {manifest['tasks']}")
    check_pairing(manifest, task, decode_params)
    cfg = ModelConfig.from_dict(manifest["model_config"])
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    path = os.path.join(latest(root), "prefill", task)
    want = manifest["prefill_fingerprints"][task]
    return _restore(path, abstract, want, f"prefill module {task!r}")


def load_export(root: str):
    """``(cfg, decode_tree, {task: prefill_tree}, manifest)``."""
    cfg, decode, manifest = load_decode(root)
    return cfg, decode, {t: load_prefill(root, t, decode) for t in manifest["tasks"]}, manifest
