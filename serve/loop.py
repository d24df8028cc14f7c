"""The serving loop: ``python -m serve.loop --config configs/serve/<setup>.yaml --out DIR``.

Loads a base model and task prefill modules, builds the decode pool for the policy (``sun``:
one shared decode tree, least-loaded routing; ``conventional``: per-model workers holding full
fine-tuned trees, model-affine routing), replays requests (a JSONL file or a generated
workload) at their arrival times, and writes ``DIR/outputs.jsonl`` and ``DIR/summary.json``.

Model sources are pluggable (``LOADERS``): ``random`` derives task modules from the base by a
seeded perturbation; ``export`` reads a SUN export (``sunjax.export``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from serve.engine import EngineConfig, Params, sampling_params
from serve.pool import DecodePool, ensure_cpu_devices
from serve.router import LeastLoaded, ModelAffine, Router
from serve.scheduler import QueueFull, Request, Result, Scheduler, Tokenizer
from serve.workload import Arrival, WorkloadConfig, make_workload
from sunjax import hub, init_params
from sunjax.config import ModelConfig
from sunjax.configs import load_model_config, overlay, read_yaml
from sunjax.export import load_export
from sunjax.generate import buckets
from sunjax.tokenizer import chat_prompt, eos_ids, load_tokenizer

TINY_MODEL = {
    "vocab_size": 512,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,
    "ffn_dim": 128,
    "max_position_embeddings": 256,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """A serving setup; ``configs/serve/*.yaml`` are overlays on it."""

    policy: str = "sun"  # "sun" | "conventional"
    # hub name or local path (GGUF / HF dir), a configs/models YAML, or ModelConfig fields
    model: str | Mapping[str, int | float | str] = dataclasses.field(
        default_factory=lambda: dict(TINY_MODEL)
    )
    loader: str = "random"  # "random" | "export"
    export: str | None = None  # export directory for loader "export"
    tasks: tuple[str, ...] = ("math", "code", "tool", "chat")
    perturb: float = 0.02  # random task modules: relative noise added to the base
    seed: int = 0
    workers: int = 4
    slots_per_worker: int = 8
    max_len: int = 256
    min_bucket: int = 8
    max_queue: int = 1024
    requests: str | None = None  # JSONL request file; None = generated workload
    workload: Mapping[str, float | int | list[int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.policy not in ("sun", "conventional"):
            raise ValueError(f"policy={self.policy!r} must be 'sun' or 'conventional'")
        if self.loader not in LOADERS:
            raise ValueError(f"loader={self.loader!r} must be one of {sorted(LOADERS)}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks:
            raise ValueError("tasks is empty")

    @property
    def workload_config(self) -> WorkloadConfig:
        return overlay(WorkloadConfig, dict(self.workload))


@dataclasses.dataclass
class Models:
    """What a loader returns: the trees a policy needs, and the text side if there is one."""

    cfg: ModelConfig
    decode: Params  # the shared decode tree
    prefill: dict[str, Params]  # task -> prefill tree
    full: dict[str, Params]  # task -> full fine-tuned tree (conventional decode workers)
    tokenizer: Tokenizer | None = None
    eos_ids: tuple[int, ...] = ()


def _base(config: ServeConfig):
    """``(cfg, params, tokenizer | None)`` of the base model."""
    if isinstance(config.model, Mapping):
        cfg = ModelConfig(**config.model)
        return cfg, init_params(cfg, jax.random.PRNGKey(config.seed)), None
    if config.model.endswith((".yaml", ".yml")):
        cfg = load_model_config(config.model)
        return cfg, init_params(cfg, jax.random.PRNGKey(config.seed)), None
    return hub.load(config.model)


def load_random(config: ServeConfig) -> Models:
    """Task modules = base + seeded noise (``perturb`` x each leaf's std); decode = base.
    Stand-ins for trained modules: the conventional full trees are the same perturbed trees."""
    cfg, base, tok = _base(config)

    def perturb(i: int):
        leaves, treedef = jax.tree.flatten(base)
        keys = jax.random.split(jax.random.PRNGKey(config.seed * 1000 + i + 1), len(leaves))
        noisy = [
            x + config.perturb * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
        return treedef.unflatten(noisy)

    prefill = {t: perturb(i) for i, t in enumerate(config.tasks)}
    return Models(
        cfg=cfg,
        decode=base,
        prefill=prefill,
        full=prefill,
        tokenizer=tok,
        eos_ids=tuple(eos_ids(tok)) if tok is not None else (),
    )


def load_from_export(config: ServeConfig) -> Models:
    """A SUN export (``sunjax.export.load_export``: every tree verified against its manifest
    fingerprint, every prefill module against the decode tree it was trained with)."""
    if config.export is None:
        raise ValueError("loader 'export' needs export=<directory>")
    cfg, decode, prefill, manifest = load_export(config.export)
    tok_path = manifest.get("tokenizer")
    tok = load_tokenizer(tok_path) if tok_path else None
    return Models(
        cfg=cfg,
        decode=decode,
        prefill=dict(prefill),
        full=dict(prefill),  # an export holds no full fine-tunes: conventional pairs naively
        tokenizer=tok,
        eos_ids=tuple(eos_ids(tok)) if tok is not None else (),
    )


LOADERS: dict[str, Callable[[ServeConfig], Models]] = {
    "random": load_random,
    "export": load_from_export,
}


def build(
    config: ServeConfig, models: Models, prompt_lengths: Sequence[int] | None = None
) -> tuple[DecodePool, Router]:
    """The decode pool and router of ``config.policy``, warmed up (see ``warm_up``) for the
    buckets of ``prompt_lengths`` (default: every bucket up to ``max_len``)."""
    pc = EngineConfig(
        workers=config.workers,
        slots_per_worker=config.slots_per_worker,
        max_len=config.max_len,
        min_bucket=config.min_bucket,
    )
    tasks = sorted(models.prefill)
    if config.policy == "sun":
        router = LeastLoaded(config.workers)
        pool = DecodePool(models.cfg, pc, decode_params=models.decode)
    else:
        router = ModelAffine.split(tasks, config.workers)
        owners = [router.owner(w) for w in range(config.workers)]
        pool = DecodePool(models.cfg, pc, worker_params=[models.full[m] for m in owners])
    # prefill runs the (plain) task trees; the decode tree may be quantized (QSUN), and
    # prefilling with it would compile a program serving never runs
    warm_up(pool, models.prefill[tasks[0]], prompt_lengths)
    return pool, router


def warm_up(
    pool: DecodePool,
    params: Params,
    prompt_lengths: Sequence[int] | None = None,
    before_step: Callable[[], None] | None = None,
) -> None:
    """Compile prefill for every bucket (or those of ``prompt_lengths``), insert on every
    worker, and the decode step, so latencies measure serving and not compilation.
    ``before_step``: called before the step (a pool over processes: a barrier)."""
    if prompt_lengths is None:
        lengths = buckets(pool.config.min_bucket, pool.config.max_len)
    else:
        lengths = sorted({pool.engine.bucket(n) for n in prompt_lengths})
    for n in lengths:
        prefix = pool.engine.prefill(params, [0] * min(n, pool.config.max_len), sampling_params())
        for w in range(pool.config.workers):
            if pool.owner(w) == jax.process_index():  # several processes: each its own
                pool.insert(prefix, w, 0)
    pool.set_active(np.zeros(pool.slots, bool))
    if before_step is not None:
        before_step()
    pool.step()


# request-file field -> (type check, converter, default); "model" and a prompt are required
_FIELDS = {
    "id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), str, None),
    "model": (lambda v: isinstance(v, str), str, None),
    "max_tokens": (lambda v: _is_int(v), int, 64),
    "temperature": (lambda v: _is_num(v), float, 0.0),
    "top_k": (lambda v: _is_int(v), int, 0),
    "top_p": (lambda v: _is_num(v), float, 1.0),
    "seed": (lambda v: _is_int(v), int, 0),
    "stop": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), tuple, ()),
    "arrival": (lambda v: _is_num(v) and v >= 0, float, 0.0),
}
_is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)


def read_requests(path: str, models: Models) -> list[Arrival]:
    """JSONL: ``{"id", "model", "prompt" (text) | "prompt_ids", "max_tokens", "temperature",
    "top_k", "top_p", "seed", "stop", "arrival" (s)}`` per line. A malformed line raises
    ValueError naming ``path:line`` and the field; nothing is served from a bad file."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(d, dict):
                raise ValueError(f"{where}: a request must be a JSON object, got {d!r:.40}")
            unknown = sorted(set(d) - set(_FIELDS) - {"prompt", "prompt_ids"})
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {unknown}")
            fields = {}
            for key, (ok, conv, default) in _FIELDS.items():
                if key not in d:
                    if key == "model":
                        raise ValueError(f"{where}: missing field 'model'")
                    fields[key] = default
                elif not ok(d[key]):
                    raise ValueError(f"{where}: bad value for field {key!r}: {d[key]!r}")
                else:
                    fields[key] = conv(d[key])
            ids = d.get("prompt_ids")
            if ids is not None:
                if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
                    raise ValueError(f"{where}: prompt_ids must be a list of ints, got {ids!r:.60}")
                prompt = tuple(ids)
            elif not isinstance(d.get("prompt"), str):
                raise ValueError(f"{where}: needs 'prompt' (text) or 'prompt_ids' (token ids)")
            elif models.tokenizer is None:
                raise ValueError(f"{where}: text prompt but the model has no tokenizer")
            else:
                prompt = tuple(chat_prompt(models.tokenizer, d["prompt"]))
            at = fields.pop("arrival")
            rid = fields.pop("id") or f"line-{n}"
            out.append(Arrival(at=at, request=Request(id=rid, prompt=prompt, **fields)))
    return sorted(out, key=lambda a: a.at)


def replay(sched: Scheduler, arrivals: Sequence[Arrival]) -> tuple[list[Result], float]:
    """Submit each request at its arrival time and run until all are done. Returns one result
    per arrival, in arrival order (a refused one: ``finish_reason="refused"`` and its
    ``error``), and the wall time (s)."""
    refused: dict[int, Result] = {}
    start = time.perf_counter()
    i = 0
    while i < len(arrivals) or sched.busy:
        now = time.perf_counter() - start
        while i < len(arrivals) and arrivals[i].at <= now:
            a = arrivals[i]
            try:
                sched.submit(a.request, arrival=start + a.at)
            except (ValueError, QueueFull) as e:
                r = a.request
                refused[i] = Result(
                    id=r.id, model=r.model, tokens=[], finish_reason="refused", error=str(e)
                )
            i += 1
        if sched.busy:
            sched.step()
        elif i < len(arrivals):
            time.sleep(max(0.0, arrivals[i].at - (time.perf_counter() - start)))
    wall = time.perf_counter() - start
    results = [refused.get(i) or sched.results[a.request.id] for i, a in enumerate(arrivals)]
    return results, wall


Summary = dict[str, float | int | str | None]


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if len(values) else None


def summarize(
    policy: str,
    sched: Scheduler,
    results: Sequence[Result],
    wall: float,
) -> Summary:
    done = [r for r in results if r.finish_reason in ("stop", "length")]
    tokens = sum(len(r.tokens) for r in done)
    ttft = [r.ttft for r in done if r.ttft is not None]
    tpot = [r.tpot for r in done if r.tpot is not None]
    e2e = [r.e2e for r in done if r.e2e is not None]
    return {
        "policy": policy,
        "router": sched.router.name,
        "workers": sched.pool.config.workers,
        "slots_per_worker": sched.pool.config.slots_per_worker,
        "requests": len(results),
        "completed": len(done),
        "cancelled": sum(r.finish_reason == "cancelled" for r in results),
        "failed": sum(r.finish_reason == "refused" for r in results),
        "output_tokens": tokens,
        "decode_steps": sched.decode_steps,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall if wall > 0 else None,
        "ttft_ms_p50": _pct(ttft, 50),
        "ttft_ms_p99": _pct(ttft, 99),
        "tpot_ms_p50": _pct(tpot, 50),
        "tpot_ms_p99": _pct(tpot, 99),
        "e2e_ms_p50": _pct(e2e, 50),
        "mean_batch_occupancy": float(sched.occupancy_sum / max(sched.decode_steps, 1)),
    }


def serve_once(
    config: ServeConfig,
    models: Models,
    pool: DecodePool,
    router: Router,
    arrivals: Sequence[Arrival],
) -> tuple[Summary, list[Result]]:
    """One replay on a built pool (reusable: the pool is idle again afterwards). Requests the
    scheduler refused come back as results with ``finish_reason="refused"`` and their
    ``error``."""
    sched = Scheduler(
        pool,
        models.prefill,
        router,
        tokenizer=models.tokenizer,
        eos_ids=models.eos_ids,
        max_queue=config.max_queue,
    )
    results, wall = replay(sched, arrivals)
    return summarize(config.policy, sched, results, wall), results


def write_outputs(out_dir: str, results: Sequence[Result], summary: Summary) -> None:
    """``outputs.jsonl`` (one row per request; a refused one with its ``error``) and
    ``summary.json``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "outputs.jsonl"), "w") as f:
        for r in results:
            row = {
                "id": r.id,
                "model": r.model,
                "text": r.text,
                "token_ids": r.tokens,
                "finish_reason": r.finish_reason,
                "worker": r.worker,
                "ttft_s": r.ttft,
                "tpot_s": r.tpot,
                "e2e_s": r.e2e,
            }
            if r.error is not None:
                row["error"] = r.error
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def load_config(path: str | None, **overrides) -> ServeConfig:
    data = read_yaml(path) if path else {}
    return overlay(ServeConfig, data, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sunjax serve-loop", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="configs/serve/<setup>.yaml (default: tiny random SUN)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--policy", choices=("sun", "conventional"))
    ap.add_argument("--requests", help="JSONL request file (default: the config's workload)")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config, policy=args.policy, requests=args.requests)
        ensure_cpu_devices(config.workers)
        models = LOADERS[config.loader](config)
        if config.requests:
            arrivals = read_requests(config.requests, models)
        else:
            tasks = list(models.prefill)
            arrivals = make_workload(config.workload_config, tasks, models.cfg.vocab_size)
    except (ValueError, OSError) as e:
        print(f"sunjax serve-loop: {e}", file=sys.stderr)
        return 2
    pool, router = build(config, models)
    summary, results = serve_once(config, models, pool, router, arrivals)
    write_outputs(args.out, results, summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
