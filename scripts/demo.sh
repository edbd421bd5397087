#!/usr/bin/env bash
# Sets up .venv and runs the main job: train, evaluate and analyze a CNN on the shipped digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m torchslim demo --logdir "${1:-/tmp/torchslim-demo}"
