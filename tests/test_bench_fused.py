"""benchmarks/fused.py on a tiny shape: the result's structure, the speedups derived from the
times, and the saved-for-backward bytes, which are exact (no timing involved)."""

import sys
from pathlib import Path

import pytest

# benchmarks/ is a package of the checkout, not of the install; the root goes last on sys.path so
# that `import torch_bn` still finds the installed package (the source folder has no _C).
sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import fused  # noqa: E402

SHAPE = (4, 8, 6, 5)  # 960 elements: a mask of 120 bytes


@pytest.fixture(scope="module")
def result():
    return fused.run(shapes=[SHAPE], repeats=1, block_time=0.001, warmup=1, train_step_count=0)


def test_rows_cover_layouts_and_variants(result):
    assert [(row["layout"], row["variant"]) for row in result["rows"]] == [
        (layout, variant) for layout in fused.LAYOUTS for variant in fused.VARIANTS
    ]
    for row in result["rows"]:
        assert row["speedup_vs_torch"] == pytest.approx(row["ms"]["torch"] / row["ms"]["fused"])
    overall = result["summary"][-1]
    assert (overall["variant"], overall["layout"], overall["shapes"]) == ("all", "all", 4)
    assert result["train_step"] is None


def test_saved_bytes_per_layer(result):
    channels = SHAPE[1]
    x_bytes = 960 * 4
    for row in result["rows"]:
        saved = row["saved_bytes"]
        # fused: x, the 1-bit mask, the float32 weight, and mean and invstd (float64 on the CPU).
        assert saved["fused"] == x_bytes + 960 // 8 + channels * (4 + 2 * 8)
        # eager: BatchNorm's x (plus per-channel tensors) and the ReLU's output.
        assert saved["torch_bn"] >= 2 * x_bytes and saved["torch"] >= 2 * x_bytes
        assert row["saved_in_S"]["fused"] == pytest.approx(saved["fused"] / x_bytes)
