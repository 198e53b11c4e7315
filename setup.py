"""Builds torch_bn._C against the torch that is already installed.

    pip install --no-build-isolation .

(--no-build-isolation matters: an isolated build would download another torch.)
"""

import glob
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_config import build_name, cxx_flags, link_order, target_flags, with_cuda  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def with_cxx_flags(extra_postargs, flags):
    """Compile arguments (a list, or a dict with the C++ compiler's under "cxx") plus ``flags``
    for the C++ compiler."""
    if isinstance(extra_postargs, dict):
        return dict(extra_postargs, cxx=list(extra_postargs.get("cxx", [])) + flags)
    return list(extra_postargs or []) + flags


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, compiling each source with its target_flags (setuptools has no
    per-file flags: the sources are compiled in groups of equal flags, concurrently) and linking
    the objects in link_order (setuptools links them in the order of their sorted paths)."""

    def build_extensions(self):
        link = self.compiler.link

        def link_extension_kernels_last(target_desc, objects, *args, **kwargs):
            return link(target_desc, link_order(objects), *args, **kwargs)

        self.compiler.link = link_extension_kernels_last
        super().build_extensions()

    def build_extension(self, ext):
        # By now torch's build_extensions has put its (ninja) compile in place: wrap that.
        compile = self.compiler.compile
        machine, unix_compiler = platform.machine(), self.compiler.compiler_type == "unix"

        def compile_with_target_flags(sources, output_dir, extra_postargs=None, **kwargs):
            groups = {}
            for source in sources:
                groups.setdefault(tuple(target_flags(source, machine, unix_compiler)), []).append(source)

            def compile_group(flags, group):
                # A folder per group: torch's compile writes the build.ninja of its output folder.
                folder = os.path.join(output_dir, build_name(group[0])) if flags else output_dir
                return compile(group, output_dir=folder, extra_postargs=with_cxx_flags(extra_postargs, list(flags)), **kwargs)

            # At the same time: one after the other, each of the two kernel files (the slowest to
            # compile) waited for everything before it; with GCC 13 on 16 cores the portable
            # kernels alone took about 4 minutes before the AVX2 file started.
            with ThreadPoolExecutor(len(groups)) as pool:
                per_group = pool.map(lambda item: compile_group(*item), groups.items())
                return [obj for objects in per_group for obj in objects]

        self.compiler.compile = compile_with_target_flags
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile


def extension():
    openmp = torch.backends.openmp.is_available()
    cxx = cxx_flags(os.environ, openmp)
    common = dict(
        name="torch_bn._C",
        sources=sources("*.cpp") + sources("cpu/*.cpp"),
        extra_link_args=["-fopenmp"] if openmp else [],
    )
    if with_cuda(os.environ, torch.version.cuda, cpp_extension.CUDA_HOME):
        return cpp_extension.CUDAExtension(
            **dict(common, sources=common["sources"] + sources("cuda/*.cu")),
            define_macros=[("TORCH_BN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
        )
    return cpp_extension.CppExtension(**common, extra_compile_args={"cxx": cxx})


setup(
    name="torch_bn",
    version="0.1.0",
    description="Fast, exact BatchNorm for PyTorch with fused C++ (and CUDA) kernels",
    packages=find_packages(include=["torch_bn", "torch_bn.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=[],  # torch is expected to be installed already; see README.
)
