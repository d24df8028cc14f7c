"""The function table of the tool task: schemas, how each argument is drawn and phrased, and
the requests that ask for each function (a BFCL simple-function stand-in).

`FUNCTIONS` take flat arguments; `NESTED_FUNCTIONS` (listed only at "medium") take an object
(`{city: str, street: str}`) or a list (`list[str]`) as an argument, as many BFCL entries do."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Draw = Callable[[random.Random], tuple[str, list]]

_SHORT_TYPES = {"string": "str", "integer": "int", "float": "float", "boolean": "bool"}


def short_type(spec: dict) -> str:
    """A JSON-schema parameter type (BFCL's dialect) as the signatures write it: ``str``,
    ``list[int]``, ``{street: str, city: str}``; types the synthetic task never uses
    (``tuple``, ``any``, a ``dict`` without properties) keep their own name."""
    kind = spec.get("type", "any")
    if kind == "array":
        return f"list[{short_type(spec.get('items', {}))}]"
    if kind == "dict" and "properties" in spec:
        fields = ", ".join(f"{k}: {short_type(v)}" for k, v in spec["properties"].items())
        return "{" + fields + "}"
    return _SHORT_TYPES.get(kind, kind)


def schema_signature(function: dict) -> str:
    """A BFCL function schema in the synthetic tool task's signature form,
    ``name(required: type, optional?: type)``, so a module fine-tuned on the synthetic task
    reads real BFCL functions in the form it was trained on."""
    params = function.get("parameters", {})
    required = params.get("required", [])
    props = params.get("properties", {})
    items = [f"{k}: {short_type(props[k])}" for k in required if k in props]
    items += [f"{k}?: {short_type(v)}" for k, v in props.items() if k not in required]
    return f"{function['name']}({', '.join(items)})"


@dataclass(frozen=True, kw_only=True)
class _Param:
    """`draw` gives (how the request says the value, acceptable values; the first is the
    target's). An optional parameter's `clause` is added to the request when it is set."""

    name: str
    type: str
    draw: Draw
    clause: str = ""
    fields: tuple[tuple[str, str], ...] = ()  # a "dict" parameter's (field, type), all required
    items: str = ""  # an "array" parameter's item type

    def spec(self) -> dict:
        """The BFCL-style schema of the parameter."""
        if self.type == "dict":
            return {
                "type": "dict",
                "properties": {f: {"type": t} for f, t in self.fields},
                "required": [f for f, _ in self.fields],
            }
        if self.type == "array":
            return {"type": "array", "items": {"type": self.items}}
        return {"type": self.type}

    def short(self) -> str:
        """The parameter's type as the signature writes it."""
        if self.type == "dict":
            return "{" + ", ".join(f"{f}: {_SHORT_TYPES[t]}" for f, t in self.fields) + "}"
        if self.type == "array":
            return f"list[{_SHORT_TYPES[self.items]}]"
        return _SHORT_TYPES[self.type]


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
                "properties": {p.name: p.spec() for p in params},
                "required": [p.name for p in self.required],
            },
        }

    def signature(self) -> str:
        params = [f"{p.name}: {p.short()}" for p in self.required]
        params += [f"{p.name}?: {p.short()}" for p in self.optional]
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


def _and(words: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _names(lo: int, hi: int) -> Draw:
    """A list of distinct names said as "Ana, Ben and Mia", in that order."""

    def draw(rng: random.Random) -> tuple[str, list]:
        names = rng.sample(_PEOPLE, rng.randint(lo, hi))
        return _and(names), [names]

    return draw


def _hours(rng: random.Random) -> tuple[str, list]:
    """A list of 2-3 increasing hours said as "7, 12 and 19"."""
    hours = sorted(rng.sample(range(24), rng.randint(2, 3)))
    return _and([str(h) for h in hours]), [hours]


def _record(say: str, **draws: Draw) -> Draw:
    """An object whose fields are drawn by `draws`, said as `say` formatted with the fields'
    phrases ("{street} in {city}")."""

    def draw(rng: random.Random) -> tuple[str, list]:
        said, value = {}, {}
        for field, d in draws.items():
            said[field], options = d(rng)
            value[field] = options[0]
        return say.format(**said), [value]

    return draw


_PEOPLE = ("Ana", "Ben", "Mia", "Omar", "Kim", "Leo", "Sara", "Raj")
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

FUNCTIONS = (
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

_DATES = _pick("2025-03-01", "2025-06-15", "2025-09-30", "2025-12-24")

NESTED_FUNCTIONS = (
    _Function(
        name="create_event",
        description="Put an event in the calendar.",
        requests=(
            "Create an event called {title} on {when}{opt}.",
            "Schedule {title} for {when}{opt}.",
        ),
        required=(
            _Param(name="title", type="string", draw=_pick("standup", "dentist", "yoga", "review")),
            _Param(
                name="when",
                type="dict",
                draw=_record("{date} at hour {hour}", date=_DATES, hour=_int(6, 20)),
                fields=(("date", "string"), ("hour", "integer")),
            ),
        ),
        optional=(
            _Param(
                name="attendees",
                type="array",
                items="string",
                draw=_names(1, 3),
                clause=" with {v}",
            ),
        ),
    ),
    _Function(
        name="ship_package",
        description="Send a parcel to an address.",
        requests=(
            "Ship a {weight} kg package to {address}{opt}.",
            "Send {weight} kg to {address}{opt}.",
        ),
        required=(
            _Param(name="weight", type="float", draw=_amount(1, 30)),
            _Param(
                name="address",
                type="dict",
                draw=_record(
                    "{street} in {city}",
                    street=_pick("Oak Street", "Main Street", "Hill Road", "Park Lane"),
                    city=_pick("Paris", "Oslo", "Lima", "Rome", "Seoul"),
                ),
                fields=(("street", "string"), ("city", "string")),
            ),
        ),
        optional=(_Param(name="express", type="boolean", draw=_flag, clause=" by express"),),
    ),
    _Function(
        name="message_group",
        description="Send one text message to several people.",
        requests=("Text {recipients} saying '{text}'.", "Send '{text}' to {recipients}."),
        required=(
            _Param(name="recipients", type="array", items="string", draw=_names(2, 4)),
            _Param(name="text", type="string", draw=_pick("running late", "on my way", "call me")),
        ),
    ),
    _Function(
        name="schedule_device",
        description="Switch a device on at given hours.",
        requests=("Turn on the {device} at {hours} o'clock every day.",),
        required=(
            _Param(name="device", type="string", draw=_pick("heater", "fan", "sprinkler", "radio")),
            _Param(name="hours", type="array", items="integer", draw=_hours),
        ),
    ),
    _Function(
        name="search_products",
        description="Find products in a price range.",
        requests=("Show me {category} priced {price} dollars{opt}.",),
        required=(
            _Param(name="category", type="string", draw=_pick("shoes", "lamps", "tents", "books")),
            _Param(
                name="price",
                type="dict",
                draw=_record("from {low} to {high}", low=_int(5, 50), high=_int(60, 400)),
                fields=(("low", "integer"), ("high", "integer")),
            ),
        ),
        optional=(
            _Param(
                name="sort_by",
                type="string",
                draw=_pick("price", "rating"),
                clause=", sorted by {v}",
            ),
        ),
    ),
)
