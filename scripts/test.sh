#!/usr/bin/env bash
# Set up and run the whole test suite (lint, type check, unit tests on tiny models, demo-model tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m ruff check qcompiler passes kernels tests benchmarks scripts
python -m mypy qcompiler passes kernels
# two workers (pytest-xdist), one test file each at a time (module fixtures are built once), one torch thread each
python -m pytest -q -p no:cacheprovider -p no:benchmark -m "not matrix" -n 2 --dist loadfile --durations=15 tests
