#!/usr/bin/env bash
# Set up and run the whole test suite (lint, type check, unit tests on tiny models, demo-model tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m ruff check qcompiler passes kernels tests benchmarks scripts
python -m mypy qcompiler passes kernels
python -m pytest -q -p no:cacheprovider -m "not matrix" --durations=15 tests
