#!/usr/bin/env bash
# Create .venv and install sunjax with its test dependencies (CPU). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0          # the CPU wheel (any other torch pulls a multi-GB CUDA build)
pip install -q -e '.[test]'
pip install -q --no-deps bfcl-eval==2026.3.23   # BFCL data only; its own pins conflict with ours
