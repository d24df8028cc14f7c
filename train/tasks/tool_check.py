"""The tool task's checker, after BFCL's AST checker for a single call: the right function
name, every required parameter present, no parameter that is unknown or not asked for, and every
value equal to one of its acceptable values, type-aware (an int is accepted for a float, not a
float for an int; a bool is never a number). Strings compare exactly, or as BFCL does (case,
spaces and ,./-_*^ ignored) with ``string_match="bfcl"``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

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
