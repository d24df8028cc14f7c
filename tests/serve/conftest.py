"""Tiny random models with trees you can tell apart, and decode pools compiled once."""

import jax
import pytest

from apps.tiny import tiny_export
from serve.engine import EngineConfig
from serve.pool import DecodePool
from sunjax import ModelConfig, init_params
from sunjax.export import load_export
from sunjax.generate import generate
from sunjax.tokenizer import load_tokenizer

MODELS = ("math", "code", "tool")
WORKERS, SLOTS, MAX_LEN = 4, 2, 64


@pytest.fixture(scope="session")
def tiny():
    """``(cfg, decode_tree, {task: prefill_tree})``: every tree a different random init."""
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_dim=48,
        max_position_embeddings=128,
    )
    decode = init_params(cfg, jax.random.PRNGKey(100))
    tasks = {m: init_params(cfg, jax.random.PRNGKey(i)) for i, m in enumerate(MODELS)}
    return cfg, decode, tasks


@pytest.fixture(scope="session")
def pool_config():
    return EngineConfig(workers=WORKERS, slots_per_worker=SLOTS, max_len=MAX_LEN)


@pytest.fixture(scope="session")
def sun_pool(tiny, pool_config):
    cfg, decode, _ = tiny
    return DecodePool(cfg, pool_config, decode_params=decode)


@pytest.fixture(scope="session")
def conv_pool(tiny, pool_config):
    """Conventional layout as ``ModelAffine.split(MODELS, 4)`` assigns it: math -> workers 0
    and 1, code -> 2, tool -> 3; each worker holds its model's full tree."""
    cfg, _, tasks = tiny
    owners = ["math", "math", "code", "tool"]
    return DecodePool(cfg, pool_config, worker_params=[tasks[m] for m in owners])


class ByteTokenizer:
    """Token id -> one byte; some ids are pieces of multi-byte UTF-8 characters."""

    def __init__(self, vocab_size: int = 97):
        pieces = sorted(set("é日本".encode()))  # c3 a9 | e6 97 a5 | e6 9c ac
        table = list(b"abcdefghijklmnopqrstuvwxyz ,.!?") + pieces
        self.table = (table * (vocab_size // len(table) + 1))[:vocab_size]

    def decode(self, ids, skip_special_tokens=True):
        return bytes(self.table[i] for i in ids).decode("utf-8", errors="replace")

    def encode_bytes(self, data: bytes) -> list[int]:
        return [self.table.index(b) for b in data]


def reference(cfg, prefill_tree, decode_tree, req):
    """``sunjax.generate``'s tokens for one scheduler ``Request`` (its own sampling settings)."""
    return generate(
        cfg,
        prefill_tree,
        [list(req.prompt)],
        max_new_tokens=req.max_tokens,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        seed=req.seed,
        decode_params=decode_tree,
    ).tokens[0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny random export with two tasks (math, code), loaded, and a JAX compile cache
    directory (the cluster tests)."""
    root = str(tmp_path_factory.mktemp("export") / "exp")
    tiny_export(root, ("math", "code"))
    cfg, decode, prefill, manifest = load_export(root)
    return {
        "root": root,
        "cfg": cfg,
        "decode": decode,
        "prefill": prefill,
        "tok": load_tokenizer(manifest["tokenizer"]),
        "cache": str(tmp_path_factory.mktemp("jax-cache")),
    }
