"""Serving: engine (prefill / insert / generate), decode pool, router, scheduler, loop."""

from serve.engine import DecodeState, Engine, EngineConfig, Prefix
from serve.pool import DecodePool
from serve.router import LeastLoaded, ModelAffine, Router
from serve.scheduler import QueueFull, Request, Result, Scheduler

__all__ = [
    "DecodePool",
    "DecodeState",
    "Engine",
    "EngineConfig",
    "LeastLoaded",
    "ModelAffine",
    "Prefix",
    "QueueFull",
    "Request",
    "Result",
    "Router",
    "Scheduler",
]
