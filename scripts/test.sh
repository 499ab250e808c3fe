#!/usr/bin/env bash
# Set up (if needed), then run the whole test suite: ruff, then pytest, which
# includes the multi-process tests under `horovodrun -np 2` (Gloo, localhost).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" (the fast subset) or -k prepare -x
set -euo pipefail
cd "$(dirname "$0")/.."
# Not the bench extra: it installs PyTorch (a multi-GB CUDA build on an ordinary machine). The
# benchmark test then skips its PyTorch rows and says so.
EXTRAS=${EXTRAS:-dev,horovod} bash scripts/setup.sh
echo "[test] ruff" >&2
.venv/bin/ruff check .
echo "[test] pytest" >&2
# pytest's exit code 5 (no tests collected) fails this script like any other failure.
.venv/bin/python -m pytest --durations=20 "$@"
