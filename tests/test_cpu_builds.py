"""Every CPU build of the kernels, not just the one this machine picks.

The extension is built once per CPU capability (portable, AVX2, and AVX-512 for half and
bfloat16) and picks the best the CPU runs; ATEN_CPU_CAPABILITY caps it as it caps torch's own
kernels. The rest of the suite runs the native builds, so here the kernel tests run again in a
subprocess under each lower cap.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
