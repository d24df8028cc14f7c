"""``sunjax serve`` beyond the default: ``--policy conventional`` (each model decodes with its
own tree on its own workers) and a QSUN export (an int4 shared decode tree). Each is driven by
the official ``openai`` client with requests of every model at once, and checked token for
token against ``sunjax.generate`` with the trees that policy must decode with."""

import concurrent.futures as cf

import httpx
import pytest

from apps.remote_server import RemoteServer
from apps.tiny import tiny_export
from sunjax.export import load_export
from sunjax.generate import generate
from sunjax.tokenizer import eos_ids, load_tokenizer

ARGS = ["--max-len", "128", "--min-bucket", "32", "--slots", "2"]
PROMPTS = ("The quick brown fox", "Once upon a time", "def add(a, b):")
N = 10
pytestmark = pytest.mark.slow


def served_tokens(server: RemoteServer, tok, models: list[str]) -> dict[tuple[str, str], list]:
    """Greedy completions of every prompt under every model, all requests in flight at once,
    as the token strings the server reports."""
    client = server.client()

    def one(model: str, prompt: str):
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=N, temperature=0, logprobs=0
        )
        return out.choices[0].logprobs.tokens

    jobs = [(m, p) for m in models for p in PROMPTS]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        return dict(zip(jobs, pool.map(lambda j: one(*j), jobs), strict=True))


def expected(cfg, tok, prefill, decode, prompt: str) -> list[str]:
    out = generate(
        cfg, prefill, [tok.encode(prompt)], max_new_tokens=N, eos_ids=eos_ids(tok),
        decode_params=decode,
    )  # fmt: skip
    return [tok.decode([t]) for t in out.tokens[0]]


def test_conventional_policy_decodes_each_model_with_its_own_tree(tmp_path):
    tiny_export(str(tmp_path / "exp"), ("math", "code"))
    cfg, decode, prefill, manifest = load_export(str(tmp_path / "exp"))
    tok = load_tokenizer(manifest["tokenizer"])
    trees = {**prefill, "base": decode}
    args = ["--export", str(tmp_path / "exp"), *ARGS, "--policy", "conventional"]
    with RemoteServer([*args, "--workers", "3"]) as server:
        got = served_tokens(server, tok, sorted(trees))
        assert httpx.get(server.url + "/health").status_code == 200
    for (model, prompt), tokens in got.items():
        tree = trees[model]  # conventional: the model's own tree prefills and decodes
        assert tokens == expected(cfg, tok, tree, tree, prompt), (model, prompt)
    # the check can tell: the shared decode tree would have decoded some of them differently
    shared = {(m, p): expected(cfg, tok, prefill[m], decode, p) for m in prefill for p in PROMPTS}
    assert any(got[key] != tokens for key, tokens in shared.items())


def test_qsun_export_serves_its_int4_decode_tree(tmp_path):
    tiny_export(str(tmp_path / "q"), ("math", "code"), qsun=True)
    cfg, decode, prefill, manifest = load_export(str(tmp_path / "q"))
    assert manifest["decode_quant"]["bits"] == 4
    tok = load_tokenizer(manifest["tokenizer"])
    with RemoteServer(["--export", str(tmp_path / "q"), *ARGS]) as server:
        cards = {m.id: m.model_extra for m in server.client().models.list().data}
        got = served_tokens(server, tok, ["math", "code"])
    # no "base": a quantized decode tree is not a model to serve on its own
    assert set(cards) == {"math", "code"}
    assert {c["quantization"] for c in cards.values()} == {"int4-rtn-g32"}
    assert {c["decode_fingerprint"] for c in cards.values()} == {manifest["decode_fingerprint"]}
    for (model, prompt), tokens in got.items():
        assert tokens == expected(cfg, tok, prefill[model], decode, prompt), (model, prompt)
