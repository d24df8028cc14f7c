"""Verifiable task families for fine-tuning prefill modules, and loaders of the real benchmarks.

    from train.tasks import TASKS

    task = TASKS["arith"]
    examples = task.generate(1000, split="train", seed=0, difficulty="tiny")
    task.check(examples[0], examples[0].target)  # True

Tasks: "arith" (GSM8K-like word problems), "code" (small Python functions checked by hidden
tests in a sandbox), "tool" (JSON function calls checked like BFCL's AST checker). Difficulty
"tiny" fits a few-million-parameter model trained on the CPU, "small" a ~100M-parameter one.
`load_humaneval()` and `load_bfcl_simple_python()` give the real benchmarks as examples of the
"code" and "tool" tasks; `check(example, completion)` checks an example of any task.
"""

from train.tasks import arith, code, tool
from train.tasks.base import DIFFICULTIES, SPLITS, Example, Task, split_bucket
from train.tasks.benchmarks import load_bfcl_simple_python, load_humaneval
from train.tasks.sandbox import extract_code, run_python
from train.tasks.tool import check_call, parse_call

TASKS: dict[str, Task] = {t.name: t for t in (arith.TASK, code.TASK, tool.TASK)}


def get_task(name: str) -> Task:
    """The task registered as `name`; ValueError naming it if there is none."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name=}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def check(example: Example, completion: str) -> bool:
    """Checks `completion` with the checker of `example.task`."""
    return get_task(example.task).check(example, completion)


__all__ = [
    "DIFFICULTIES",
    "SPLITS",
    "TASKS",
    "Example",
    "Task",
    "check",
    "check_call",
    "extract_code",
    "get_task",
    "load_bfcl_simple_python",
    "load_humaneval",
    "parse_call",
    "run_python",
    "split_bucket",
]
