#!/usr/bin/env bash
# Creates .venv with torchslim installed in editable mode.
# TORCHSLIM_TORCH overrides the torch requirement (default: the CPU wheel these machines carry).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCHSLIM_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
