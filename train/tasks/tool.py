"""JSON function calls from given schemas (a BFCL simple-function stand-in).

The system message lists 1-2 (tiny), 2-3 (small) or 4-6 (medium) function signatures, such as
`set_alarm(hour: int, minute?: int)` ("?" marks an optional parameter), the user asks for
something only one of them does, and the target is one JSON object
`{"name": ..., "arguments": {...}}`. Optional parameters are set only when the request says so.
At "medium" half of the requests call a function with an object or list argument
(`ship_package(weight: float, address: {street: str, city: str}, express?: bool)`), and those
functions are among the ones listed.

The checker follows BFCL's AST checker for a single call: the right function name, every required
parameter present, no parameter that is unknown or not asked for, and every value equal to one of
its acceptable values, type-aware (an int is accepted for a float, not a float for an int; a bool
is never a number). Synthetic examples compare strings exactly; examples from
`load_bfcl_simple_python` compare them as BFCL does (case, spaces and ,./-_*^ ignored).

`meta` holds `functions` (BFCL-style schemas: name, description, parameters.properties /
.required), `answer` (`name`; `arguments`: parameter -> list of acceptable values; `omittable`:
the answer's parameters that may be left out) and `string_match` ("exact" or "bfcl").
"""

from __future__ import annotations

import json
import random

from train.tasks.base import Example, Task
from train.tasks.tool_check import check_call, parse_call
from train.tasks.tool_functions import FUNCTIONS, NESTED_FUNCTIONS

NAME = "tool"

__all__ = ["NAME", "TASK", "check", "check_call", "parse_call", "sample"]


# difficulty -> (fewest, most functions listed, chance that an optional parameter is set, header
# of the system message: "tiny" saves the instruction's tokens, a fine-tuned model needs none)
_LEVELS = {
    "tiny": (1, 2, 0.3, "Functions:\n"),
    "small": (2, 3, 0.5, "Answer with one JSON function call. Functions:\n"),
    "medium": (4, 6, 0.5, "Answer with one JSON function call. Functions:\n"),
}


def sample(rng: random.Random, difficulty: str) -> Example:
    fewest, most, p_optional, header = _LEVELS[difficulty]
    if difficulty == "medium":
        n = rng.randint(fewest, most)
        nested = rng.randint(1, 2)
        listed = [*rng.sample(NESTED_FUNCTIONS, nested), *rng.sample(FUNCTIONS, n - nested)]
        if rng.random() < 0.5:  # call a flat function half of the time
            listed.insert(0, listed.pop(nested))
    else:
        listed = rng.sample(FUNCTIONS, rng.randint(fewest, most))
    fn = listed[0]
    rng.shuffle(listed)
    phrases: dict[str, str] = {}
    arguments: dict[str, list] = {}
    clauses = ""
    for param in fn.required:
        phrase, values = param.draw(rng)
        while phrase in phrases.values():  # e.g. no flight from Paris to Paris
            phrase, values = param.draw(rng)
        phrases[param.name], arguments[param.name] = phrase, values
    for param in fn.optional:
        if rng.random() < p_optional:
            phrase, arguments[param.name] = param.draw(rng)
            clauses += param.clause.format(v=phrase)
    request = rng.choice(fn.requests).format(opt=clauses, **phrases)
    system = header + "\n".join(f.signature() for f in listed)
    target = {"name": fn.name, "arguments": {k: v[0] for k, v in arguments.items()}}
    return Example(
        task=NAME,
        messages=({"role": "system", "content": system}, {"role": "user", "content": request}),
        target=json.dumps(target),
        meta={
            "functions": [f.schema() for f in listed],
            "answer": {"name": fn.name, "arguments": arguments, "omittable": []},
            "string_match": "exact",
        },
    )


def check(example: Example, completion: str) -> bool:
    return check_call(
        completion,
        functions=example.meta["functions"],
        answer=example.meta["answer"],
        string_match=example.meta["string_match"],
    )


TASK = Task(name=NAME, sampler=sample, checker=check, difficulties=tuple(_LEVELS))
