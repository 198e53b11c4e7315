"""The benchmark suite: ResNet-50's shapes, the metrics' formulas, the targets' verdicts, a smoke
run of the main script, and the end-to-end step's loss agreement."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ is a package of the checkout, not of the install; the root goes last on sys.path so
# that `import torch_bn` still finds the installed package (the source folder has no _C).
sys.path.append(str(ROOT))

from benchmarks import metrics, targets, train_step  # noqa: E402
from benchmarks.cases import IMPLS, MODES, Case  # noqa: E402
from benchmarks.shapes import bn_input_shapes, resnet50_shapes  # noqa: E402


def test_resnet50_has_53_batchnorms_over_12_shapes():
    assert len(bn_input_shapes(32)) == 53
    assert resnet50_shapes(32) == [
        ((32, 64, 112, 112), 1),
        ((32, 64, 56, 56), 6),
        ((32, 256, 56, 56), 4),
        ((32, 128, 56, 56), 1),
        ((32, 128, 28, 28), 7),
        ((32, 512, 28, 28), 5),
        ((32, 256, 28, 28), 1),
        ((32, 256, 14, 14), 11),
        ((32, 1024, 14, 14), 7),
        ((32, 512, 14, 14), 1),
        ((32, 512, 7, 7), 5),
        ((32, 2048, 7, 7), 4),
    ]


def synthetic_rows(torch_bn_ms: float, torch_ms: float, copy_ms: float, mode: str = "forward-train", shape=(32, 64, 56, 56)):
    case = Case(shape, 6, "float32", "NCHW")
    times = {metrics.COPY: [copy_ms / 1e3] * 3, (mode, "torch_bn"): [torch_bn_ms / 1e3] * 3, (mode, "torch"): [torch_ms / 1e3] * 3}
    return metrics.case_rows(case, times)


def test_rows_scale_the_copy_to_the_modes_minimal_bytes():
    size = 32 * 64 * 56 * 56 * 4
    # forward+backward moves 5 S, 2.5 times a copy of x: 25 ms against a 10 ms copy is copy speed.
    ours, peer = synthetic_rows(torch_bn_ms=25.0, torch_ms=75.0, copy_ms=10.0, mode="forward+backward")
    assert ours["ratio_to_copy"] == pytest.approx(1.0)
    assert ours["gb_per_s"] == pytest.approx(5 * size / 25e-3 / 1e9)
    assert ours["speedup"] == {"torch": pytest.approx(3.0)}
    assert peer["speedup"] == {"torch_bn": pytest.approx(1 / 3)}
    assert peer["ratio_to_copy"] == pytest.approx(3.0)


def test_rows_keep_every_round_of_their_own_and_of_the_copy():
    case = Case((32, 64, 56, 56), 6, "float32", "NCHW")
    times = {metrics.COPY: [0.010, 0.030, 0.011], ("forward-train", "torch_bn"): [0.012, 0.009, 0.040]}
    (row,) = metrics.case_rows(case, times)
    assert row["repeats_ms"] == pytest.approx([12.0, 9.0, 40.0])
    assert row["copy_repeats_ms"] == pytest.approx([10.0, 30.0, 11.0])
    assert row["ms"] == pytest.approx(12.0)
    assert row["copy_ms"] == pytest.approx(11.0)


def test_summary_takes_geometric_means_over_shapes():
    rows = synthetic_rows(10.0, 40.0, 10.0) + synthetic_rows(10.0, 10.0, 10.0, shape=(32, 256, 14, 14))
    (group,) = metrics.summarize(rows)
    assert group["geomean_speedup"] == {"torch": pytest.approx(2.0)}
    assert group["min_speedup"] == {"torch": pytest.approx(1.0)}
    assert group["resnet50_layers_ms"]["torch"] == pytest.approx(6 * 40.0 + 6 * 10.0)


def verdicts(rows, train_speedup=None):
    train = {"speedup": train_speedup} if train_speedup else None
    return {entry["target"].split(";")[0]: entry["status"] for entry in targets.checklist(rows, metrics.summarize(rows), train)}


def test_checklist_passes_fails_and_marks_what_was_not_measured():
    fast = verdicts(synthetic_rows(torch_bn_ms=10.0, torch_ms=35.0, copy_ms=8.0), train_speedup=1.2)
    assert fast["forward-train NCHW float32: geomean speedup vs torch"] == "PASS"
    assert fast["forward-train 32x64x56x56 NCHW float32: time / copy time of the same bytes"] == "PASS"  # 1.25 <= 1.4
    assert fast["end-to-end training step: speedup vs torch.nn BatchNorm"] == "PASS"
    assert fast["forward-train NCHW float32: geomean speedup vs torch.compile"] == "n/a"
    assert fast["forward+backward NCHW bfloat16: geomean speedup vs torch"] == "n/a"
    slow = verdicts(synthetic_rows(torch_bn_ms=20.0, torch_ms=19.0, copy_ms=8.0), train_speedup=1.1)
    assert slow["forward-train NCHW float32: geomean speedup vs torch"] == "FAIL"
    assert slow["no shape slower than torch in any mode, dtype, layout"] == "FAIL"
    assert slow["forward-train 32x64x56x56 NCHW float32: time / copy time of the same bytes"] == "FAIL"
    assert slow["end-to-end training step: speedup vs torch.nn BatchNorm"] == "FAIL"


def test_bench_script_writes_a_complete_result(tmp_path):
    command = [sys.executable, "benchmarks/bench.py", "--device", "cpu", "--batch", "4", "--shapes", "16x8x8"]
    command += ["--dtypes", "float32", "--layouts", "channels_last", "--repeats", "1", "--block-time", "0.001"]
    command += ["--warmup", "1", "--train-steps", "1", "--out", str(tmp_path / "{device}")]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "targets (cpu):" in completed.stdout
    out = tmp_path / "cpu"
    results = json.loads((out / "bench.json").read_text())
    assert {(row["mode"], row["impl"]) for row in results["rows"]} == {(mode, impl) for mode in MODES for impl in IMPLS}
    for row in results["rows"]:
        assert row["shape"] == [4, 16, 8, 8] and row["layout"] == "channels_last"
        assert row["ms"] > 0 and math.isfinite(row["ratio_to_copy"])
        assert set(row["speedup"]) == set(IMPLS) - {row["impl"]}
    assert len(results["summary"]) == len(MODES)
    assert results["train_step"]["losses_agree"]
    assert {entry["status"] for entry in results["checklist"]} <= {"PASS", "FAIL", "n/a"}
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"]
    # The CPU named closely enough to tell two VMs of one model name apart.
    assert torch.backends.cpu.get_cpu_capability() in results["machine"]["cpu"]
    with (out / "bench.csv").open() as file:
        assert len(list(csv.DictReader(file))) == len(results["rows"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "option, value",
    [("--batch", "0"), ("--threads", "-1"), ("--repeats", "0"), ("--warmup", "-1"), ("--train-steps", "-1"),
     ("--block-time", "0"), ("--batch", "two"), ("--out", "{tmp}/{{foo}}"), ("--out", "{tmp}/a-file/sub")],
)
def test_bench_rejects_bad_options_before_running(option, value, tmp_path, capsys):
    """A usage error (exit status 2, the option named) before any case is measured, where these
    crashed mid-run, at the end of it, or ran on without meaning (batch 0)."""
    from benchmarks import bench

    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(["--device", "cpu", option, value.format(tmp=tmp_path)])
    assert exit.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where torch sees no GPU")
def test_bench_rejects_cuda_without_a_gpu(capsys):
    from benchmarks import bench

    with pytest.raises(SystemExit) as exit:
        bench.parse_args(["--device", "cuda"])
    assert exit.value.code == 2
    assert "--device cuda" in capsys.readouterr().err


def test_bench_exits_nonzero_when_the_training_step_losses_disagree(monkeypatch, tmp_path):
    from benchmarks import bench

    monkeypatch.setattr(bench, "run_device", lambda device, args: {"train_step": {"losses_agree": False}})
    monkeypatch.setattr(bench, "present", lambda results, out: None)
    assert bench.main(["--device", "cpu", "--out", str(tmp_path / "{device}")]) == 1


def test_train_step_losses_agree_between_torch_and_torch_bn():
    result = train_step.run(batch=2, steps=1)
    losses = result["losses"]
    assert len(losses["torch"]) == len(losses["torch_bn"]) == 2
    assert all(math.isfinite(loss) and loss > 0 for loss in losses["torch"])
    assert result["max_loss_rel_diff"] <= train_step.LOSS_RTOL
    assert result["losses_agree"]
    assert result["step_ms"]["torch"] > 0 and result["step_ms"]["torch_bn"] > 0
