#!/usr/bin/env bash
# The test suite, one pytest process per package (CI and the README run this). Each process
# starts with a fresh address space: one process over the whole suite accumulated enough
# XLA:CPU executables to crash inside a late compile (twice, at ~330 tests; see the session 4
# note). Extra arguments go to every pytest call.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
status=0
for group in "tests/apps tests/kernels_pallas tests/test_layers.py" "tests/serve" "tests/sunjax" "tests/train"; do
  echo "== pytest $group"
  # shellcheck disable=SC2086
  "$py" -m pytest -q $group "$@" || status=1
done
exit $status
