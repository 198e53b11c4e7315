#!/usr/bin/env bash
# Sets up the virtual environment (scripts/setup.sh) and runs the benchmarks against the
# installed torch_bn. Arguments go to benchmarks/bench.py, e.g. `bash scripts/bench.sh --quick`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

cd "$repo"
# Keep freed memory in the process: otherwise glibc hands large freed blocks back to the kernel,
# and every op that allocates its output (torch_bn, torch.nn, torch.compile and the reference
# x.clone() alike) pays for the kernel zeroing fresh pages, which on this 2-core machine costs
# about as much as the copy itself. No trimming of the heap, and no mmap for large blocks (glibc
# caps the mmap threshold at 32 MiB, and ResNet-50's largest activations are 100 MB), so that
# after the warm-up every output reuses memory the process already has.
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-17179869184}
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0}
exec "$venv/bin/python" benchmarks/bench.py "$@"
