"""The engine failing mid-request, in process (``build_app`` over a runtime whose scheduler
raises on its second step): a 500 for the requests it hit, an SSE ``error`` event then
``[DONE]`` for a stream already started, and ``/health`` 503 afterwards."""

import json
import types

from fastapi.testclient import TestClient

from serve.scheduler import Result
from serve.server.app import build_app
from serve.server.models import Model, ModelSet
from serve.server.runtime import Runtime


class FailingScheduler:
    """Streams one piece of text for each request, then the next step raises."""

    max_queue = 4

    def __init__(self):
        self.queue, self.slots, self.results = [], [None], {}
        self.prefill_params = {"m": {}}
        self.pool = types.SimpleNamespace(config=types.SimpleNamespace(slots_per_worker=1))
        self.pool.config.max_len = 64
        self.live, self.decode_steps = [], 0

    @property
    def busy(self):
        return bool(self.live)

    def validate(self, request):
        pass

    def submit(self, request, on_text):
        self.live.append((request, on_text))
        return Result(id=request.id, model=request.model, tokens=[])

    def step(self):
        self.decode_steps += 1
        if self.decode_steps > 1:
            raise RuntimeError("XLA ran out of memory")
        for request, on_text in self.live:
            on_text(request.id, "hello", False)

    def free_slots(self):
        return [1]

    def cancel(self, request_id, reason="cancelled"):
        return False


def _app():
    models = ModelSet(
        cfg=types.SimpleNamespace(vocab_size=100),
        decode={},
        decode_fingerprint="f" * 64,
        quantization=None,
        tokenizer=None,
        eos_ids=(),
        models={"m": Model("m", {}, "/nowhere")},
    )
    return build_app(Runtime(lambda: (models, FailingScheduler())))


def _ready(client):
    for _ in range(200):
        if client.get("/health").status_code == 200:
            return
    raise AssertionError("runtime never became ready")


def test_engine_failure_is_500_then_health_503():
    with TestClient(_app()) as client:
        _ready(client)
        r = client.post("/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 4})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "out of memory" in err["message"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        r = client.post("/v1/completions", json={"model": "m", "prompt": [1], "max_tokens": 4})
        assert r.status_code == 503


def test_error_after_the_stream_started_is_an_sse_error_event_then_done():
    with TestClient(_app()) as client:
        _ready(client)
        body = {"model": "m", "prompt": [1, 2], "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            frames = [f for f in r.read().decode().split("\n\n") if f]
        assert json.loads(frames[0].removeprefix("data: "))["choices"][0]["text"] == "hello"
        event, data = frames[1].split("\n")
        assert event == "event: error"
        assert json.loads(data.removeprefix("data: "))["error"]["type"] == "server_error"
        assert frames[2] == "data: [DONE]" and len(frames) == 3
