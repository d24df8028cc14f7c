"""Prometheus metrics, labelled by task module (``model``) where a request is concerned.

One registry per server (tests may build several apps in one process). The engine thread
writes them; ``/metrics`` renders them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve.scheduler import Result

LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
PER_TOKEN = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "sunjax_requests", "Finished requests", ["model", "finish_reason"], registry=r
        )
        self.prompt_tokens = Counter(
            "sunjax_prompt_tokens", "Prompt tokens prefilled", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "sunjax_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "sunjax_time_to_first_token_seconds", "TTFT", ["model"], buckets=LATENCY, registry=r
        )
        self.tpot = Histogram(
            "sunjax_time_per_output_token_seconds",
            "TPOT",
            ["model"],
            buckets=PER_TOKEN,
            registry=r,
        )
        self.e2e = Histogram(
            "sunjax_e2e_request_latency_seconds",
            "Arrival to finish",
            ["model"],
            buckets=LATENCY,
            registry=r,
        )
        self.queue_time = Histogram(
            "sunjax_queue_time_seconds",
            "Arrival to prefill",
            ["model"],
            buckets=LATENCY,
            registry=r,
        )
        self.running = Gauge(
            "sunjax_requests_running", "Requests holding a decode slot", ["model"], registry=r
        )
        self.waiting = Gauge(
            "sunjax_requests_waiting", "Requests waiting for a slot", ["model"], registry=r
        )
        self.slots_in_use = Gauge(
            "sunjax_slots_in_use", "Decode slots in use", ["worker"], registry=r
        )
        self.occupancy = Gauge(
            "sunjax_decode_batch_occupancy",
            "Fraction of a worker's slots that the last decode step advanced",
            ["worker"],
            registry=r,
        )
        self.decode_steps = Counter("sunjax_decode_steps", "Decode steps", registry=r)
        self.step_interval = Histogram(
            "sunjax_decode_step_interval_seconds",
            "Time between consecutive decode steps while slots stay busy (prefills between "
            "steps included)",
            buckets=PER_TOKEN + (2, 5),
            registry=r,
        )
        self.max_step_interval = Gauge(
            "sunjax_decode_step_interval_max_seconds",
            "Longest time between consecutive decode steps while slots stayed busy",
            registry=r,
        )
        self.instance_up = Gauge(
            "sunjax_instance_up",
            "Cluster instances: 1 while it heartbeats, 0 once lost",
            ["instance", "role"],
            registry=r,
        )
        self.instance_lost = Counter(
            "sunjax_instance_lost", "Times a cluster instance was lost", ["instance"], registry=r
        )
        self.handoff_seconds = Histogram(
            "sunjax_kv_handoff_seconds",
            "First token at the frontend to KV inserted on the decode instance",
            buckets=LATENCY,
            registry=r,
        )
        self.handoff_bytes = Counter(
            "sunjax_kv_handoff_bytes", "KV cache bytes handed from prefill to decode", registry=r
        )
        self._models: set[str] = set()
        self._up: dict[str, bool] = {}
        self._max_interval = 0.0

    def add_model(self, model: str) -> None:
        """Export the per-model series at 0 from the start."""
        self._models.add(model)
        self.running.labels(model).set(0)
        self.waiting.labels(model).set(0)
        self.prompt_tokens.labels(model)
        self.generation_tokens.labels(model)

    def finished(self, model: str, prompt_tokens: int, result: Result) -> None:
        self.requests.labels(model, result.finish_reason).inc()
        self.generation_tokens.labels(model).inc(len(result.tokens))
        if result.admitted_at is not None:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
            self.queue_time.labels(model).observe(result.admitted_at - result.arrival)
        if result.finish_reason not in ("stop", "length"):
            return
        if result.ttft is not None:
            self.ttft.labels(model).observe(result.ttft)
        if result.tpot is not None:
            self.tpot.labels(model).observe(result.tpot)
        if result.e2e is not None:
            self.e2e.labels(model).observe(result.e2e)

    def gauges(
        self,
        running: Mapping[str, int],
        waiting: Mapping[str, int],
        slots_in_use: Sequence[int],
    ) -> None:
        for model in self._models | set(running) | set(waiting):
            self.running.labels(model).set(running.get(model, 0))
            self.waiting.labels(model).set(waiting.get(model, 0))
        for w, n in enumerate(slots_in_use):
            self.slots_in_use.labels(str(w)).set(n)

    def step(self, slots_in_use: Sequence[int], slots_per_worker: int, interval: float | None):
        self.decode_steps.inc()
        for w, n in enumerate(slots_in_use):
            self.occupancy.labels(str(w)).set(n / slots_per_worker)
        if interval is not None:
            self.step_interval.observe(interval)
            if interval > self._max_interval:
                self._max_interval = interval
                self.max_step_interval.set(interval)

    def instance(self, name: str, role: str, up: bool) -> None:
        if self._up.get(name) and not up:
            self.instance_lost.labels(name).inc()
        self._up[name] = up
        self.instance_lost.labels(name)
        self.instance_up.labels(name, role).set(int(up))

    def handoff(self, seconds: float, kv_bytes: int) -> None:
        self.handoff_seconds.observe(seconds)
        self.handoff_bytes.inc(kv_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
