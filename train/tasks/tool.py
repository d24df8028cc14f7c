"""JSON function calls from given schemas (a BFCL simple-function stand-in).

The system message lists 1-2 (tiny) or 2-3 (small) function signatures, such as
`set_alarm(hour: int, minute?: int)` ("?" marks an optional parameter), the user asks for
something only one of them does, and the target is one JSON object
`{"name": ..., "arguments": {...}}`. Optional parameters are set only when the request says so.

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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from train.tasks.base import Example, Task

NAME = "tool"

Draw = Callable[[random.Random], tuple[str, list]]

_SHORT_TYPES = {"string": "str", "integer": "int", "float": "float", "boolean": "bool"}
# BFCL's Python types of schema types.
_PY_TYPES = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}


@dataclass(frozen=True, kw_only=True)
class _Param:
    """`draw` gives (how the request says the value, acceptable values; the first is the
    target's). An optional parameter's `clause` is added to the request when it is set."""

    name: str
    type: str
    draw: Draw
    clause: str = ""


@dataclass(frozen=True, kw_only=True)
class _Function:
    """`requests` mention each required parameter as {name} and hold {opt} where the clauses of
    the optional parameters that are set go."""

    name: str
    description: str
    requests: tuple[str, ...]
    required: tuple[_Param, ...]
    optional: tuple[_Param, ...] = ()

    def schema(self) -> dict:
        params = (*self.required, *self.optional)
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {
                "type": "dict",
                "properties": {p.name: {"type": p.type} for p in params},
                "required": [p.name for p in self.required],
            },
        }

    def signature(self) -> str:
        params = [f"{p.name}: {_SHORT_TYPES[p.type]}" for p in self.required]
        params += [f"{p.name}?: {_SHORT_TYPES[p.type]}" for p in self.optional]
        return f"{self.name}({', '.join(params)})"


def _pick(*options: str) -> Draw:
    def draw(rng: random.Random) -> tuple[str, list]:
        option = rng.choice(options)
        return option, [option]

    return draw


def _aliases(table: dict[str, tuple[str, ...]]) -> Draw:
    """A value said as written, accepted also under the listed aliases."""

    def draw(rng: random.Random) -> tuple[str, list]:
        key = rng.choice(tuple(table))
        return key, [key, *table[key]]

    return draw


def _int(lo: int, hi: int, step: int = 1) -> Draw:
    def draw(rng: random.Random) -> tuple[str, list]:
        value = rng.randrange(lo, hi + 1, step)
        return str(value), [value]

    return draw


def _amount(lo: int, hi: int) -> Draw:
    """A float said as "40", "12.5" or "7.25"; the target writes it as a float."""

    def draw(rng: random.Random) -> tuple[str, list]:
        cents = rng.choice((0, 0, 50, rng.randrange(5, 100, 5)))
        value = float(f"{rng.randint(lo, hi)}.{cents:02d}")
        return f"{value:g}", [value]

    return draw


def _flag(rng: random.Random) -> tuple[str, list]:
    return "", [True]


_CITIES = _aliases(
    {
        "Paris": (), "London": (), "Tokyo": (), "Berlin": (), "Madrid": (), "Rome": (),
        "Cairo": (), "Lima": (), "Oslo": (), "Seoul": (), "Sydney": (), "Toronto": (),
        "Dublin": (), "Vienna": (), "Lisbon": (), "Nairobi": (), "Delhi": (), "Boston": (),
        "New York": ("New York City", "NYC"), "Los Angeles": ("LA",),
    }
)  # fmt: skip
_CURRENCIES = _pick("USD", "EUR", "GBP", "JPY", "CHF", "CAD")
_LANGUAGES = _aliases(
    {
        "French": ("fr",), "German": ("de",), "Spanish": ("es",), "Italian": ("it",),
        "Japanese": ("ja",), "Dutch": ("nl",),
    }
)  # fmt: skip
_ROOMS = _pick("kitchen", "bedroom", "office", "garage", "hall", "bathroom")

_FUNCTIONS = (
    _Function(
        name="get_weather",
        description="Current weather in a city.",
        requests=("What is the weather in {city}{opt}?", "Weather for {city}{opt}, please."),
        required=(_Param(name="city", type="string", draw=_CITIES),),
        optional=(
            _Param(
                name="unit", type="string", draw=_pick("celsius", "fahrenheit"), clause=" in {v}"
            ),
        ),
    ),
    _Function(
        name="set_alarm",
        description="Set an alarm.",
        requests=("Set an alarm for {hour} o'clock{opt}.", "Wake me at hour {hour}{opt}."),
        required=(_Param(name="hour", type="integer", draw=_int(0, 23)),),
        optional=(
            _Param(name="minute", type="integer", draw=_int(1, 59), clause=" and {v} minutes"),
        ),
    ),
    _Function(
        name="send_email",
        description="Send an email.",
        requests=("Email {to} with the subject {subject}{opt}.",),
        required=(
            _Param(name="to", type="string", draw=_pick("Ana", "Ben", "Mia", "Omar", "Kim")),
            _Param(
                name="subject",
                type="string",
                draw=_pick("lunch", "invoice", "meeting", "report", "trip", "party"),
            ),
        ),
        optional=(_Param(name="urgent", type="boolean", draw=_flag, clause=" and mark it urgent"),),
    ),
    _Function(
        name="convert_currency",
        description="Convert money between currencies.",
        requests=(
            "Convert {amount} {source} to {target}.",
            "How much is {amount} {source} in {target}?",
        ),
        required=(
            _Param(name="amount", type="float", draw=_amount(1, 500)),
            _Param(name="source", type="string", draw=_CURRENCIES),
            _Param(name="target", type="string", draw=_CURRENCIES),
        ),
    ),
    _Function(
        name="play_song",
        description="Play a song.",
        requests=("Play {title}{opt}.", "Put on the song {title}{opt}."),
        required=(
            _Param(
                name="title",
                type="string",
                draw=_pick("Yesterday", "Hello", "Imagine", "Halo", "Wonderwall", "Vogue"),
            ),
        ),
        optional=(
            _Param(name="volume", type="integer", draw=_int(1, 10), clause=" at volume {v}"),
        ),
    ),
    _Function(
        name="book_table",
        description="Reserve a restaurant table.",
        requests=("Book a table at {restaurant} for {people} people{opt}.",),
        required=(
            _Param(
                name="restaurant",
                type="string",
                draw=_pick("Luigi's", "Sakura", "The Oak", "Casa Mia", "Blue Fin"),
            ),
            _Param(name="people", type="integer", draw=_int(1, 12)),
        ),
        optional=(
            _Param(
                name="time", type="string", draw=_pick("18:00", "19:30", "20:00"), clause=" at {v}"
            ),
        ),
    ),
    _Function(
        name="get_stock_price",
        description="Latest price of a stock.",
        requests=(
            "What is the price of {symbol} stock?",
            "Quote {symbol} for me.",
            "How much is one {symbol} share?",
        ),
        required=(
            _Param(
                name="symbol",
                type="string",
                draw=_pick("AAPL", "MSFT", "GOOG", "TSLA", "NVDA", "AMZN", "META", "IBM", "INTC"),
            ),
        ),
    ),
    _Function(
        name="translate",
        description="Translate text.",
        requests=("Translate '{text}' into {language}.", "Say '{text}' in {language}."),
        required=(
            _Param(
                name="text",
                type="string",
                draw=_pick("good morning", "thank you", "see you soon", "where is the station"),
            ),
            _Param(name="language", type="string", draw=_LANGUAGES),
        ),
    ),
    _Function(
        name="calculate_tip",
        description="Tip for a bill.",
        requests=("What is a {percent} percent tip on {bill} dollars?",),
        required=(
            _Param(name="bill", type="float", draw=_amount(5, 300)),
            _Param(name="percent", type="integer", draw=_int(5, 30, 5)),
        ),
    ),
    _Function(
        name="set_thermostat",
        description="Set a room's temperature.",
        requests=("Set the thermostat to {temperature} degrees{opt}.",),
        required=(_Param(name="temperature", type="float", draw=_amount(15, 28)),),
        optional=(_Param(name="room", type="string", draw=_ROOMS, clause=" in the {v}"),),
    ),
    _Function(
        name="search_flights",
        description="Find flights.",
        requests=("Find flights from {origin} to {destination}{opt}.",),
        required=(
            _Param(name="origin", type="string", draw=_CITIES),
            _Param(name="destination", type="string", draw=_CITIES),
        ),
        optional=(
            _Param(
                name="date",
                type="string",
                draw=_pick("2025-03-01", "2025-06-15", "2025-09-30", "2025-12-24"),
                clause=" on {v}",
            ),
        ),
    ),
    _Function(
        name="add_todo",
        description="Add a to-do item.",
        requests=("Add '{task}' to my to-do list{opt}.",),
        required=(
            _Param(
                name="task",
                type="string",
                draw=_pick("buy milk", "call mom", "pay rent", "water plants", "fix bike"),
            ),
        ),
        optional=(
            _Param(name="priority", type="integer", draw=_int(1, 5), clause=" with priority {v}"),
        ),
    ),
    _Function(
        name="turn_on_lights",
        description="Turn on a room's lights.",
        requests=("Turn on the lights in the {room}{opt}.", "Lights on in the {room}{opt}."),
        required=(_Param(name="room", type="string", draw=_ROOMS),),
        optional=(
            _Param(
                name="brightness",
                type="integer",
                draw=_int(10, 100, 10),
                clause=" at {v} percent",
            ),
        ),
    ),
    _Function(
        name="get_time",
        description="Local time in a city.",
        requests=("What time is it in {city}?", "Tell me the time in {city}."),
        required=(_Param(name="city", type="string", draw=_CITIES),),
    ),
    _Function(
        name="create_reminder",
        description="Remind the user later.",
        requests=("Remind me to {text} in {minutes} minutes.",),
        required=(
            _Param(
                name="text", type="string", draw=_pick("stretch", "check the oven", "drink water")
            ),
            _Param(name="minutes", type="integer", draw=_int(1, 90)),
        ),
    ),
    _Function(
        name="order_pizza",
        description="Order pizza.",
        requests=("Order {count} {size} pizzas{opt}.",),
        required=(
            _Param(name="size", type="string", draw=_pick("small", "medium", "large")),
            _Param(name="count", type="integer", draw=_int(2, 9)),
        ),
        optional=(
            _Param(name="extra_cheese", type="boolean", draw=_flag, clause=" with extra cheese"),
        ),
    ),
    _Function(
        name="start_timer",
        description="Start a countdown timer.",
        requests=("Start a timer for {minutes} minutes{opt}.",),
        required=(_Param(name="minutes", type="integer", draw=_int(1, 60)),),
        optional=(
            _Param(
                name="label",
                type="string",
                draw=_pick("tea", "pasta", "eggs", "laundry"),
                clause=" called {v}",
            ),
        ),
    ),
    _Function(
        name="get_distance",
        description="Distance between two cities.",
        requests=("How far is {origin} from {destination}{opt}?",),
        required=(
            _Param(name="origin", type="string", draw=_CITIES),
            _Param(name="destination", type="string", draw=_CITIES),
        ),
        optional=(_Param(name="unit", type="string", draw=_pick("km", "miles"), clause=" in {v}"),),
    ),
)

# difficulty -> (fewest, most functions listed, chance that an optional parameter is set, header
# of the system message: "tiny" saves the instruction's tokens, a fine-tuned model needs none)
_LEVELS = {
    "tiny": (1, 2, 0.3, "Functions:\n"),
    "small": (2, 3, 0.5, "Answer with one JSON function call. Functions:\n"),
}


def sample(rng: random.Random, difficulty: str) -> Example:
    fewest, most, p_optional, header = _LEVELS[difficulty]
    listed = rng.sample(_FUNCTIONS, rng.randint(fewest, most))
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


def parse_call(text: str) -> dict | None:
    """The first JSON object in `text` shaped like a call, as {"name": str, "arguments": dict}.

    Surrounding prose and code fences are skipped; "parameters" is accepted for "arguments", and
    arguments given as a JSON string are decoded.
    """
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                continue
        if isinstance(arguments, dict):
            return {"name": obj["name"], "arguments": arguments}
    return None


def _standardize(text: str) -> str:
    """BFCL's string normalisation: drop spaces and ,./-_*^, lowercase, ' -> "."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _first_set(options: Sequence) -> object:
    return next((o for o in options if o != ""), None)


def _type_ok(value: object, spec: dict, options: Sequence) -> bool:
    """BFCL's type check of a parameter value against its schema `spec`.

    The value must have the schema's type or that of the first acceptable value (BFCL's
    "variable" case); list items must have the schema's item type or that of the first item of
    an acceptable list (no int -> float here, as in BFCL).
    """
    expected = _PY_TYPES.get(spec.get("type", ""))
    if expected is None:
        return True
    first = _first_set(options)
    if type(value) is not expected:
        return first is not None and type(value) is type(first)
    item_type = _PY_TYPES.get(spec.get("items", {}).get("type", "")) if expected is list else None
    if item_type is None:
        return True

    def items_ok(option: object) -> bool:
        if not isinstance(option, list):
            return True
        first_item = _first_set(option)
        return all(
            type(v) is item_type or (first_item is not None and type(v) is type(first_item))
            for v in value
        )

    return any(items_ok(o) for o in options)


def value_matches(value: object, expected: object, *, type_: str | None, bfcl: bool) -> bool:
    """Whether `value` equals the acceptable value `expected` of a parameter of type `type_`.

    Numbers compare numerically, but an "integer" parameter needs an int and a bool is never a
    number. Lists compare item by item. A dict `expected` maps each key to its acceptable values
    (BFCL's form), "" among them meaning the key may be left out. `bfcl` compares strings after
    BFCL's normalisation instead of exactly.
    """
    if isinstance(expected, bool) or expected is None:
        return type(value) is type(expected) and value == expected
    if isinstance(expected, int | float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return value == expected and (type_ != "integer" or isinstance(value, int))
    if isinstance(expected, str):
        if not isinstance(value, str):
            return False
        return value == expected or (bfcl and _standardize(value) == _standardize(expected))
    if isinstance(expected, list):
        return (
            isinstance(value, list)
            and len(value) == len(expected)
            and all(
                value_matches(v, e, type_=None, bfcl=bfcl)
                for v, e in zip(value, expected, strict=True)
            )
        )
    if isinstance(expected, dict):
        if not isinstance(value, dict) or not set(value) <= set(expected):
            return False
        for key, options in expected.items():
            options = options if isinstance(options, list) else [options]
            if key not in value:
                if "" not in options:
                    return False
            elif not any(
                value_matches(value[key], o, type_=None, bfcl=bfcl) for o in options if o != ""
            ):
                return False
        return True
    return False


def check_call(
    completion: str, *, functions: Sequence[dict], answer: dict, string_match: str = "exact"
) -> bool:
    """BFCL-style check of the one call in `completion` against `answer` (see module doc)."""
    if string_match not in ("exact", "bfcl"):
        raise ValueError(f"unknown {string_match=}; expected 'exact' or 'bfcl'")
    call = parse_call(completion)
    if call is None or call["name"] != answer["name"]:
        return False
    schema = next((f for f in functions if f["name"] == call["name"]), None)
    if schema is None:
        return False
    properties = schema["parameters"]["properties"]
    given = call["arguments"]
    expected = answer["arguments"]
    if any(p not in given for p in schema["parameters"].get("required", [])):
        return False
    for param in expected:
        if param not in given and param not in answer["omittable"]:
            return False
    for param, value in given.items():
        if param not in properties or param not in expected:
            return False
        spec = properties[param]
        if spec.get("type") == "float" and type(value) is int:
            value = float(value)
        if not _type_ok(value, spec, expected[param]):
            return False
        if not any(
            value_matches(value, option, type_=spec.get("type"), bfcl=string_match == "bfcl")
            for option in expected[param]
        ):
            return False
    return True


def check(example: Example, completion: str) -> bool:
    return check_call(
        completion,
        functions=example.meta["functions"],
        answer=example.meta["answer"],
        string_match=example.meta["string_match"],
    )


TASK = Task(name=NAME, sampler=sample, checker=check)
