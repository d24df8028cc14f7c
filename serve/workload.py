"""Seeded synthetic workloads: Poisson arrivals, Zipf(alpha) popularity over task models,
uniform prompt and output lengths. The same seed gives the same requests for every policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from serve.scheduler import Request


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    requests: int = 200
    rate: float = 100.0  # mean arrivals per second (Poisson); 0 = all arrive at once
    zipf_alpha: float = 1.0  # popularity of the k-th model ~ 1 / k**alpha (0 = uniform)
    prompt_len: tuple[int, int] = (8, 64)  # inclusive range, uniform
    output_len: tuple[int, int] = (16, 64)  # max_tokens, inclusive range, uniform
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}={getattr(self, name)} must be a range 1 <= lo <= hi")
            object.__setattr__(self, name, (int(lo), int(hi)))
        if self.requests < 1 or self.rate < 0 or self.zipf_alpha < 0:
            raise ValueError(
                f"need requests >= 1, rate >= 0, zipf_alpha >= 0; got {self.requests=} "
                f"{self.rate=} {self.zipf_alpha=}"
            )


@dataclasses.dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    request: Request


def zipf_weights(m: int, alpha: float) -> np.ndarray:
    """Probabilities [m] of models ranked 1..m under Zipf(alpha)."""
    w = 1.0 / np.arange(1, m + 1, dtype=np.float64) ** alpha
    return w / w.sum()


def make_workload(config: WorkloadConfig, models: Sequence[str], vocab_size: int) -> list[Arrival]:
    """``config.requests`` random-token requests, sorted by arrival time."""
    rng = np.random.default_rng(config.seed)
    n = config.requests
    gaps = rng.exponential(1.0 / config.rate, n) if config.rate > 0 else np.zeros(n)
    at = np.cumsum(gaps) - (gaps[0] if n else 0.0)
    which = rng.choice(len(models), size=n, p=zipf_weights(len(models), config.zipf_alpha))
    plen = rng.integers(config.prompt_len[0], config.prompt_len[1] + 1, n)
    olen = rng.integers(config.output_len[0], config.output_len[1] + 1, n)
    out = []
    for i in range(n):
        prompt = tuple(int(t) for t in rng.integers(0, vocab_size, plen[i]))
        req = Request(
            id=f"req-{i}",
            model=models[which[i]],
            prompt=prompt,
            max_tokens=int(olen[i]),
            temperature=config.temperature,
            seed=i,
        )
        out.append(Arrival(at=float(at[i]), request=req))
    return out
