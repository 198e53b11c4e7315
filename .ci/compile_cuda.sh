#!/usr/bin/env bash
# Compile-checks the CUDA sources with nvcc against the installed torch headers. CI has no GPU
# (and its torch may be a CPU build), so this is the only check the .cu files get there.
#
#   .ci/compile_cuda.sh               every csrc/cuda/*.cu
#   .ci/compile_cuda.sh FILE.cu ...   the given files
#
# Exits non-zero on the first file that does not compile. NVCC and PYTHON override the tools;
# NVCC_ARCH (default sm_90) picks the target; RESOURCE_USAGE=1 prints each kernel's registers,
# shared memory, stack frame and spills (the float64 kernels show a few bytes: the call frame of
# double division's slow path).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
nvcc=${NVCC:-nvcc}
python=${PYTHON:-python3}
arch=${NVCC_ARCH:-sm_90}

if ! command -v "$nvcc" >/dev/null; then
  echo "compile_cuda: nvcc not found (set NVCC or put the CUDA toolkit's bin on PATH)" >&2
  exit 2
fi

if [ $# -gt 0 ]; then
  files=("$@")
else
  files=("$root"/csrc/cuda/*.cu)
fi

# The include directories and the C++ ABI flag that torch's BuildExtension would pass.
mapfile -t torch_flags < <("$python" - <<'EOF'
import sysconfig
import torch
from torch.utils import cpp_extension
for path in cpp_extension.include_paths():
    print(f"-I{path}")
print(f"-I{sysconfig.get_paths()['include']}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
for flag in cpp_extension.COMMON_NVCC_FLAGS:
    print(flag)
EOF
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A CPU build of torch ships c10/cuda without the header that its CMake build generates; the
# stand-in is searched last, so a CUDA build's own copy wins.
mkdir -p "$tmp/include/c10/cuda/impl"
echo '#pragma once' > "$tmp/include/c10/cuda/impl/cuda_cmake_macros.h"

# The flags setup.py gives nvcc for the real build, plus what BuildExtension adds.
flags=(-c -std=c++17 -O3 -arch="$arch" -Xcompiler -fPIC -DTORCH_BN_WITH_CUDA=1
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  # torch >= 2.12 headers use C++20 bit-field initializers; setup.py builds with C++17.
  -diag-suppress=3306 -Xcompiler=-Wno-c++20-extensions)
if [ "${RESOURCE_USAGE:-0}" = 1 ]; then
  flags+=(--resource-usage)
fi

for file in "${files[@]}"; do
  start=$SECONDS
  if ! "$nvcc" "${flags[@]}" "${torch_flags[@]}" -I"$tmp/include" "$file" -o "$tmp/$(basename "$file").o"; then
    echo "compile_cuda: FAILED $file" >&2
    exit 1
  fi
  echo "compile_cuda: ok $(basename "$file") ($((SECONDS - start)) s)"
done
