#!/usr/bin/env bash
# Sets up the virtual environment (scripts/setup.sh) and runs the test suite against the
# installed torch_bn. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k errors`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
venv_pip install -q pytest==9.0.3 pytest-xdist==3.8.0

cd "$repo"
# The pytest entry point (not `python -m pytest`) with --import-mode=importlib keeps the
# repository root off sys.path: `import torch_bn` must find the installed package, which has the
# compiled _C, not the source folder ./torch_bn, which has not. pytest's exit status passes
# through, so a failing test, or none collected (status 5), fails the script.
exec "$venv/bin/pytest" --import-mode=importlib -n auto tests "$@"
