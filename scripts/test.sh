#!/usr/bin/env bash
# Sets up .venv, runs ruff and mypy (configured in pyproject.toml), then the whole test suite (slow fault tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check torchslim tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
