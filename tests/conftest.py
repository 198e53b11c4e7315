"""Fixtures shared by the torch_bn tests.

``device`` is "cpu", plus "cuda" when a GPU is present, so that every parity test also runs
against torch.nn on the GPU there.
"""

import os

import pytest
import torch

# The bound from which the CPU passes stream their outputs comes from the L3's size (32 or 48 MiB
# on a VM reporting a large L3, 24 MiB on the 32 MiB ones); the streamed passes' tests size their
# inputs around 24 MiB. Set before any kernel runs: the kernels read it once per process.
os.environ["TORCH_BN_STREAM_BYTES"] = str(24 << 20)
# Streamed passes fetch the next group while they write on AMD CPUs alone; the tests run that
# path on any machine (test_streamed_outputs.py).
os.environ["TORCH_BN_FETCH_NEXT_GROUP"] = "1"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def on_thread_counts():
    """on_thread_counts(counts, compute): compute() run with each of `counts` threads in turn, the
    results as a list; the thread count is restored after."""

    def run(counts, compute):
        threads = torch.get_num_threads()
        try:
            results = []
            for num_threads in counts:
                torch.set_num_threads(num_threads)
                results.append(compute())
            return results
        finally:
            torch.set_num_threads(threads)

    return run


@pytest.fixture(autouse=True)
def _seeded():
    # Each test draws the same numbers whatever ran before it, so a failure reproduces alone.
    torch.manual_seed(0)


def pytest_report_header(config):
    import torch_bn

    # Shows which torch_bn was imported: an installed copy, not the source tree without _C.
    return [f"torch {torch.__version__}, torch_bn from {torch_bn.__file__}, devices {DEVICES}"]
