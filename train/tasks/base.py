"""Shared pieces of the task families: the example type, the generator and split logic.

Every task draws examples from a seeded `random.Random`. Splits are made disjoint by the text of
the user request, not by the seed: each request hashes into one of `_BUCKETS` buckets, bucket 0
belongs to "test", bucket 1 to "val" and the rest to "train", and a sampler's draws that land in
another split's bucket are dropped. Two splits therefore never share a user request, whatever
seeds they are generated with. The seed stream differs per split as well, so a split's examples
do not shift when another split is regenerated.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")
DIFFICULTIES = ("tiny", "small", "medium")

_BUCKETS = 10
_SPLIT_BUCKETS = {"test": frozenset({0}), "val": frozenset({1}), "train": frozenset(range(2, 10))}
# A split whose prompts run out shows as this many draws in a row that bring nothing new.
_MAX_MISSES = 20_000

Message = Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class Example:
    """One prompt with its reference response and what the checker needs.

    `messages` is the prompt as chat messages (dicts with "role" and "content"), `target` the
    response text a model is trained on, `meta` the checker's data (JSON-compatible).
    """

    task: str
    messages: tuple[Message, ...]
    target: str
    meta: dict = field(default_factory=dict)

    @property
    def user_text(self) -> str:
        """The content of the last user message: the request that defines the split."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


Sampler = Callable[[random.Random, str], Example]
Checker = Callable[[Example, str], bool]


@dataclass(frozen=True, kw_only=True)
class Task:
    """A task family: a seeded example sampler and a checker of completions, at the
    `difficulties` its sampler knows (a subset of DIFFICULTIES)."""

    name: str
    sampler: Sampler
    checker: Checker
    difficulties: tuple[str, ...] = DIFFICULTIES

    def generate(
        self, n: int, *, split: str, seed: int = 0, difficulty: str = "tiny"
    ) -> list[Example]:
        """Returns `n` examples of `split`; the same arguments always give the same examples.

        "train" may repeat a prompt (its space can be small at "tiny"); "val" and "test" never
        do, and raise ValueError when their prompts run out (_MAX_MISSES draws in a row bring
        nothing new) before `n` are found.
        The first k examples of a call with n > k are the examples of the call with n = k.
        """
        if n < 1:
            raise ValueError(f"{n=} must be at least 1")
        if split not in SPLITS:
            raise ValueError(f"unknown {split=}; expected one of {SPLITS}")
        if difficulty not in self.difficulties:
            raise ValueError(
                f"unknown {difficulty=} for task {self.name!r}; expected one of {self.difficulties}"
            )
        rng = random.Random(f"{self.name}/{difficulty}/{split}/{seed}")
        buckets = _SPLIT_BUCKETS[split]
        unique = split != "train"
        seen: set[str] = set()
        out: list[Example] = []
        misses = 0
        while misses < _MAX_MISSES:
            example = self.sampler(rng, difficulty)
            text = example.user_text
            if split_bucket(text) not in buckets or (unique and text in seen):
                misses += 1
                continue
            misses = 0
            seen.add(text)
            out.append(example)
            if len(out) == n:
                return out
        raise ValueError(
            f"found only {len(out)} unique {split!r} prompts for task {self.name!r} at "
            f"{difficulty=}; requested {n=}"
        )

    def check(self, example: Example, completion: str) -> bool:
        """True if `completion` is a correct response to `example`."""
        if example.task != self.name:
            raise ValueError(f"{example.task=} cannot be checked by task {self.name!r}")
        return self.checker(example, completion)


def split_bucket(text: str) -> int:
    """The hash bucket (0 .. _BUCKETS - 1) a user request belongs to; stable across runs."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % _BUCKETS
