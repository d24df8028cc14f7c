"""Serving: engine (prefill / insert / generate), decode pool, router, scheduler, loop."""

from serve.engine import DecodeState, Engine, EngineConfig, Prefix
from serve.pool import DecodePool, PoolConfig
from serve.router import LeastLoaded, ModelAffine, Router, make_router
from serve.scheduler import QueueFull, Request, Result, Scheduler

__all__ = [
    "DecodePool",
    "DecodeState",
    "Engine",
    "EngineConfig",
    "LeastLoaded",
    "ModelAffine",
    "PoolConfig",
    "Prefix",
    "QueueFull",
    "Request",
    "Result",
    "Router",
    "Scheduler",
    "make_router",
]
