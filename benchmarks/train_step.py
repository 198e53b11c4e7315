"""End-to-end benchmark: one training step (forward, backward, SGD) of a small ResNet with
torch.nn's BatchNorm and with torch_bn's, on identical weights and data.

    python benchmarks/train_step.py [--batch 32] [--steps 8] [--device cpu]

The torch_bn model is a deep copy of the torch.nn one passed through ``torch_bn.convert``. Both
take the same batches; their steps alternate, and which one goes first alternates too, so drift
on a shared machine hits both. The speedup is the ratio of the median step times, and the two
losses must agree to ``LOSS_RTOL`` at every step.
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

import torch_bn

if __name__ == "__main__" and not __package__:
    # Run as a script: import this folder as the package "benchmarks", with the repository root
    # after site-packages so that the installed torch_bn (with its compiled _C) is the one found.
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .resnet import ResNet
from .timing import timed_call

WIDTHS = (16, 32, 64)  # bottleneck widths; the stages output 64, 128 and 256 channels
BLOCKS_PER_STAGE = (1, 1, 1)
IMAGE_SIZE = 56
NUM_CLASSES = 10
LEARNING_RATE = 0.01
MOMENTUM = 0.9
# Identical weights and data: the losses differ only by the rounding of BatchNorm's reductions
# (~1e-7 relative per step in float32), which a few SGD steps amplify but not near 1e-4.
LOSS_RTOL = 1e-4
IMPLS = ("torch", "torch_bn")


def make_models(device: str, seed: int) -> Dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    reference = ResNet(WIDTHS, BLOCKS_PER_STAGE, NUM_CLASSES).to(device)
    return {"torch": reference, "torch_bn": torch_bn.convert(copy.deepcopy(reference))}


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def run(batch: int = 32, steps: int = 8, warmup: int = 1, device: str = "cpu", seed: int = 0) -> dict:
    """Trains both models for ``warmup + steps`` steps; times and losses of each."""
    models = make_models(device, seed)
    optimizers = {impl: torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM) for impl, model in models.items()}
    generator = torch.Generator().manual_seed(seed + 1)
    seconds = {impl: [] for impl in IMPLS}
    losses = {impl: [] for impl in IMPLS}
    for step in range(warmup + steps):
        images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
        for impl in IMPLS if step % 2 == 0 else reversed(IMPLS):
            elapsed, loss = timed_call(lambda: training_step(models[impl], optimizers[impl], images, labels), device)
            losses[impl].append(loss)
            if step >= warmup:
                seconds[impl].append(elapsed)
    step_ms = {impl: statistics.median(seconds[impl]) * 1e3 for impl in IMPLS}
    loss_rel_diff = max(abs(a - b) / abs(a) for a, b in zip(losses["torch"], losses["torch_bn"]))
    return {
        "model": f"ResNet, Bottleneck widths {WIDTHS}, {BLOCKS_PER_STAGE} blocks per stage, "
        f"{sum(isinstance(m, torch.nn.BatchNorm2d) for m in models['torch'].modules())} BatchNorm2d layers",
        "input": [batch, 3, IMAGE_SIZE, IMAGE_SIZE],
        "optimizer": f"SGD(lr={LEARNING_RATE}, momentum={MOMENTUM})",
        "device": device,
        "steps": steps,
        "warmup_steps": warmup,
        "step_ms": step_ms,
        "step_ms_all": {impl: [s * 1e3 for s in seconds[impl]] for impl in IMPLS},
        "speedup": step_ms["torch"] / step_ms["torch_bn"],
        "losses": losses,
        "max_loss_rel_diff": loss_rel_diff,
        "loss_rtol": LOSS_RTOL,
        "losses_agree": loss_rel_diff <= LOSS_RTOL,
    }


def describe(result: dict) -> str:
    ms = result["step_ms"]
    return (
        f"training step of {result['model']} on {result['input']}, {result['device']}: "
        f"torch {ms['torch']:.1f} ms, torch_bn {ms['torch_bn']:.1f} ms, speedup {result['speedup']:.2f}x "
        f"(median of {result['steps']} interleaved steps); losses agree to {result['max_loss_rel_diff']:.1e} "
        f"(tolerance {result['loss_rtol']:.0e}): {'yes' if result['losses_agree'] else 'NO'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per implementation (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    result = run(args.batch, args.steps, device=args.device)
    print(describe(result))
    return 0 if result["losses_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
