"""Multi-step arithmetic word problems with a numeric answer (a GSM8K stand-in).

The target works the problem one equation per line and ends with a GSM8K-style "#### N" line;
the checker reads the last number of a completion, as GSM8K evaluation does.

    tiny:  start 2..20, two steps of + / - with operands 1..9, one sentence.
    small: start 10..99, three or four steps out of + / - / doubling / halving / packs of c.
    medium: start 100..999, five or six of those steps, with operands up to 250 and packs of up
            to 9 x 25.
"""

from __future__ import annotations

import random
import re

from train.tasks.base import Example, Task

NAME = "arith"

_PEOPLE = (
    "Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Zoe", "Leo", "Ivy",
    "Dan", "Eva", "Raj", "Kim", "Omar", "Lina", "Paul", "Nora", "Ravi", "Sara",
)  # fmt: skip
_ITEMS = (
    "apples", "marbles", "stickers", "books", "pens", "cards", "coins", "shells",
    "stamps", "cookies", "balloons", "candles", "rocks", "toys", "beads", "eggs",
)  # fmt: skip
_CONTAINERS = ("boxes", "bags", "packs", "jars")
_GAIN = ("buys {k} more", "finds {k} more", "gets {k} more from {friend}", "wins {k} more")
_LOSS = ("gives away {k}", "loses {k}", "gives {k} to {friend}", "sells {k}")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _gain(rng: random.Random, friend: str, x: int, k: int) -> tuple[str, list[str], int]:
    phrase = rng.choice(_GAIN).format(k=k, friend=friend)
    return phrase, [f"{x} + {k} = {x + k}"], x + k


def _loss(rng: random.Random, friend: str, x: int, k: int) -> tuple[str, list[str], int]:
    phrase = rng.choice(_LOSS).format(k=k, friend=friend)
    return phrase, [f"{x} - {k} = {x - k}"], x - k


# difficulty -> (largest operand of + / -, most packs, most items per pack, largest count that
# may be doubled or tripled); "tiny" has its own two-step story
_LEVELS = {"small": (50, 6, 12, 200), "medium": (250, 9, 25, 1000)}
# difficulty -> (smallest, largest starting count, fewest, most steps)
_STORY = {"tiny": (2, 20, 2, 2), "small": (10, 99, 3, 4), "medium": (100, 999, 5, 6)}


def _step(
    rng: random.Random, friend: str, items: str, x: int, difficulty: str
) -> tuple[str, list[str], int]:
    """One operation on the running count `x`: (phrase, equation lines, new count)."""
    if difficulty == "tiny":
        if x > 1 and rng.random() < 0.5:
            return _loss(rng, friend, x, rng.randint(1, min(9, x - 1)))
        return _gain(rng, friend, x, rng.randint(1, 9))
    k_max, b_max, c_max, mult_max = _LEVELS[difficulty]
    kinds = ["gain", "loss", "packs"]
    if x <= mult_max:
        kinds += ["double", "triple"]
    if x % 2 == 0:
        kinds.append("half")
    kind = rng.choice(kinds) if x > 1 else "gain"
    if kind == "gain":
        return _gain(rng, friend, x, rng.randint(1, k_max))
    if kind == "loss":
        return _loss(rng, friend, x, rng.randint(1, min(k_max, x - 1)))
    if kind == "packs":
        b, c = rng.randint(2, b_max), rng.randint(2, c_max)
        phrase = f"buys {b} {rng.choice(_CONTAINERS)} of {c} {items}"
        return phrase, [f"{b} * {c} = {b * c}", f"{x} + {b * c} = {x + b * c}"], x + b * c
    if kind == "half":
        return f"gives half of the {items} to {friend}", [f"{x} / 2 = {x // 2}"], x // 2
    factor = 2 if kind == "double" else 3
    phrase = f"{kind}s the number of {items}"
    return phrase, [f"{x} * {factor} = {x * factor}"], x * factor


def sample(rng: random.Random, difficulty: str) -> Example:
    person, friend = rng.sample(_PEOPLE, 2)
    items = rng.choice(_ITEMS)
    lo, hi, fewest, most = _STORY[difficulty]
    x = rng.randint(lo, hi)
    start = x
    phrases: list[str] = []
    lines: list[str] = []
    for _ in range(fewest if fewest == most else rng.randint(fewest, most)):
        phrase, eqs, x = _step(rng, friend, items, x, difficulty)
        phrases.append(phrase)
        lines.extend(eqs)
    question = f"How many {items} does {person} have now?"
    if difficulty == "tiny":
        story = f"{person} has {start} {items}, {phrases[0]} and {phrases[1]}."
    else:
        story = f"{person} has {start} {items}. " + " ".join(f"Then {person} {p}." for p in phrases)
    return Example(
        task=NAME,
        messages=({"role": "user", "content": f"{story} {question}"},),
        target="\n".join([*lines, f"#### {x}"]),
        meta={"answer": x},
    )


def extract_number(text: str) -> float | None:
    """The last number in `text` (thousands commas allowed), or None if there is none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return float(matches[-1].replace(",", ""))


def check(example: Example, completion: str) -> bool:
    value = extract_number(completion)
    return value is not None and abs(value - example.meta["answer"]) < 1e-6


ERROR_KINDS = ("correct", "result", "operands", "steps")


def error_kind(example: Example, completion: str) -> str:
    """Where a completion first leaves the reference working, one of ``ERROR_KINDS``:
    ``correct`` (the checker accepts it); ``result``: the first line that differs has the
    reference's left side but another result (an arithmetic slip); ``operands``: it has another
    left side (a number copied wrong, or another operation); ``steps``: every line it shares with
    the reference is right, but it stops early, goes on, or answers before the last step."""
    if check(example, completion):
        return "correct"
    lines = zip(example.target.splitlines(), completion.strip().splitlines(), strict=False)
    for want, got in lines:
        if want.strip() == got.strip():
            continue
        if want.startswith("####") or got.startswith("####") or "=" not in got:
            return "steps"
        same_left = want.split("=")[0].strip() == got.split("=")[0].strip()
        return "result" if same_left else "operands"
    return "steps"


_EQUATION = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


def equation_accuracy(completions: list[str]) -> dict[str, list[int]]:
    """How often the equations a model writes are right, whatever the problem: for each
    operation and size (``"+ small"``, ``"* large"``: an operand or the true result of 100 or
    more) ``[right, written]`` over every ``a op b = c`` line of ``completions``."""
    out: dict[str, list[int]] = {}
    for completion in completions:
        for line in completion.splitlines():
            m = _EQUATION.match(line)
            if not m or (m[2] == "/" and int(m[3]) == 0):
                continue
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            true = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            size = "large" if max(abs(a), abs(b), abs(true)) >= 100 else "small"
            tally = out.setdefault(f"{op} {size}", [0, 0])
            tally[0] += c == true
            tally[1] += 1
    return dict(sorted(out.items()))


TASK = Task(name=NAME, sampler=sample, checker=check)
