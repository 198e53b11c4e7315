"""Build choices for setup.py, kept apart so that they can be tested without building."""

import os

# TORCH_BN_CUDA=1 forces the CUDA sources in (e.g. to compile-check them), 0 leaves them out,
# unset or "auto" builds them when the installed torch has CUDA and nvcc is found.
CUDA_ENV = "TORCH_BN_CUDA"
# TORCH_BN_NATIVE=1 adds -march=native: faster on the build machine, not portable.
NATIVE_ENV = "TORCH_BN_NATIVE"
# The builds of the CPU kernels for an instruction set extension, csrc/cpu/<name>.cpp (the
# portable build is kernels_default.cpp), whose objects setup.py links last (see link_order).
EXTENSION_KERNELS = ("kernels_avx2", "kernels_avx512")


def with_cuda(environ, torch_cuda_version, cuda_home):
    choice = environ.get(CUDA_ENV, "auto").strip().lower()
    if choice in ("1", "true", "yes", "on"):
        return True
    if choice in ("0", "false", "no", "off"):
        return False
    if choice != "auto":
        raise ValueError(f"{CUDA_ENV} must be 1, 0 or auto, got {environ[CUDA_ENV]!r}")
    return torch_cuda_version is not None and cuda_home is not None


def cxx_flags(environ, openmp):
    flags = ["-O3", "-std=c++17"]
    if openmp:
        # at::parallel_for is header code: without -fopenmp it would run on one thread.
        flags.append("-fopenmp")
    if environ.get(NATIVE_ENV, "0") == "1":
        flags.append("-march=native")
    return flags


def link_order(objects):
    """``objects`` in the order to link them: those of the extension kernels last.

    Everything those files compile after their ``#pragma GCC target`` is built for the
    extension, the std::vector and c10 templates the kernels instantiate included. Such an
    instantiation is a weak symbol that several objects define, and the linker keeps the first
    object's copy for every caller. Linked in path order, as setuptools links, the AVX2 kernels
    came first, and the portable kernels and the operators called their AVX2 copies
    (std::vector<std::vector<float>>::insert, c10::str's formatting): a CPU without AVX2 would
    stop on an illegal instruction.
    """
    return sorted(objects, key=lambda path: os.path.splitext(os.path.basename(path))[0] in EXTENSION_KERNELS)
