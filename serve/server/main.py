"""``sunjax serve``: the OpenAI-compatible server (uvicorn) over one shared decode pool.

    sunjax serve                                 # SmolLM2-135M-Instruct as model "base"
    sunjax serve --export runs/export --port 8000 --api-key secret

SIGTERM / SIGINT drain: stop admitting (503), let in-flight requests finish for up to
``--drain-timeout`` s, abort the rest (``finish_reason: "abort"``), exit 0. A second signal
aborts at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

import uvicorn

from serve.engine import EngineConfig
from serve.pool import DecodePool, ensure_cpu_devices
from serve.router import LeastLoaded, ModelAffine
from serve.scheduler import Scheduler
from serve.server.app import build_app
from serve.server.models import ModelSet, load_models
from serve.server.runtime import Runtime

log = logging.getLogger("sunjax.serve")
SWITCH_INTERVAL_S = 2e-4  # sys.setswitchinterval in the server (default 5e-3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sunjax serve", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default="smollm2",
        help="base model without --export: a hub name, GGUF file or HF directory",
    )
    ap.add_argument(
        "--export",
        action="append",
        default=[],
        help="a sunjax export directory; every task module becomes a model "
        "(repeatable; all must share one decode tree)",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--api-key",
        default=os.environ.get("SUNJAX_API_KEY"),
        help="required as 'Authorization: Bearer KEY' on /v1 (or SUNJAX_API_KEY)",
    )
    ap.add_argument("--workers", type=int, default=1, help="decode workers")
    ap.add_argument("--slots", type=int, default=8, help="decode slots per worker")
    ap.add_argument("--max-len", type=int, default=2048, help="tokens per slot: prompt + output")
    ap.add_argument("--min-bucket", type=int, default=16, help="shortest prefill bucket")
    ap.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    ap.add_argument(
        "--prefills-per-step",
        type=int,
        default=1,
        help="prompts prefilled between two decode steps while slots decode "
        "(bounds the stall of running streams; 0 = no bound)",
    )
    ap.add_argument("--policy", choices=("sun", "conventional"), default="sun")
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument(
        "--allow-model-management",
        action="store_true",
        help="enable POST /v1/models/load and /v1/models/unload",
    )
    ap.add_argument(
        "--export-root",
        default=None,
        help="directory that model-management paths must resolve under",
    )
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    for name in ("workers", "slots", "max_len", "min_bucket"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.max_queue < 0 or args.prefills_per_step < 0 or args.drain_timeout < 0:
        ap.error("--max-queue, --prefills-per-step and --drain-timeout must be >= 0")
    return args


def setup(args: argparse.Namespace) -> tuple[ModelSet, Scheduler]:
    """Load the models and build the warmed-up decode pool and scheduler (engine thread)."""
    from serve.loop import warm_up

    start = time.perf_counter()
    ms = load_models(args.model, args.export)
    log.info("models %s loaded in %.1f s", sorted(ms.models), time.perf_counter() - start)
    config = EngineConfig(
        workers=args.workers,
        slots_per_worker=args.slots,
        max_len=args.max_len,
        min_bucket=min(args.min_bucket, args.max_len),
    )
    names = sorted(ms.models)
    if args.policy == "sun":
        router = LeastLoaded(args.workers)
        pool = DecodePool(ms.cfg, config, decode_params=ms.decode)
    else:
        router = ModelAffine.split(names, args.workers)
        trees = [ms.models[router.owner(w)].prefill for w in range(args.workers)]
        pool = DecodePool(ms.cfg, config, worker_params=trees)
    start = time.perf_counter()
    warm_up(pool, ms.models[names[0]].prefill)
    pool.step_logprobs()
    log.info("compiled in %.1f s", time.perf_counter() - start)
    sched = Scheduler(
        pool,
        {name: m.prefill for name, m in ms.models.items()},
        router,
        tokenizer=ms.tokenizer,
        eos_ids=ms.eos_ids,
        max_queue=args.max_queue,
        prefills_per_step=args.prefills_per_step,
    )
    return ms, sched


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        force=True,
    )
    ensure_cpu_devices(args.workers)
    # The engine thread releases the GIL while XLA computes and must get it back the moment the
    # step ends; by default a thread waits up to 5 ms for the event loop to hand it over, as
    # long as a whole decode step of a small model.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    runtime = Runtime(lambda: setup(args), policy=args.policy)
    app = build_app(
        runtime,
        api_key=args.api_key,
        allow_model_management=args.allow_model_management,
        export_root=args.export_root,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,  # keep the logging set up above (uvicorn's would mute ours)
        lifespan="on",
    )
    server = DrainingServer(config, runtime, args.drain_timeout)
    server.run()
    if runtime.sched is None and runtime.error is not None:
        print(f"sunjax serve: {runtime.error}", file=sys.stderr)
        return 1
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain on the first SIGTERM / SIGINT, and an exit when the
    models fail to load."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_timeout: float):
        super().__init__(config)
        self.runtime, self.drain_timeout = runtime, drain_timeout
        self.drained = self._draining = False

    def handle_exit(self, sig, frame) -> None:  # a signal handler, on the event loop's thread
        loop = self.runtime.loop
        if self._draining or loop is None:
            self.runtime.hurry()
            self.should_exit = True
            return
        self._draining = True
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        aborted = await self.runtime.drain(self.drain_timeout)
        log.warning("drained: %d request(s) aborted", aborted)
        await asyncio.sleep(0.2)  # let the aborted responses go out
        self.drained = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.runtime.state == "failed" and self.runtime.sched is None:
            return True  # loading failed: nothing to serve
        return await super().on_tick(counter)
