"""``sunjax serve`` as users run it: a live server subprocess driven by the official ``openai``
client (and httpx for the bad inputs the client would not send).

The model is a tiny random SUN export with SmolLM2's tokenizer (``apps.tiny``): real text and
chat templates, millisecond decode steps. Every prefill tree differs from the decode tree, so
matching ``sunjax.generate`` token for token proves each stage ran the right tree.
"""

import concurrent.futures as cf
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest

from apps.remote_server import RemoteServer
from apps.soak import run_soak
from apps.tiny import tiny_export
from sunjax.export import load_export, read_manifest
from sunjax.generate import generate
from sunjax.steps import forward
from sunjax.tokenizer import chat_prompt, eos_ids, load_tokenizer

KEY = "test-key"
MAX_LEN = 256
ARGS = ["--max-len", str(MAX_LEN), "--min-bucket", "64", "--slots", "4", "--max-queue", "8"]
PROMPT = "The quick brown fox"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``root`` holding ``exp`` (math, code), ``extra`` (tool; the same decode tree) and
    ``other`` (a different decode tree)."""
    root = tmp_path_factory.mktemp("exports")
    tiny_export(str(root / "exp"), ("math", "code"))
    tiny_export(str(root / "extra"), ("tool",))
    tiny_export(str(root / "other"), ("chat",), seed=7)
    cfg, decode, prefill, manifest = load_export(str(root / "exp"))
    tok = load_tokenizer(manifest["tokenizer"])
    return {
        "root": root,
        "cfg": cfg,
        "decode": decode,
        "prefill": {**prefill, "base": decode},
        "tok": tok,
        "cache": str(tmp_path_factory.mktemp("jax-cache")),
    }


@pytest.fixture(scope="module")
def server(exports):
    root = exports["root"]
    args = ["--export", str(root / "exp"), *ARGS, "--api-key", KEY]
    args += ["--allow-model-management", "--export-root", str(root)]
    with RemoteServer(args, api_key=KEY, compile_cache=exports["cache"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def reference(exports, model, prompt_ids, n, **sampling):
    """``sunjax.generate`` with the model's prefill tree and the shared decode tree."""
    out = generate(
        exports["cfg"],
        exports["prefill"][model],
        [prompt_ids],
        max_new_tokens=n,
        eos_ids=eos_ids(exports["tok"]),
        decode_params=exports["decode"],
        **sampling,
    )
    return out.tokens[0]


def token_strings(tok, ids):
    return [tok.decode([t]) for t in ids]


def post(server, path, json=None, *, content=None, headers=None, method="POST"):
    h = {**server.headers(), **(headers or {})}
    return httpx.request(method, server.url + path, json=json, content=content, headers=h)


def wait_until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


# -- the API ----------------------------------------------------------------------------------
def test_models_list_cards(client, exports):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "math", "code"}
    want = read_manifest(str(exports["root"] / "exp"))["decode_fingerprint"]
    for name, card in cards.items():
        extra = card.model_extra
        assert extra["decode_fingerprint"] == want
        assert extra["quantization"] is None
        assert extra["parent"] == (None if name == "base" else "base")


@pytest.mark.parametrize("model", ["math", "base"])
def test_completion_equals_generate_token_for_token(client, exports, model):
    tok = exports["tok"]
    ids = tok.encode(PROMPT)
    want = reference(exports, model, ids, 12)
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0
    )
    choice = out.choices[0]
    assert choice.logprobs.tokens == token_strings(tok, want)
    assert choice.text == tok.decode(want, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 12)
    # a prompt of token ids is the same request
    again = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0)
    assert again.choices[0].text == choice.text


def test_chat_equals_generate_and_trees_differ(client, exports):
    tok = exports["tok"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = chat_prompt(tok, messages)
    want = reference(exports, "code", ids, 10)
    out = client.chat.completions.create(
        model="code", messages=messages, max_tokens=10, temperature=0, logprobs=True
    )
    got = [c.token for c in out.choices[0].logprobs.content]
    assert got == token_strings(tok, want)
    assert out.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(ids)
    # the model choice matters: another task module's prefill scores the first token anew
    other = client.chat.completions.create(
        model="math", messages=messages, max_tokens=1, temperature=0, logprobs=True
    )
    assert other.choices[0].logprobs.content[0].logprob != pytest.approx(
        out.choices[0].logprobs.content[0].logprob, abs=1e-3
    )


def test_stream_joined_equals_whole_and_usage_chunk(client):
    kw = dict(model="math", max_tokens=20, temperature=0)
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(messages=messages, **kw)
    chunks = list(
        client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    whole = client.completions.create(prompt=PROMPT, **kw)
    streamed = list(client.completions.create(prompt=PROMPT, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_seeds_repeat_and_differ(client):
    kw = dict(model="base", prompt=PROMPT, max_tokens=16, temperature=1.0)
    a = client.completions.create(seed=5, **kw).choices[0].text
    assert client.completions.create(seed=5, **kw).choices[0].text == a
    assert client.completions.create(seed=6, **kw).choices[0].text != a


def test_n_choices_are_separate_slots(client):
    kw = dict(model="math", prompt=PROMPT, max_tokens=10, temperature=1.0)
    out = client.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.text for c in out.choices]
    assert len(set(texts)) > 1
    # choice i is seeded seed + i
    assert client.completions.create(seed=12, **kw).choices[0].text == texts[1]
    assert out.usage.completion_tokens == 30
    streamed = list(client.completions.create(n=3, seed=11, stream=True, **kw))
    for i in range(3):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == texts[i]


def test_stop_strings(client, exports):
    tok = exports["tok"]
    kw = dict(model="base", prompt=PROMPT, max_tokens=30, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    words = full.split()
    stop = next(w for w in words[3:] if full.find(w) > 0)
    cut = full[: full.find(stop)]
    out = client.completions.create(stop=[stop, "never-in-the-text"], **kw).choices[0]
    assert (out.text, out.finish_reason) == (cut, "stop")
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert tok is not None


def _forward_logprobs(exports, ids, temperature=1.0):
    logits = forward(exports["cfg"], exports["decode"], np.array([ids]))[0]
    return np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_match_a_forward_pass(client, exports, temperature):
    """The base model (prefill tree = decode tree): one forward pass over prompt + output
    scores every token; sampled requests report the distribution they were drawn from."""
    tok = exports["tok"]
    messages = [{"role": "user", "content": "Count to five."}]
    ids = chat_prompt(tok, messages)
    sampling = {"temperature": temperature, "seed": 3}
    want = reference(exports, "base", ids, 8, **sampling)
    out = client.chat.completions.create(
        model="base", messages=messages, max_tokens=8, logprobs=True, top_logprobs=5, **sampling
    )
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == token_strings(tok, want)
    lp = _forward_logprobs(exports, ids + want, temperature or 1.0)
    for j, (entry, t) in enumerate(zip(content, want, strict=True)):
        row = lp[len(ids) - 1 + j]
        np.testing.assert_allclose(entry.logprob, row[t], atol=1e-4)
        top = np.sort(row)[::-1][:5]
        np.testing.assert_allclose([e.logprob for e in entry.top_logprobs], top, atol=1e-4)
        assert entry.top_logprobs[0].token == tok.decode([int(np.argmax(row))])

    legacy = client.completions.create(
        model="base", prompt=ids, max_tokens=8, logprobs=5, **sampling
    ).choices[0]
    np.testing.assert_allclose(
        legacy.logprobs.token_logprobs, [c.logprob for c in content], atol=1e-4
    )
    assert len(legacy.logprobs.top_logprobs[0]) <= 5


# -- errors -----------------------------------------------------------------------------------
CHAT = {"model": "math", "messages": [{"role": "user", "content": "hi"}]}
CMPL = {"model": "math", "prompt": "hi"}
BAD = [
    # (name, path, json body or raw bytes, status, error.type, param, text in the message)
    ("not json", "/v1/chat/completions", b"{not json", 400, "invalid_request_error", None, "JSON"),
    ("json array", "/v1/chat/completions", b"[1, 2]", 400, "invalid_request_error", None, "list"),
    ("nan", "/v1/completions", b'{"model":"math","prompt":"a","temperature":NaN}', 400,
     "invalid_request_error", "temperature", "nan"),
    ("no model", "/v1/completions", {"prompt": "a"}, 400, "invalid_request_error", "model", ""),
    ("unknown model", "/v1/completions", CMPL | {"model": "nope"}, 404, "not_found_error",
     "model", "nope"),
    ("no messages", "/v1/chat/completions", {"model": "math"}, 400, "invalid_request_error",
     "messages", ""),
    ("empty messages", "/v1/chat/completions", CHAT | {"messages": []}, 400,
     "invalid_request_error", "messages", "[]"),
    ("bad role", "/v1/chat/completions", CHAT | {"messages": [{"role": "robot", "content": "x"}]},
     400, "invalid_request_error", "messages[0].role", "robot"),
    ("content int", "/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": 7}]},
     400, "invalid_request_error", "messages[0].content", "7"),
    ("temperature<0", "/v1/completions", CMPL | {"temperature": -1}, 400,
     "invalid_request_error", "temperature", "-1"),
    ("temperature str", "/v1/completions", CMPL | {"temperature": "0.5"}, 400,
     "invalid_request_error", "temperature", "0.5"),
    ("top_p 0", "/v1/completions", CMPL | {"top_p": 0}, 400, "invalid_request_error", "top_p",
     "0"),
    ("top_p 1.5", "/v1/completions", CMPL | {"top_p": 1.5}, 400, "invalid_request_error",
     "top_p", "1.5"),
    ("max_tokens 0", "/v1/completions", CMPL | {"max_tokens": 0}, 400, "invalid_request_error",
     "max_tokens", "0"),
    ("over context", "/v1/completions", CMPL | {"max_tokens": MAX_LEN}, 400,
     "invalid_request_error", "max_tokens", str(MAX_LEN)),
    ("prompt too long", "/v1/completions", CMPL | {"prompt": [1] * (MAX_LEN + 5)}, 400,
     "invalid_request_error", "prompt", str(MAX_LEN + 5)),
    ("both limits", "/v1/chat/completions", CHAT | {"max_tokens": 4, "max_completion_tokens": 4},
     400, "invalid_request_error", "max_completion_tokens", ""),
    ("n 0", "/v1/completions", CMPL | {"n": 0}, 400, "invalid_request_error", "n", "0"),
    ("n 100", "/v1/completions", CMPL | {"n": 100}, 400, "invalid_request_error", "n", "100"),
    ("logprobs 6", "/v1/completions", CMPL | {"logprobs": 6}, 400, "invalid_request_error",
     "logprobs", "6"),
    ("top_logprobs alone", "/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400,
     "invalid_request_error", "top_logprobs", "2"),
    ("top_logprobs 9", "/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 9},
     400, "invalid_request_error", "top_logprobs", "9"),
    ("tools", "/v1/chat/completions", CHAT | {"tools": [{"type": "function"}]}, 400,
     "invalid_request_error", "tools", "tools"),
    ("response_format", "/v1/chat/completions", CHAT | {"response_format": {"type": "json_object"}},
     400, "invalid_request_error", "response_format", "json_object"),
    ("logit_bias", "/v1/completions", CMPL | {"logit_bias": {"5": 3}}, 400,
     "invalid_request_error", "logit_bias", "logit_bias"),
    ("presence_penalty", "/v1/completions", CMPL | {"presence_penalty": 0.5}, 400,
     "invalid_request_error", "presence_penalty", "0.5"),
    ("unknown field", "/v1/completions", CMPL | {"frobnicate": 1}, 400, "invalid_request_error",
     "frobnicate", "frobnicate"),
    ("5 stops", "/v1/completions", CMPL | {"stop": list("abcde")}, 400, "invalid_request_error",
     "stop", "5"),
    ("empty stop", "/v1/completions", CMPL | {"stop": ""}, 400, "invalid_request_error", "stop",
     "''"),
    ("token out of vocab", "/v1/completions", CMPL | {"prompt": [1, 10**6]}, 400,
     "invalid_request_error", "prompt", "1000000"),
    ("empty prompt", "/v1/completions", CMPL | {"prompt": []}, 400, "invalid_request_error",
     "prompt", "empty"),
    ("prompt list of str", "/v1/completions", CMPL | {"prompt": ["a", "b"]}, 400,
     "invalid_request_error", "prompt", ""),
    ("stream_options alone", "/v1/completions", CMPL | {"stream_options": {"include_usage": True}},
     400, "invalid_request_error", "stream_options", ""),
    ("seed str", "/v1/completions", CMPL | {"seed": "abc"}, 400, "invalid_request_error", "seed",
     "abc"),
    ("bool for int", "/v1/completions", CMPL | {"max_tokens": True}, 400,
     "invalid_request_error", "max_tokens", "True"),
    ("no route", "/v1/nope", CMPL, 404, "not_found_error", None, ""),
    ("load traversal", "/v1/models/load", {"name": "tool", "path": "../../etc"}, 403,
     "permission_error", "path", "../../etc"),
    ("load unknown task", "/v1/models/load", {"name": "zzz", "path": "extra"}, 400,
     "invalid_request_error", "path", "zzz"),
    ("unload unknown", "/v1/models/unload", {"name": "zzz"}, 404, "not_found_error", "name",
     "zzz"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(server, case):
    _, path, body, status, etype, param, shows = case
    if isinstance(body, bytes):
        r = post(server, path, content=body, headers={"content-type": "application/json"})
    else:
        r = post(server, path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == (etype, param), err
    assert shows.lower() in err["message"].lower(), err
    assert set(err) == {"message", "type", "param", "code"}


def test_body_over_1mib_is_413_and_wrong_method_405(server):
    r = post(server, "/v1/completions", json=CMPL | {"prompt": "x" * (1 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = post(server, "/v1/completions", method="GET")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="math", messages=[], max_tokens=3)
    assert e.value.body["param"] == "messages"


def test_401_without_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
    assert httpx.get(server.url + "/metrics").status_code == 200  # open


# -- load, cancellation, unload -------------------------------------------------------------------
def test_flood_gets_429_with_retry_after(server):
    def one(_):
        r = post(server, "/v1/completions", json=CMPL | {"max_tokens": 100, "temperature": 0})
        return r.status_code, r.headers.get("retry-after"), r.json()

    with cf.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429} and codes.count(429) >= 10 and codes.count(200) >= 4
    for code, retry, body in results:
        if code == 429:
            assert retry == "1" and body["error"]["type"] == "rate_limit_error"
    assert wait_until(lambda: server.gauge_sum("sunjax_requests_running") == 0)


def _cancelled(server):
    return sum(
        v
        for (n, labels), v in server.metrics().items()
        if n == "sunjax_requests_total" and ("finish_reason", "cancelled") in labels
    )


def test_disconnect_frees_the_slot(server):
    before = _cancelled(server)
    body = CMPL | {"max_tokens": MAX_LEN - 5, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=server.headers()
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.gauge_sum("sunjax_requests_running") == 1
    # the same without streaming: the client gives up while the server generates (a read
    # timeout far below the time of MAX_LEN - 5 decode steps on any machine)
    with pytest.raises(httpx.ReadTimeout):
        timeout = httpx.Timeout(10.0, read=0.05)
        post_timeout = httpx.Client(timeout=timeout, headers=server.headers())
        post_timeout.post(server.url + "/v1/completions", json=body | {"stream": False})
    assert wait_until(lambda: server.gauge_sum("sunjax_requests_running") == 0, timeout=5)
    assert wait_until(lambda: _cancelled(server) == before + 2, timeout=5)
    assert server.gauge_sum("sunjax_slots_in_use") == 0


def test_load_and_unload_with_requests_in_flight(server, client, exports):
    r = post(server, "/v1/models/load", {"name": "tool", "path": "extra"})
    assert r.status_code == 200, r.text
    assert "tool" in {m.id for m in client.models.list().data}
    r = post(server, "/v1/models/load", {"name": "tool", "path": "extra"})
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"
    r = post(server, "/v1/models/load", {"name": "chat", "path": "other"})
    assert r.status_code == 409, r.text
    theirs = read_manifest(str(exports["root"] / "other"))["decode_fingerprint"]
    ours = read_manifest(str(exports["root"] / "exp"))["decode_fingerprint"]
    assert theirs in r.json()["error"]["message"] and ours in r.json()["error"]["message"]

    results = []

    def stream():
        chunks = client.completions.create(
            model="tool", prompt=PROMPT, max_tokens=150, temperature=0, stream=True
        )
        results.append([c.choices[0].finish_reason for c in chunks][-1])

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    assert wait_until(lambda: server.gauge_sum("sunjax_requests_running") == 3)
    r = post(server, "/v1/models/unload", {"name": "tool"})
    assert r.status_code == 200, r.text
    # unload returned after they finished: nothing of tool's is left running
    assert server.metrics()[("sunjax_requests_running", (("model", "tool"),))] == 0
    for t in threads:
        t.join()
    assert results == ["length"] * 3
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tool", prompt="x", max_tokens=2)
    assert "tool" not in {m.id for m in client.models.list().data}


def test_short_soak_loses_nothing(server):
    """``apps.soak`` in small: mixed stream / whole / sampling / n / stop, 20 % cancelled at
    random points; every request completes or is cancelled by us, the gauges return to 0."""
    out = run_soak(
        server, ["math", "code", "base"], requests=30, concurrency=6, max_tokens=24, seed=1
    )
    assert out["lost"] == {} and out["outcomes"].get("ok", 0) >= 15, out
    assert out["gauges_after"] == {"running": 0, "waiting": 0}


def test_health_200_after_everything(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    m = server.metrics()
    assert server.gauge_sum("sunjax_requests_running") == 0
    assert server.gauge_sum("sunjax_requests_waiting") == 0
    assert m[("sunjax_generation_tokens_total", (("model", "math"),))] > 0
    assert m[("sunjax_decode_steps_total", ())] > 0
    assert ("sunjax_time_to_first_token_seconds_count", (("model", "base"),)) in m


# -- process lifecycle ------------------------------------------------------------------------
def _health(server):
    try:
        return httpx.get(server.url + "/health").status_code
    except httpx.HTTPError:
        return None


@pytest.mark.parametrize(
    ("drain", "want"),
    [("30", {"a": "length", "b": "length"}), ("0", {"a": "abort", "b": "abort"})],
    ids=["in-flight-finish", "rest-aborted"],
)
def test_sigterm_drains_open_streams_then_exits_0(exports, drain, want):
    """SIGTERM with two streams open (each has its first chunk): new requests get 503 at once;
    with a 30 s drain both streams finish; with 0 s both are aborted. Exit 0 either way."""
    args = ["--export", str(exports["root"] / "exp"), *ARGS, "--drain-timeout", drain]
    with RemoteServer(args, compile_cache=exports["cache"]) as server:
        client = server.client()
        finish, started = {}, {"a": threading.Event(), "b": threading.Event()}

        def stream(name, max_tokens):
            chunks = client.completions.create(
                model="math", prompt=PROMPT, max_tokens=max_tokens, temperature=0.5,
                top_p=0.5, seed=1, stream=True,
            )  # fmt: skip
            reasons = []
            for c in chunks:
                started[name].set()
                reasons.append(c.choices[0].finish_reason)
            finish[name] = reasons[-1]

        # 200 tokens each (milliseconds per step): both still run when the signal lands
        threads = [threading.Thread(target=stream, args=(n, 200)) for n in started]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started.values())
        server.proc.send_signal(15)
        assert wait_until(lambda: _health(server) in (503, None), 5)
        r = post(server, "/v1/completions", json=CMPL) if _health(server) else None
        assert r is None or r.status_code == 503 and r.json()["error"]["code"] == "draining"
        for t in threads:
            t.join()
        assert server.proc.wait(30) == 0
        assert finish == want
        assert "Traceback" not in server.output()


def test_start_refuses_a_mismatched_export(exports):
    root = exports["root"]
    server = RemoteServer(["--export", str(root / "exp"), "--export", str(root / "other")])
    assert server.proc.wait(120) == 1
    out = server.output()
    for name in ("exp", "other"):
        assert read_manifest(str(root / name))["decode_fingerprint"] in out
    assert "Traceback" not in out
