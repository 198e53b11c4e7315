"""Build choices for setup.py, kept apart so that they can be tested without building."""

import os

# TORCH_BN_CUDA=1 forces the CUDA sources in (e.g. to compile-check them), 0 leaves them out,
# unset or "auto" builds them when the installed torch has CUDA and nvcc is found.
CUDA_ENV = "TORCH_BN_CUDA"
# TORCH_BN_NATIVE=1 adds -march=native: faster on the build machine, not portable.
NATIVE_ENV = "TORCH_BN_NATIVE"
# The builds of the CPU kernels for an instruction set extension, csrc/cpu/<name>.cpp (the
# portable build is kernels_default.cpp), with the flags that setup.py compiles each with on
# x86-64 (see target_flags) and whose objects it links last (see link_order). The AVX-512 set is
# what ATen's AVX512 capability requires.
# -mprfchw: prefetchw, for the outputs (prefetch_lines_for_write); x86-64 CPUs without it
# execute it as a no-op.
_AVX2_FLAGS = ["-mavx", "-mavx2", "-mfma", "-mf16c", "-mprfchw"]
EXTENSION_KERNELS = {
    "kernels_avx2": _AVX2_FLAGS,
    "kernels_avx512": _AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}


def build_name(path):
    """A source's or object's file name without directory and extension: kernels_avx2 for
    csrc/cpu/kernels_avx2.cpp and for its .o."""
    return os.path.splitext(os.path.basename(path))[0]


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
    # -g0 undoes the -g of Python's own compile flags: the kernel files' template-heavy code
    # compiled 1.7x slower with it (GCC 12, kernels_avx2.cpp 102 s against 59 s) into an object
    # 32x as large, and the library came to 103 MB.
    # -fno-math-errno: std::sqrt may set errno, so GCC keeps the per-channel loops that take one
    # (1/sqrt(var + eps) for each channel) scalar, with a branch to the library call. Nothing
    # here reads errno, and SIMD square roots round as the scalar one does: outputs are bitwise
    # the same. At 2048 channels the evaluation scales took 7.8 µs scalar, 4.0 with SSE2 and 2.0
    # with AVX2 (a standalone loop, AMD EPYC Zen 4 VM); the module's evaluation at 1x2048x1x1
    # went from 23.4-24.3 µs to 19.6-19.8 (torch.nn's 16.4-17.2; medians of 9 interleaved rounds,
    # 2 threads, two processes each).
    flags = ["-O3", "-std=c++17", "-g0", "-fno-math-errno"]
    if openmp:
        # at::parallel_for is header code: without -fopenmp it would run on one thread.
        flags.append("-fopenmp")
    if environ.get(NATIVE_ENV, "0") == "1":
        flags.append("-march=native")
    return flags


def target_flags(source, machine, unix_compiler):
    """The instruction set flags to compile ``source`` with: its extension's on x86-64 with a
    GCC-style compiler, none for any other source or elsewhere (where the extension builds
    forward to the portable one).

    Flags, not a ``#pragma GCC target`` in the file: GCC compiles some functions it defines
    implicitly (a lambda's conversion to a function pointer, which -Wpsabi reported; with GCC 13,
    special members too) for the command line's target even under the pragma. With GCC 13 the
    build failed (libstdc++'s always_inline std::allocator members could not be inlined into such
    a destructor) and, with the standard headers included ahead of the pragma, built but crashed
    (segmentation faults in the CPU operators).
    """
    if not unix_compiler or machine.lower() not in ("x86_64", "amd64"):
        return []
    return list(EXTENSION_KERNELS.get(build_name(source), []))


def link_order(objects):
    """``objects`` in the order to link them: those of the extension kernels last.

    Everything those files compile is built for the extension, the std::vector and c10 templates
    the kernels instantiate included. Such an instantiation is a weak symbol that several objects
    define, and the linker keeps the first object's copy for every caller. Linked in path order,
    as setuptools links, the AVX2 kernels came first, and the portable kernels and the operators
    called their AVX2 copies (std::vector<std::vector<float>>::insert, c10::str's formatting): a
    CPU without AVX2 would stop on an illegal instruction.
    """
    return sorted(objects, key=lambda path: build_name(path) in EXTENSION_KERNELS)
