#!/usr/bin/env bash
# Sets up a virtual environment with torch 2.13.0 and torch_bn built from this checkout.
#
#   bash scripts/setup.sh
#
# The environment is .venv in the repository root, or TORCH_BN_VENV if set; it is created when
# missing and updated otherwise. Needs only Python 3.10+ with pip and venv, and a C++ compiler.
# test.sh and bench.sh source this file and then use $repo, $venv and venv_pip.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TORCH_BN_VENV:-$repo/.venv}

venv_pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
# What the build needs, explicitly: a fresh venv may come with an old setuptools and no wheel,
# and ninja compiles the sources in parallel (without it, one file at a time).
echo "setup: build tools"
venv_pip install -q --upgrade pip "setuptools>=70.1" wheel ninja
# The torch that torch_bn is built and tested against (numpy spares torch a warning on import),
# and what benchmarks/ needs (a progress bar, the plots), which the tests run too.
echo "setup: torch 2.13.0"
venv_pip install -q torch==2.13.0 numpy tqdm matplotlib
# --no-build-isolation builds against the torch above; --no-deps keeps pip from resolving
# another one. Not editable: tests and benchmarks run what a user installs.
echo "setup: building and installing torch_bn (a few minutes)"
venv_pip install -q --no-build-isolation --no-deps "$repo"
echo "setup: torch_bn installed in $venv (setup took $SECONDS s)"
