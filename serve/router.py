"""Routers: which decode worker takes a prefilled request.

A router sees the request's model and each worker's free-slot count and returns a worker
index, or ``None`` when no allowed worker has a free slot (the request waits in the queue).

* ``LeastLoaded`` (SUN): any worker can decode any model; take the one with most free slots.
* ``ModelAffine`` (conventional): each model owns fixed workers holding its weights; its
  requests go only there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class Router(Protocol):
    name: str

    def workers_for(self, model: str) -> Sequence[int]: ...

    def pick(self, model: str, free: Sequence[int]) -> int | None: ...


def _most_free(candidates: Sequence[int], free: Sequence[int]) -> int | None:
    best = max(candidates, key=lambda w: (free[w], -w), default=None)
    return best if best is not None and free[best] > 0 else None


class LeastLoaded:
    name = "least_loaded"

    def __init__(self, workers: int):
        self.workers = workers

    def workers_for(self, model: str) -> Sequence[int]:
        return range(self.workers)

    def pick(self, model: str, free: Sequence[int]) -> int | None:
        return _most_free(range(len(free)), free)


class ModelAffine:
    name = "model_affine"

    def __init__(self, assignment: Mapping[str, Sequence[int]]):
        owners: dict[int, str] = {}
        for model, workers in assignment.items():
            if not workers:
                raise ValueError(f"model {model!r} is assigned no workers")
            for w in workers:
                if w in owners:
                    raise ValueError(f"worker {w} is assigned to {owners[w]!r} and {model!r}")
                owners[w] = model
        self.assignment = {m: tuple(ws) for m, ws in assignment.items()}

    @classmethod
    def split(cls, models: Sequence[str], workers: int) -> ModelAffine:
        """Give each model ``workers // len(models)`` workers (the first ones get the rest)."""
        if len(models) > workers:
            raise ValueError(
                f"model_affine needs a worker per model: {len(models)} models > {workers=}"
            )
        share, extra = divmod(workers, len(models))
        assignment, start = {}, 0
        for i, model in enumerate(models):
            n = share + (i < extra)
            assignment[model] = tuple(range(start, start + n))
            start += n
        return cls(assignment)

    def owner(self, worker: int) -> str:
        return next(m for m, ws in self.assignment.items() if worker in ws)

    def workers_for(self, model: str) -> Sequence[int]:
        if model not in self.assignment:
            raise ValueError(f"unknown model {model!r}; known: {sorted(self.assignment)}")
        return self.assignment[model]

    def pick(self, model: str, free: Sequence[int]) -> int | None:
        return _most_free(self.workers_for(model), free)
