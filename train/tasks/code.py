"""Small Python function tasks (a HumanEval stand-in) checked by hidden tests in a sandbox.

Each example comes from a template with random constants, function and parameter names; the
target is the function's source and the hidden tests are asserts on inputs that include the
boundary cases of the constants (so an off-by-one constant fails).

    tiny:  one-line bodies with one constant (x + k, xs[:k], s * k, x > k, ...).
    small: two constants or a branch (clamp, parity, filters, counts, fizz-style, ...).
    medium: bodies of three to nine lines: a loop with an accumulator or an early return, state
            carried across items (runs, running totals, rotation), digit and string walks, a
            loop over a range with two conditions, dict building.

Examples from `load_humaneval` use the same checker: `meta["prefix"]` (the HumanEval prompt) is
put before the completion's code and `meta["tests"]` after it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from train.tasks.base import Example, Task
from train.tasks.sandbox import DEFAULT_TIMEOUT_S, extract_code, run_python

NAME = "code"

_PARAMS = {
    "int": ("x", "n", "num", "value"),
    "list": ("xs", "nums", "values", "items"),
    "str": ("s", "text", "word", "name"),
}
_LETTERS = "abcdefghijklmnoprstu"

Consts = dict[str, int | str]


@dataclass(frozen=True, kw_only=True)
class _Template:
    """A family of functions of one argument.

    `names`, `phrasings` and `body` are format strings over the constants and `p` (the parameter
    name); `consts` draws the constants and `inputs` the test arguments for them.
    """

    kind: str
    names: tuple[str, ...]
    phrasings: tuple[str, ...]
    body: str
    consts: Callable[[random.Random], Consts]
    inputs: Callable[[random.Random, Consts], list]


def _ints(rng: random.Random, k: int = 0, lo: int = -50, hi: int = 50) -> list[int]:
    """Test integers: the neighbourhood of the constant `k` plus two random ones."""
    return [k - 1, k, k + 1, rng.randint(lo, hi), rng.randint(lo, hi)]


def _int_lists(rng: random.Random, min_len: int, *special: int) -> list[list[int]]:
    lists = [
        [rng.randint(-20, 40) for _ in range(rng.randint(min_len, min_len + 4))] for _ in range(4)
    ]
    lists.append([*special, *(rng.randint(-20, 40) for _ in range(min_len))])
    return lists


def _words(rng: random.Random, *, must_have: str = "", lo: int = 2, hi: int = 8) -> list[str]:
    out = []
    for _ in range(5):
        chars = [rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi))]
        if must_have:
            chars.insert(rng.randint(0, len(chars)), must_have)
        out.append("".join(chars))
    return out


def _k(lo: int, hi: int) -> Callable[[random.Random], Consts]:
    return lambda rng: {"k": rng.randint(lo, hi)}


def _a_b(lo: int, hi: int) -> Callable[[random.Random], Consts]:
    """Two different constants in [lo, hi]."""
    return lambda rng: dict(zip("ab", rng.sample(range(lo, hi + 1), 2), strict=True))


def _two_letters(rng: random.Random) -> Consts:
    c, d = rng.sample(_LETTERS, 2)
    return {"c": c, "d": d}


_TINY = (
    _Template(
        kind="int",
        names=("add_{k}", "plus_{k}"),
        phrasings=("{p} plus {k}", "{p} increased by {k}"),
        body="return {p} + {k}",
        consts=_k(1, 50),
        inputs=lambda rng, c: _ints(rng),
    ),
    _Template(
        kind="int",
        names=("sub_{k}", "minus_{k}"),
        phrasings=("{p} minus {k}", "{p} decreased by {k}"),
        body="return {p} - {k}",
        consts=_k(1, 50),
        inputs=lambda rng, c: _ints(rng),
    ),
    _Template(
        kind="int",
        names=("times_{k}", "mul_{k}"),
        phrasings=("{p} times {k}", "{p} multiplied by {k}"),
        body="return {p} * {k}",
        consts=_k(2, 20),
        inputs=lambda rng, c: _ints(rng, 2),
    ),
    _Template(
        kind="int",
        names=("above_{k}", "greater_{k}"),
        phrasings=("True if {p} is greater than {k}, else False", "whether {p} is above {k}"),
        body="return {p} > {k}",
        consts=_k(-20, 50),
        inputs=lambda rng, c: _ints(rng, c["k"]),
    ),
    _Template(
        kind="int",
        names=("is_{k}", "equals_{k}"),
        phrasings=("True if {p} equals {k}, else False", "whether {p} is equal to {k}"),
        body="return {p} == {k}",
        consts=_k(-20, 50),
        inputs=lambda rng, c: _ints(rng, c["k"]),
    ),
    _Template(
        kind="int",
        names=("mod_{k}", "rem_{k}"),
        phrasings=("the remainder of {p} divided by {k}", "{p} modulo {k}"),
        body="return {p} % {k}",
        consts=_k(2, 20),
        inputs=lambda rng, c: _ints(rng, c["k"], 0, 200),
    ),
    _Template(
        kind="list",
        names=("first_{k}", "head_{k}"),
        phrasings=("the first {k} items of the list {p}", "a list of the first {k} items of {p}"),
        body="return {p}[:{k}]",
        consts=_k(1, 9),
        inputs=lambda rng, c: _int_lists(rng, c["k"] + 2),
    ),
    _Template(
        kind="list",
        names=("last_{k}", "tail_{k}"),
        phrasings=("the last {k} items of the list {p}", "a list of the last {k} items of {p}"),
        body="return {p}[-{k}:]",
        consts=_k(1, 9),
        inputs=lambda rng, c: _int_lists(rng, c["k"] + 2),
    ),
    _Template(
        kind="list",
        names=("scale_{k}", "times_all_{k}"),
        phrasings=(
            "a list of the items of {p}, each multiplied by {k}",
            "the list {p} with every item times {k}",
        ),
        body="return [v * {k} for v in {p}]",
        consts=_k(2, 20),
        inputs=lambda rng, c: _int_lists(rng, 1, 1),
    ),
    _Template(
        kind="str",
        names=("repeat_{k}", "copies_{k}"),
        phrasings=("the string {p} repeated {k} times", "{p} written {k} times in a row"),
        body="return {p} * {k}",
        consts=_k(2, 9),
        inputs=lambda rng, c: _words(rng, lo=1, hi=4),
    ),
    _Template(
        kind="str",
        names=("longer_{k}", "len_above_{k}"),
        phrasings=(
            "True if the string {p} has more than {k} characters, else False",
            "whether the string {p} is longer than {k} characters",
        ),
        body="return len({p}) > {k}",
        consts=_k(1, 9),
        inputs=lambda rng, c: ["a" * (c["k"] - 1), "b" * c["k"], "c" * (c["k"] + 1), *_words(rng)],
    ),
)

_SMALL = (
    _Template(
        kind="int",
        names=("clamp_{a}_{b}", "clip_{a}_{b}"),
        phrasings=(
            "{p} clamped to the range {a} to {b}",
            "{p} limited to at least {a} and at most {b}",
        ),
        body="return max({a}, min({b}, {p}))",
        consts=lambda rng: dict(zip("ab", sorted(rng.sample(range(-30, 60), 2)), strict=True)),
        inputs=lambda rng, c: [c["a"] - 1, c["a"], c["a"] + 1, c["b"], c["b"] + 1],
    ),
    _Template(
        kind="int",
        names=("parity_mix", "even_odd", "step_value"),
        phrasings=(
            "{p} times {a} if {p} is even, otherwise {p} plus {b}",
            "{p} * {a} for an even {p} and {p} + {b} for an odd {p}",
        ),
        body="if {p} % 2 == 0:\n        return {p} * {a}\n    return {p} + {b}",
        consts=lambda rng: {"a": rng.randint(2, 9), "b": rng.randint(1, 30)},
        inputs=lambda rng, c: [0, 1, 4, 7, 10, rng.randint(-30, 30)],
    ),
    _Template(
        kind="int",
        names=("fizz_{a}_{b}", "tag_{a}_{b}"),
        phrasings=(
            "'fizz' if {p} is divisible by {a}, else 'buzz' if {p} is divisible by {b}, else {p}",
        ),
        body=(
            "if {p} % {a} == 0:\n        return 'fizz'\n"
            "    if {p} % {b} == 0:\n        return 'buzz'\n    return {p}"
        ),
        consts=_a_b(2, 9),
        inputs=lambda rng, c: [1, c["a"], c["b"], c["a"] * c["b"], c["a"] + 1, c["b"] + 1],
    ),
    _Template(
        kind="int",
        names=("multiples_of_{k}", "first_multiples_{k}"),
        phrasings=("a list of the first {p} multiples of {k}, starting at {k}",),
        body="return [{k} * i for i in range(1, {p} + 1)]",
        consts=_k(2, 15),
        inputs=lambda rng, c: [0, 1, 2, rng.randint(3, 8)],
    ),
    _Template(
        kind="list",
        names=("count_above_{k}", "num_greater_{k}"),
        phrasings=("how many items of the list {p} are greater than {k}",),
        body="return len([v for v in {p} if v > {k}])",
        consts=_k(-10, 30),
        inputs=lambda rng, c: _int_lists(rng, 3, c["k"], c["k"] + 1, c["k"] + 1),
    ),
    _Template(
        kind="list",
        names=("divisible_by_{k}", "multiples_in_{k}"),
        phrasings=("the items of the list {p} that are divisible by {k}, in order",),
        body="return [v for v in {p} if v % {k} == 0]",
        consts=_k(2, 9),
        inputs=lambda rng, c: _int_lists(rng, 3, c["k"], 2 * c["k"]),
    ),
    _Template(
        kind="list",
        names=("sum_below_{k}", "small_sum_{k}"),
        phrasings=("the sum of the items of the list {p} that are less than {k}",),
        body="return sum(v for v in {p} if v < {k})",
        consts=_k(-10, 30),
        inputs=lambda rng, c: _int_lists(rng, 3, c["k"], c["k"] - 1),
    ),
    _Template(
        kind="list",
        names=("max_minus_{k}", "top_less_{k}"),
        phrasings=("the largest item of the non-empty list {p} minus {k}",),
        body="return max({p}) - {k}",
        consts=_k(1, 30),
        inputs=lambda rng, c: _int_lists(rng, 1),
    ),
    _Template(
        kind="str",
        names=("swap_{c}_{d}", "replace_{c}"),
        phrasings=("the string {p} with every '{c}' replaced by '{d}'",),
        body="return {p}.replace('{c}', '{d}')",
        consts=_two_letters,
        inputs=lambda rng, c: _words(rng, must_have=c["c"]) + [c["d"] + c["c"]],
    ),
    _Template(
        kind="str",
        names=("count_{c}", "num_{c}"),
        phrasings=("the number of times the letter '{c}' appears in {p}",),
        body="return {p}.count('{c}')",
        consts=_two_letters,
        inputs=lambda rng, c: _words(rng, must_have=c["c"] * 2) + [c["d"]],
    ),
    _Template(
        kind="str",
        names=("reverse_add_{c}", "flip_{c}"),
        phrasings=("the string {p} reversed, followed by '{c}'",),
        body="return {p}[::-1] + '{c}'",
        consts=_two_letters,
        inputs=lambda rng, c: _words(rng),
    ),
    _Template(
        kind="str",
        names=("starts_{c}_{k}", "long_{c}_{k}"),
        phrasings=("True if {p} starts with '{c}' and has more than {k} characters, else False",),
        body="return {p}.startswith('{c}') and len({p}) > {k}",
        consts=lambda rng: {**_two_letters(rng), "k": rng.randint(2, 6)},
        inputs=lambda rng, c: [
            c["c"] * c["k"],
            c["c"] * (c["k"] + 1),
            c["d"] * (c["k"] + 2),
            *_words(rng, lo=1, hi=9),
        ],
    ),
)


def _run_lists(rng: random.Random, k: int) -> list[list[int]]:
    """Lists of small digits with runs of `k` of different lengths, plus an empty list."""
    lists = [[rng.choice((k, k, rng.randint(0, 9))) for _ in range(rng.randint(4, 10))]
             for _ in range(3)]  # fmt: skip
    return [*lists, [k, k, 1, k], [k] * 3 + [k + 1] + [k] * 2, [], [k + 1] * 3]


def _sentence(rng: random.Random) -> str:
    return " ".join(_words(rng, lo=1, hi=9)[: rng.randint(3, 5)])


def _range_ends(rng: random.Random) -> Consts:
    a = rng.randint(-10, 10)
    return {"a": a, "b": a + rng.randint(3, 20)}


_MEDIUM = (
    _Template(
        kind="list",
        names=("longest_run_{k}", "max_streak_{k}"),
        phrasings=("the length of the longest run of consecutive items equal to {k} in {p}",),
        body=(
            "best = run = 0\n    for v in {p}:\n        run = run + 1 if v == {k} else 0\n"
            "        best = max(best, run)\n    return best"
        ),
        consts=_k(0, 8),
        inputs=lambda rng, c: _run_lists(rng, c["k"]),
    ),
    _Template(
        kind="int",
        names=("digit_sum_times_{k}", "digits_by_{k}"),
        phrasings=("the sum of the decimal digits of the non-negative integer {p}, times {k}",),
        body=(
            "total = 0\n    while {p} > 0:\n        total += {p} % 10\n        {p} //= 10\n"
            "    return total * {k}"
        ),
        consts=_k(2, 9),
        inputs=lambda rng, c: [0, 7, 10, 99, rng.randint(100, 999), rng.randint(1000, 99999)],
    ),
    _Template(
        kind="list",
        names=("second_largest_or_{k}", "runner_up_{k}"),
        phrasings=(
            "the second largest distinct value in {p}, or {k} if {p} has fewer than two "
            "distinct values",
        ),
        body=(
            "values = sorted(set({p}))\n    if len(values) < 2:\n        return {k}\n"
            "    return values[-2]"
        ),
        consts=_k(-9, -1),
        inputs=lambda rng, c: [*_int_lists(rng, 2), [], [3], [5, 5, 5], [4, 9, 9]],
    ),
    _Template(
        kind="list",
        names=("running_totals_plus_{k}", "prefix_sums_{k}"),
        phrasings=(
            "a list of the running totals of {p} (item i is the sum of the first i + 1 items), "
            "each plus {k}",
        ),
        body=(
            "out, total = [], 0\n    for v in {p}:\n        total += v\n"
            "        out.append(total + {k})\n    return out"
        ),
        consts=_k(1, 20),
        inputs=lambda rng, c: [*_int_lists(rng, 1), []],
    ),
    _Template(
        kind="list",
        names=("first_index_above_{k}", "find_above_{k}"),
        phrasings=(
            "the index of the first item of {p} that is greater than {k}, or -1 if there is none",
        ),
        body=(
            "for i, v in enumerate({p}):\n        if v > {k}:\n            return i\n    return -1"
        ),
        consts=_k(0, 30),
        inputs=lambda rng, c: [*_int_lists(rng, 2, c["k"], c["k"] + 1), [], [c["k"]] * 3],
    ),
    _Template(
        kind="str",
        names=("upper_every_{k}", "caps_step_{k}"),
        phrasings=("the string {p} with every {k}-th character (counting from 1) in upper case",),
        body=(
            "chars = list({p})\n    for i in range({k} - 1, len(chars), {k}):\n"
            "        chars[i] = chars[i].upper()\n    return ''.join(chars)"
        ),
        consts=_k(2, 5),
        inputs=lambda rng, c: [*_words(rng, lo=1, hi=12), ""],
    ),
    _Template(
        kind="str",
        names=("long_word_lengths_{k}", "word_sizes_over_{k}"),
        phrasings=(
            "a dict mapping each word of {p} (split on spaces) that is longer than {k} "
            "characters to its length",
        ),
        body=(
            "lengths = {{}}\n    for w in {p}.split():\n        if len(w) > {k}:\n"
            "            lengths[w] = len(w)\n    return lengths"
        ),
        consts=_k(2, 5),
        inputs=lambda rng, c: [
            *(_sentence(rng) for _ in range(3)),
            f"{'a' * c['k']} {'b' * (c['k'] + 1)} {'c' * (c['k'] + 2)}",
            "",
        ],
    ),
    _Template(
        kind="int",
        names=("fizz_list_{a}_{b}", "tags_upto_{a}_{b}"),
        phrasings=(
            "a list for i from 1 to {p}: 'fizz' if i is divisible by {a}, else 'buzz' if i is "
            "divisible by {b}, else i",
        ),
        body=(
            "out = []\n    for i in range(1, {p} + 1):\n        if i % {a} == 0:\n"
            "            out.append('fizz')\n        elif i % {b} == 0:\n"
            "            out.append('buzz')\n        else:\n            out.append(i)\n"
            "    return out"
        ),
        consts=_a_b(2, 7),
        inputs=lambda rng, c: [0, 1, c["a"] * c["b"], rng.randint(5, 20)],
    ),
    _Template(
        kind="list",
        names=("square_sum_{a}_{b}", "squares_between_{a}_{b}"),
        phrasings=(
            "the sum of the squares of the items of {p} that lie between {a} and {b} inclusive",
        ),
        body=(
            "total = 0\n    for v in {p}:\n        if {a} <= v <= {b}:\n"
            "            total += v * v\n    return total"
        ),
        consts=_range_ends,
        inputs=lambda rng, c: _int_lists(rng, 3, c["a"], c["b"], c["a"] - 1, c["b"] + 1),
    ),
    _Template(
        kind="str",
        names=("squeeze_{c}", "collapse_{c}"),
        phrasings=("the string {p} with every run of the letter '{c}' shortened to one '{c}'",),
        body=(
            "out = ''\n    for ch in {p}:\n        if not (ch == '{c}' and out.endswith('{c}')):\n"
            "            out += ch\n    return out"
        ),
        consts=_two_letters,
        inputs=lambda rng, c: [*_words(rng, must_have=c["c"] * 3), c["c"] * 4 + c["d"], ""],
    ),
    _Template(
        kind="list",
        names=("rotate_left_{k}", "shift_left_{k}"),
        phrasings=(
            "the list {p} rotated left by {k} positions, wrapping around (an empty list stays "
            "empty)",
        ),
        body=(
            "if not {p}:\n        return []\n    r = {k} % len({p})\n    return {p}[r:] + {p}[:r]"
        ),
        consts=_k(1, 7),
        inputs=lambda rng, c: [*_int_lists(rng, 1), [], [1]],
    ),
    _Template(
        kind="int",
        names=("count_multiples_{a}_{b}", "either_divides_{a}_{b}"),
        phrasings=("how many integers from 1 to {p} inclusive are divisible by {a} or by {b}",),
        body=(
            "count = 0\n    for i in range(1, {p} + 1):\n        if i % {a} == 0 or i % {b} == 0:\n"
            "            count += 1\n    return count"
        ),
        consts=_a_b(2, 9),
        inputs=lambda rng, c: [0, 1, c["a"], c["b"], c["a"] * c["b"], rng.randint(10, 100)],
    ),
)

_TEMPLATES = {"tiny": _TINY, "small": _SMALL, "medium": _MEDIUM}


def _name_part(value: int | str) -> str:
    """A constant as it appears in a function name: -5 becomes "neg5"."""
    return f"neg{-value}" if isinstance(value, int) and value < 0 else str(value)


def _render(template: _Template, rng: random.Random) -> tuple[str, str, str, list]:
    """(function name, prompt, source, test arguments) for one draw of `template`."""
    consts = template.consts(rng)
    p = rng.choice(_PARAMS[template.kind])
    fn = rng.choice(template.names).format(**{k: _name_part(v) for k, v in consts.items()})
    what = rng.choice(template.phrasings).format(p=p, **consts)
    prompt = f"Write a Python function {fn}({p}) that returns {what}."
    source = f"def {fn}({p}):\n    " + template.body.format(p=p, **consts)
    return fn, prompt, source, template.inputs(rng, consts)


def _hidden_tests(fn: str, source: str, args: list) -> str:
    """Asserts pinning the reference `source` (our own template code) on `args`."""
    namespace: dict = {}
    exec(source, namespace)
    func = namespace[fn]
    return "\n".join(f"assert {fn}({a!r}) == {func(a)!r}" for a in args) + "\n"


def sample(rng: random.Random, difficulty: str) -> Example:
    template = rng.choice(_TEMPLATES[difficulty])
    fn, prompt, source, args = _render(template, rng)
    return Example(
        task=NAME,
        messages=({"role": "user", "content": prompt},),
        target=source,
        meta={"entry_point": fn, "prefix": "", "tests": _hidden_tests(fn, source, args)},
    )


def program(example: Example, completion: str) -> str:
    """The program the checker runs: prefix, the completion's code, then the hidden tests."""
    code = extract_code(completion)
    return f"{example.meta['prefix']}{code}\n\n{example.meta['tests']}"


def check(example: Example, completion: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    return run_python(program(example, completion), timeout_s=timeout_s)


TASK = Task(name=NAME, sampler=sample, checker=check, difficulties=tuple(_TEMPLATES))
