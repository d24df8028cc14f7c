"""Orbax exports: one shared decode tree, one prefill module per task, and a manifest.

Layout of an export root::

    <root>/LATEST                 name of the newest complete version (atomically replaced)
    <root>/v<N>/decode/           the shared decode tree (Orbax, tensorstore; no pickle)
    <root>/v<N>/prefill/<task>/   one prefill tree per task
    <root>/v<N>/manifest.json     config, tokenizer source, dtypes, tasks, training metadata
                                  and the sha256 fingerprint of the decode tree

A version becomes visible only when ``LATEST`` names it, after everything is written, so an
export killed half-way leaves the previous one readable and is never listed as complete.
Prefill modules are bound to the decode tree they were trained against: loading one against
a decode tree with another fingerprint raises ``ValueError``.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import jax
import orbax.checkpoint as ocp

from sunjax.config import ModelConfig
from sunjax.model import init_params
from sunjax.sun import fingerprint

MANIFEST_VERSION = 1


def _versions(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"v(\d+)", d)))


def export(
    root: str,
    cfg: ModelConfig,
    decode_params,
    prefill: dict[str, dict],
    *,
    tokenizer_source: str,
    tokenizer=None,
    metadata: dict | None = None,
) -> str:
    """Write a new complete version under ``root``; returns its directory. A ``tokenizer``
    (transformers) is saved inside the version, making the export self-contained."""
    if not prefill:
        raise ValueError("an export needs at least one task prefill module")
    for task in prefill:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", task):
            raise ValueError(f"task name {task!r} must match [A-Za-z0-9_.-]+")
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
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
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
        raise ValueError(
            f"prefill module {task!r} was trained against decode tree "
            f"{manifest['decode_fingerprint'][:12]}, not {got[:12]}: refusing to pair them"
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
        metadata={r["meta"]["task"]: r["meta"] for r in runs},
    )
    print(f"exported {len(runs)} task(s) to {vdir}")
    return 0
