"""Fused BatchNorm + ReLU (+ residual add) against the eager composition, on ResNet-50's BatchNorm
shapes, plus the end-to-end training step with fused layers next to plain torch_bn:

    python benchmarks/fused.py          # ResNet-50's 12 shapes, batch 32, float32, NCHW and channels_last
    python benchmarks/fused.py --quick  # one shape, a short end-to-end run

Per shape, layout and variant (``bn-relu``: ``relu(bn(x))``; ``bn-add-relu``: ``relu(bn(x) + z)``),
forward+backward (gradients for x, z, weight and bias) of:

- ``torch``: torch.nn.BatchNorm2d, then the add and ReLU in place, as torchvision writes them;
- ``torch_bn``: torch_bn.BatchNorm2d, then the same eager add and ReLU;
- ``fused``: torch_bn.BatchNormAct2d, one call.

Reported: times (medians of interleaved rounds, see timing.py), the speedups of ``fused``, their
geometric means over the shapes against the target (``TARGET_SPEEDUP`` over ``torch``), and the
bytes each saves for backward per layer (measured with saved_tensors_hooks), in units of S = the
bytes of x. ``run()`` returns all of it as a dict for the main benchmark script.
"""

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import torch_bn

if __name__ == "__main__" and not __package__:
    # Run as a script: import this folder as the package "benchmarks", with the repository root
    # after site-packages so that the installed torch_bn (with its compiled _C) is the one found.
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import machine, train_step
from .cases import LAYOUTS
from .resnet import ResNet
from .shapes import resnet50_shapes, shape_label
from .timing import interleaved_times, timed_call

IMPLS = ("torch", "torch_bn", "fused")
VARIANTS = {"bn-relu": False, "bn-add-relu": True}  # variant -> has a residual
TARGET_SPEEDUP = 1.5  # fused over torch, geometric mean over ResNet-50's shapes, per layout
TRAIN_IMPLS = ("torch_bn", "torch_bn fused")


def layer(impl: str, channels: int, device: str) -> torch.nn.Module:
    """A training-mode layer of ``impl`` with non-trivial parameters (the same for every impl)."""
    torch.manual_seed(channels)
    reference = torch.nn.BatchNorm2d(channels, device=device)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    if impl == "torch":
        return reference
    if impl == "torch_bn":
        return torch_bn.convert(reference)
    fused = torch_bn.BatchNormAct2d(channels, "relu", device=device)
    fused.load_state_dict(reference.state_dict())
    return fused


def forward(impl: str, bn: torch.nn.Module) -> Callable:
    """``(x, z) -> relu(bn(x) + z)`` (z may be None) as ``impl`` computes it."""
    if impl == "fused":
        return bn

    def eager(x, z):
        y = bn(x)
        if z is not None:
            y += z  # BatchNorm's backward reads its input, not its output, so in place is allowed
        return torch.relu_(y)

    return eager


def saved_bytes(function: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while ``function`` runs."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return total


def measure(shape, layout: str, residual: bool, device: str, repeats: int, block_time: float, warmup: int, threads: int) -> dict:
    memory_format = LAYOUTS[layout]
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format).requires_grad_()
    z = torch.randn(shape, device=device).contiguous(memory_format=memory_format).requires_grad_() if residual else None
    dy = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    functions, saved = {}, {}
    for impl in IMPLS:
        bn = layer(impl, shape[1], device)
        run_forward = forward(impl, bn)
        inputs = [t for t in (x, z, bn.weight, bn.bias) if t is not None]

        def forward_backward(run_forward=run_forward, inputs=inputs):
            return torch.autograd.grad(run_forward(x, z), inputs, dy)

        for _ in range(warmup):
            forward_backward()
        functions[impl] = forward_backward
        saved[impl] = saved_bytes(lambda run_forward=run_forward: run_forward(x, z))
    times = interleaved_times(functions, repeats, block_time, threads)
    ms = {impl: statistics.median(seconds) * 1e3 for impl, seconds in times.items()}
    size = x.numel() * x.element_size()
    return {
        "shape": list(shape),
        "layout": layout,
        "variant": "bn-add-relu" if residual else "bn-relu",
        "ms": ms,
        "speedup_vs_torch": ms["torch"] / ms["fused"],
        "speedup_vs_torch_bn": ms["torch_bn"] / ms["fused"],
        "saved_bytes": saved,
        "saved_in_S": {impl: bytes_ / size for impl, bytes_ in saved.items()},
    }


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(rows: List[dict]) -> List[dict]:
    """Geometric-mean speedups of ``fused`` per (variant, layout), and over everything."""
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["layout"]), []).append(row)
    groups[("all", "all")] = rows
    return [
        {
            "variant": variant,
            "layout": layout,
            "shapes": len(group),
            "speedup_vs_torch": geometric_mean([row["speedup_vs_torch"] for row in group]),
            "speedup_vs_torch_bn": geometric_mean([row["speedup_vs_torch_bn"] for row in group]),
            "target": TARGET_SPEEDUP,
            "meets_target": geometric_mean([row["speedup_vs_torch"] for row in group]) >= TARGET_SPEEDUP,
        }
        for (variant, layout), group in groups.items()
    ]


def train_steps(batch: int, steps: int, device: str, warmup: int = 1, seed: int = 0) -> dict:
    """Training steps of train_step.py's ResNet with torch_bn layers and with fused ones (the
    same weights and batches; steps alternate, and which model goes first alternates too)."""
    torch.manual_seed(seed)
    reference = ResNet(train_step.WIDTHS, train_step.BLOCKS_PER_STAGE, train_step.NUM_CLASSES).to(device)
    models = {
        "torch_bn": torch_bn.convert(copy.deepcopy(reference)),
        "torch_bn fused": torch_bn.convert(copy.deepcopy(reference), fuse_activations=True),
    }
    fused_layers = sum(isinstance(m, torch_bn.BatchNormAct2d) for m in models["torch_bn fused"].modules())
    optimizers = {
        impl: torch.optim.SGD(model.parameters(), lr=train_step.LEARNING_RATE, momentum=train_step.MOMENTUM)
        for impl, model in models.items()
    }
    generator = torch.Generator().manual_seed(seed + 1)
    seconds: Dict[str, List[float]] = {impl: [] for impl in TRAIN_IMPLS}
    losses: Dict[str, List[float]] = {impl: [] for impl in TRAIN_IMPLS}
    for step in range(warmup + steps):
        images = torch.randn(batch, 3, train_step.IMAGE_SIZE, train_step.IMAGE_SIZE, generator=generator).to(device)
        labels = torch.randint(0, train_step.NUM_CLASSES, (batch,), generator=generator).to(device)
        for impl in TRAIN_IMPLS if step % 2 == 0 else reversed(TRAIN_IMPLS):
            elapsed, loss = timed_call(lambda: train_step.training_step(models[impl], optimizers[impl], images, labels), device)
            losses[impl].append(loss)
            if step >= warmup:
                seconds[impl].append(elapsed)
    step_ms = {impl: statistics.median(seconds[impl]) * 1e3 for impl in TRAIN_IMPLS}
    return {
        "model": f"benchmarks/resnet.py ResNet{train_step.WIDTHS}, {fused_layers} BatchNormAct2d layers after fusion",
        "input": [batch, 3, train_step.IMAGE_SIZE, train_step.IMAGE_SIZE],
        "device": device,
        "steps": steps,
        "step_ms": step_ms,
        "speedup": step_ms["torch_bn"] / step_ms["torch_bn fused"],
        "max_loss_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(*losses.values())),
    }


def run(
    device: str = "cpu",
    batch: int = 32,
    shapes: Optional[Sequence[tuple]] = None,
    layouts: Sequence[str] = tuple(LAYOUTS),
    repeats: int = 3,
    block_time: float = 0.05,
    warmup: int = 2,
    train_step_count: int = 8,
    threads: Optional[int] = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """Every measurement of this benchmark, as a JSON-able dict (see the module docstring).
    ``shapes`` are full NCHW shapes (default: ResNet-50's at ``batch``)."""
    threads = threads or torch.get_num_threads()
    shapes = list(shapes) if shapes is not None else [shape for shape, _layers in resnet50_shapes(batch)]
    rows = []
    for shape in shapes:
        for layout in layouts:
            for variant, residual in VARIANTS.items():
                progress(f"{shape_label(shape)} {layout} {variant}")
                rows.append(measure(shape, layout, residual, device, repeats, block_time, warmup, threads))
    progress("end-to-end training steps")
    return {
        "machine": machine.describe(device),
        "rows": rows,
        "summary": summarize(rows),
        "train_step": train_steps(batch, train_step_count, device) if train_step_count else None,
    }


def describe(result: dict) -> str:
    """The result as text: a row per case, the summary with the target, the training step."""
    lines = [f"{'shape':>16} {'layout':>13} {'variant':>11} | {'torch':>8} {'torch_bn':>8} {'fused':>8} ms | "
             f"{'vs torch':>8} {'vs t_bn':>7} | saved/S torch torch_bn fused"]
    for row in result["rows"]:
        ms, saved = row["ms"], row["saved_in_S"]
        lines.append(
            f"{shape_label(row['shape']):>16} {row['layout']:>13} {row['variant']:>11} | "
            f"{ms['torch']:8.2f} {ms['torch_bn']:8.2f} {ms['fused']:8.2f}    | "
            f"{row['speedup_vs_torch']:7.2f}x {row['speedup_vs_torch_bn']:6.2f}x | "
            f"{saved['torch']:13.2f} {saved['torch_bn']:8.2f} {saved['fused']:5.2f}"
        )
    lines.append("")
    for entry in result["summary"]:
        verdict = "PASS" if entry["meets_target"] else "FAIL"
        lines.append(
            f"{verdict} fused vs torch, {entry['variant']}, {entry['layout']} ({entry['shapes']} shapes): geometric mean "
            f"{entry['speedup_vs_torch']:.2f}x (target >= {entry['target']}x); vs torch_bn unfused {entry['speedup_vs_torch_bn']:.2f}x"
        )
    train = result["train_step"]
    if train:
        ms = train["step_ms"]
        lines.append(
            f"\ntraining step, {train['model']}, input {train['input']} on {train['device']}: torch_bn {ms['torch_bn']:.1f} ms, "
            f"fused {ms['torch_bn fused']:.1f} ms, speedup {train['speedup']:.2f}x (median of {train['steps']} steps); "
            f"losses agree to {train['max_loss_rel_diff']:.1e}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape (32x64x56x56), 2 rounds, 2 training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds; times are medians over them")
    parser.add_argument("--train-steps", type=int, default=8, help="timed end-to-end steps per model; 0 skips them")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    options = dict(device=args.device, batch=args.batch, layouts=args.layouts, repeats=args.repeats, train_step_count=args.train_steps)
    if args.quick:
        options.update(shapes=[(args.batch, 64, 56, 56)], repeats=2, train_step_count=min(args.train_steps, 2))
    result = run(**options, progress=lambda message: print(message, file=sys.stderr))
    print(describe(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
