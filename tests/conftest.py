"""Fixtures shared by the torch_bn tests.

``device`` is "cpu", plus "cuda" when a GPU is present, so that every parity test also runs
against torch.nn on the GPU there.
"""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seeded():
    # Each test draws the same numbers whatever ran before it, so a failure reproduces alone.
    torch.manual_seed(0)


def pytest_report_header(config):
    import torch_bn

    # Shows which torch_bn was imported: an installed copy, not the source tree without _C.
    return [f"torch {torch.__version__}, torch_bn from {torch_bn.__file__}, devices {DEVICES}"]
