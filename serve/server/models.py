"""What a server serves: one decode tree, the task modules paired with it, the tokenizer.

* No export: the base model (default SmolLM2-135M-Instruct) under the id ``base``; it is its
  own prefill and decode tree.
* ``--export DIR`` (repeatable): the first export's decode tree is THE decode tree; every task
  module of every export is a model named by its task. An export whose decode fingerprint
  differs is refused, naming both fingerprints. A plain (not quantized) decode tree is also
  served as ``base``, the untuned model.
"""

from __future__ import annotations

import dataclasses
import os
import time

from serve.engine import Params
from serve.scheduler import Tokenizer
from sunjax import hub
from sunjax.config import ModelConfig
from sunjax.export import fingerprint, load_decode, load_prefill, read_manifest
from sunjax.tokenizer import eos_ids, load_tokenizer

BASE = "base"


@dataclasses.dataclass
class Model:
    """One served model: its prefill tree and where it came from."""

    name: str
    prefill: Params
    root: str  # the export directory or base model path it was loaded from
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


@dataclasses.dataclass
class ModelSet:
    cfg: ModelConfig
    decode: Params
    decode_fingerprint: str
    quantization: str | None
    tokenizer: Tokenizer | None
    eos_ids: tuple[int, ...]
    models: dict[str, Model]


def describe_quant(quant: dict | None) -> str | None:
    """``{"bits": 4, "method": "awq", "group_size": 64, "int8": ["v_proj"]}`` ->
    ``"int4-awq-g64+int8:v_proj"``; None for a plain tree."""
    if quant is None:
        return None
    out = f"int{quant['bits']}-{quant['method']}"
    if quant.get("group_size"):
        out += f"-g{quant['group_size']}"
    if quant.get("int8"):
        out += "+int8:" + ",".join(quant["int8"])
    return out


def check_decode_fingerprint(root: str, manifest: dict, served: str) -> None:
    got = manifest["decode_fingerprint"]
    if got != served:
        raise ValueError(
            f"export {root!r} was trained against decode tree {got}, but this server's decode "
            f"tree is {served}: refusing to serve its task modules"
        )


def load_models(base: str, exports: list[str]) -> ModelSet:
    """The model set for ``sunjax serve [--model BASE] [--export DIR ...]``."""
    if not exports:
        path = hub.resolve(base)
        cfg, params, tok = hub.load(base)
        return ModelSet(
            cfg=cfg,
            decode=params,
            decode_fingerprint=fingerprint(params),
            quantization=None,
            tokenizer=tok,
            eos_ids=tuple(eos_ids(tok)),
            models={BASE: Model(BASE, params, path)},
        )
    roots = [os.path.abspath(e) for e in exports]
    cfg, decode, manifest = load_decode(roots[0])
    served = manifest["decode_fingerprint"]
    manifests = {root: read_manifest(root) for root in roots}
    for root, m in manifests.items():
        check_decode_fingerprint(root, m, served)
    tok_path = manifest.get("tokenizer")
    tok = load_tokenizer(tok_path) if tok_path else None
    models: dict[str, Model] = {}
    if manifest.get("decode_quant") is None:
        models[BASE] = Model(BASE, decode, roots[0])
    for root, m in manifests.items():
        for task in m["tasks"]:
            if task in models:
                raise ValueError(f"task {task!r} of export {root!r} is already served")
            models[task] = Model(task, load_prefill(root, task, decode), root)
    return ModelSet(
        cfg=cfg,
        decode=decode,
        decode_fingerprint=served,
        quantization=describe_quant(manifest.get("decode_quant")),
        tokenizer=tok,
        eos_ids=tuple(eos_ids(tok)) if tok is not None else (),
        models=models,
    )


class Mismatch(ValueError):
    """An export trained against another decode tree than the one served."""


def check_task(root: str, name: str, served_fingerprint: str) -> None:
    """ValueError unless the export at ``root`` has task ``name``; ``Mismatch`` unless it was
    trained against the served decode tree. Reads the manifest only."""
    manifest = read_manifest(root)
    if name not in manifest["tasks"]:
        raise ValueError(f"task {name!r} is not in export {root!r}; it has {manifest['tasks']}")
    try:
        check_decode_fingerprint(root, manifest, served_fingerprint)
    except ValueError as e:
        raise Mismatch(str(e)) from None


def load_task(root: str, name: str, served_fingerprint: str, decode: Params) -> Model:
    """Task ``name`` of the export at ``root``, refused (``Mismatch``) unless it was trained
    against the served decode tree."""
    check_task(root, name, served_fingerprint)
    return Model(name, load_prefill(root, name, decode), root)
