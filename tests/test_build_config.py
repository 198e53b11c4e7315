"""setup.py's build choices (build_config.py), tested without building."""

import importlib.util
from pathlib import Path

import pytest
import torch

# build_config.py sits beside setup.py and is not installed with the package.
_spec = importlib.util.spec_from_file_location("build_config", Path(__file__).resolve().parents[1] / "build_config.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)

CUDA_HOME = "/usr/local/cuda"


@pytest.mark.parametrize("choice", [None, "auto", "AUTO", " auto "], ids=str)
def test_auto_without_cuda_torch_builds_cpu_only(choice):
    environ = {} if choice is None else {"TORCH_BN_CUDA": choice}
    # nvcc being installed does not matter when torch itself has no CUDA.
    assert build_config.with_cuda(environ, None, CUDA_HOME) is False
    assert build_config.with_cuda(environ, None, None) is False


def test_auto_with_cuda_torch_needs_a_toolkit():
    assert build_config.with_cuda({}, "12.8", CUDA_HOME) is True
    assert build_config.with_cuda({}, "12.8", None) is False


def test_auto_on_this_machine_follows_installed_torch():
    from torch.utils.cpp_extension import CUDA_HOME as found_cuda_home

    expected = torch.version.cuda is not None and found_cuda_home is not None
    assert build_config.with_cuda({}, torch.version.cuda, found_cuda_home) is expected


@pytest.mark.parametrize("choice", ["1", "true", "yes", "on", "ON"])
def test_forced_on(choice):
    assert build_config.with_cuda({"TORCH_BN_CUDA": choice}, None, None) is True


@pytest.mark.parametrize("choice", ["0", "false", "no", "off", "Off"])
def test_forced_off(choice):
    assert build_config.with_cuda({"TORCH_BN_CUDA": choice}, "12.8", CUDA_HOME) is False


@pytest.mark.parametrize("choice", ["2", "cuda", "", "maybe"])
def test_garbage_is_an_error(choice):
    with pytest.raises(ValueError, match="TORCH_BN_CUDA must be 1, 0 or auto"):
        build_config.with_cuda({"TORCH_BN_CUDA": choice}, "12.8", CUDA_HOME)


@pytest.mark.parametrize("openmp", [True, False])
def test_native_code_is_opt_in(openmp):
    # -march=native makes a build that crashes (SIGILL) on older CPUs, so it is never the default.
    default = build_config.cxx_flags({}, openmp)
    assert "-march=native" not in default
    assert ("-fopenmp" in default) is openmp
    assert "-march=native" in build_config.cxx_flags({"TORCH_BN_NATIVE": "1"}, openmp)


@pytest.mark.parametrize("openmp", [True, False])
def test_no_debug_info(openmp):
    # Python's compile flags carry -g, which slowed the build 1.7x and made the library 103 MB.
    assert "-g0" in build_config.cxx_flags({}, openmp)


@pytest.mark.parametrize("openmp", [True, False])
def test_square_roots_can_vectorize(openmp):
    # Without it, the per-channel 1/sqrt(var + eps) loops stay scalar (see cxx_flags).
    assert "-fno-math-errno" in build_config.cxx_flags({}, openmp)


def test_extension_kernels_are_linked_last():
    # The first object linked gives every caller its copy of a template instantiation that
    # several objects define (see link_order): the portable objects, CUDA's too, come first.
    objects = [
        "build/csrc/autograd.o",
        "build/csrc/cpu/kernels_avx2.o",
        "build/csrc/cpu/kernels_avx512.o",
        "build/csrc/cpu/kernels_default.o",
        "build/csrc/cpu/ops.o",
        "build/csrc/cuda/ops.o",
        "build/csrc/ops.o",
    ]
    assert build_config.link_order(objects) == [
        "build/csrc/autograd.o",
        "build/csrc/cpu/kernels_default.o",
        "build/csrc/cpu/ops.o",
        "build/csrc/cuda/ops.o",
        "build/csrc/ops.o",
        "build/csrc/cpu/kernels_avx2.o",
        "build/csrc/cpu/kernels_avx512.o",
    ]


def test_extension_kernels_are_every_kernel_build_but_the_portable_one():
    # An extension build missing from the list would be linked among the portable objects.
    builds = {path.stem for path in (Path(build_config.__file__).parent / "csrc" / "cpu").glob("kernels_*.cpp")}
    assert builds - {"kernels_default"} == set(build_config.EXTENSION_KERNELS)


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_extension_kernels_get_their_target_flags_on_x86(machine):
    assert build_config.target_flags("csrc/cpu/kernels_avx2.cpp", machine, True) == ["-mavx", "-mavx2", "-mfma", "-mf16c", "-mprfchw"]
    assert {"-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"} <= set(
        build_config.target_flags("csrc/cpu/kernels_avx512.cpp", machine, True)
    )
    # Everything else stays portable: the dispatch runs it on any CPU.
    for source in ("csrc/cpu/kernels_default.cpp", "csrc/cpu/ops.cpp", "csrc/ops.cpp", "csrc/cuda/ops.cu"):
        assert build_config.target_flags(source, machine, True) == []


@pytest.mark.parametrize("machine, unix_compiler", [("aarch64", True), ("arm64", True), ("x86_64", False)])
def test_no_target_flags_off_x86_or_for_other_compilers(machine, unix_compiler):
    # There the extension builds forward to the portable one; MSVC takes no -m flags.
    assert build_config.target_flags("csrc/cpu/kernels_avx2.cpp", machine, unix_compiler) == []
