#!/usr/bin/env bash
# Sets up the virtual environment (scripts/setup.sh) and runs the benchmarks against the
# installed torch_bn. Arguments go to benchmarks/bench.py, e.g. `bash scripts/bench.sh --quick`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

cd "$repo"
exec "$venv/bin/python" benchmarks/bench.py "$@"
