"""Every CPU build of the kernels, not just the one this machine picks.

The extension is built once per CPU capability (portable, AVX2, and AVX-512 for half and
bfloat16) and picks the best the CPU runs; ATEN_CPU_CAPABILITY caps it as it caps torch's own
kernels. The rest of the suite runs the native builds, so here the kernel tests run again in a
subprocess under each lower cap.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_bn

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_ops.py", "tests/test_fused.py", "tests/test_numerics.py", "tests/test_streamed_outputs.py"]
CAPS = ["default", "avx2"]

# NCHW statistics of a fixed bfloat16 input (the dtype every build takes), printed bit for bit.
# (Channels-last sums run one channel per lane, in row order whatever the width, so they would
# not tell the builds apart.)
STATS_SCRIPT = """
import torch, torch_bn
torch.manual_seed(0)
x = (torch.randn(4, 48, 13, 11) * 3 + 1).bfloat16()
_, mean, invstd = torch.ops.torch_bn.forward_train(x, None, None, 1e-5)
print(torch.cat([mean, invstd]).view(torch.int32).tolist())
"""


def run_python(args, cap):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap) if cap else {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    # -P keeps the working directory off sys.path, as scripts/test.sh does, so that `import
    # torch_bn` finds the installed package (with _C), not the source folder.
    return subprocess.run([sys.executable, "-P", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("cap", CAPS)
def test_kernel_tests_pass_under_capability(cap):
    result = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", "-k", "not cuda", *KERNEL_TESTS], cap)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_capability_variable_selects_another_build():
    # The builds sum in vectors of different widths, so their float32 statistics differ in the
    # last bits; identical bits would mean the variable changed nothing.
    bits = {cap: run_python(["-c", STATS_SCRIPT], cap) for cap in [None, *CAPS]}
    for cap, result in bits.items():
        assert result.returncode == 0, result.stderr[-2000:]
    native = bits[None].stdout
    expected_builds = {"default"} | ({"avx2"} if torch.backends.cpu.get_cpu_capability() == "AVX512" else set())
    for cap in expected_builds:
        assert bits[cap].stdout != native, f"ATEN_CPU_CAPABILITY={cap} ran the native build"


# Mangled names of the AVX2 and AVX-512 kernels' namespaces, torch_bn::cpu::AVX2 and ::AVX512.
EXTENSION_NAMESPACE = re.compile(r"3cpu4AVX2|3cpu6AVX512")
# A VEX or EVEX encoded (AVX, AVX2, FMA, AVX-512) instruction in objdump's listing; not VERR,
# VERW or the VMX instructions, which are no vector code.
VECTOR_EXTENSION_INSTRUCTION = re.compile(r"\tv(?!err|erw|m(?:call|launch|resume|xo|read|write|ptr|clear|func))[a-z0-9]+\s")
FUNCTION_START = re.compile(r"^([0-9a-f]+) <(.+)>:$")
DIRECT_CALL = re.compile(r"\t(?:call|jmp)\s+([0-9a-f]+) <[^>+]+>")


def run_binutils(tool, *args):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (binutils) is not installed")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX builds exist on x86-64 only")
def test_portable_code_calls_no_vector_extension_code():
    """Code without AVX instructions (the portable kernels, the operators) calls code with them
    only in the AVX2 and AVX-512 kernels' namespaces, which the dispatch enters where the CPU
    has the extension. Anything else is a std or c10 template instantiation whose extension
    build stands for every build's (see build_config.link_order), and a CPU without AVX2 would
    stop on it with an illegal instruction."""
    library = torch_bn._C.__file__
    names, vector_code, callees = {}, {}, {}
    function = None
    for line in run_binutils("objdump", "-d", "--no-show-raw-insn", library).splitlines():
        start = FUNCTION_START.match(line)
        if start:
            function = int(start.group(1), 16)
            names[function], vector_code[function], callees[function] = start.group(2), False, set()
        elif function is not None:
            vector_code[function] |= VECTOR_EXTENSION_INSTRUCTION.search(line) is not None
            call = DIRECT_CALL.search(line)
            if call:
                callees[function].add(int(call.group(1), 16))
    # Calls to the library's exported functions go through its PLT: follow them to the definition.
    exported = {}
    for fields in (line.split() for line in run_binutils("nm", "--defined-only", library).splitlines()):
        if len(fields) == 3 and fields[1] in "TW":
            exported[fields[2]] = int(fields[0], 16)
    plt = {address: exported[name.removesuffix("@plt")] for address, name in names.items() if name.endswith("@plt") and name.removesuffix("@plt") in exported}
    assert any(vector_code.values()), "no AVX code found: the listing was not parsed"
    calls_into_vector_code = sorted(
        f"{names[caller]} -> {names[callee]}"
        for caller, has_vector_code in vector_code.items()
        if not has_vector_code
        for callee in (plt.get(address, address) for address in callees[caller])
        if vector_code.get(callee) and not EXTENSION_NAMESPACE.search(names[callee])
    )
    assert not calls_into_vector_code, "\n".join(calls_into_vector_code[:20])
