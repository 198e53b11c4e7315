"""The CUDA build, as far as it can be checked on either kind of machine.

On a GPU machine: every torch_bn operator has a CUDA kernel (a build that silently left
csrc/cuda out would otherwise run the whole suite on the CPU only). Without a GPU: the compile
check that CI relies on instead (.ci/compile_cuda.sh) really fails on a compile error. The full
compile of csrc/cuda takes minutes, so CI runs that script itself rather than a test here.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import torch_bn  # noqa: F401  (registers the torch_bn operators)

ROOT = Path(__file__).resolve().parent.parent
COMPILE_CUDA = ROOT / ".ci" / "compile_cuda.sh"


def torch_bn_ops():
    """The torch_bn operators with kernels of their own (a composite op is made of torch ops, which
    run on every backend)."""
    return sorted(
        name
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("torch_bn::") and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
    )


def test_every_op_has_a_cpu_kernel():
    ops = torch_bn_ops()
    assert "torch_bn::forward_train" in ops
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")]
    assert missing == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: .ci/compile_cuda.sh checks the CUDA sources instead")
def test_every_op_has_a_cuda_kernel():
    missing = [op for op in torch_bn_ops() if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert missing == [], f"built without (some) CUDA kernels: {missing}; rebuild with TORCH_BN_CUDA=1"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: the CUDA compile check cannot run here")
def test_compile_check_fails_on_a_compile_error(tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void kernel(float* out) { out[threadIdx.x] = undeclared_name; }\n")
    result = subprocess.run(["bash", str(COMPILE_CUDA), str(broken)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "FAILED" in result.stderr and "undeclared_name" in result.stdout + result.stderr
