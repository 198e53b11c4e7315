"""What is timed: the implementations, the modes, and the callables that run one of each.

Every implementation is a BatchNorm2d with the same randomized parameters and running statistics
(drawn once per case), fed the same random input and output gradient.
"""

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

import torch_bn

from .shapes import Shape

IMPLS = ("torch_bn", "torch", "torch.compile")
PEERS = ("torch", "torch.compile")
MODES = ("forward-train", "forward-eval", "backward", "forward+backward")
# The fewest bytes a mode must move, in units of S = the size of x: forward reads x and writes y;
# backward reads x and dy and writes dx; forward+backward does both.
MINIMAL_TRAFFIC = {"forward-train": 2, "forward-eval": 2, "backward": 3, "forward+backward": 5}
COPY_TRAFFIC = 2  # a copy of x reads x and writes the copy
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class Case:
    """One input configuration; every mode and implementation is timed on it."""

    shape: Shape
    layers: int  # how many of ResNet-50's BatchNorm layers see this shape
    dtype: str
    layout: str

    def random_tensor(self, device: str) -> torch.Tensor:
        # Drawn in float32 so that both dtypes see the same numbers, up to rounding.
        values = torch.randn(self.shape, device=device)
        return values.to(dtype=DTYPES[self.dtype], memory_format=LAYOUTS[self.layout])

    def bytes(self) -> int:
        """S, the size of x in bytes."""
        return torch.Size(self.shape).numel() * DTYPES[self.dtype].itemsize


def reference_batch_norm(case: Case, device: str) -> torch.nn.BatchNorm2d:
    """A torch.nn.BatchNorm2d whose parameters and running statistics are not the trivial
    initial ones (an identity affine transform could hide work a kernel skips)."""
    channels = case.shape[1]
    layer = torch.nn.BatchNorm2d(channels, device=device)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_(0.0, 0.1)
        layer.running_var.uniform_(0.5, 1.5)
    return layer.to(DTYPES[case.dtype])


def implementation(impl: str, reference: torch.nn.BatchNorm2d, training: bool) -> torch.nn.Module:
    """A fresh copy of ``reference`` run by ``impl``, in training or evaluation mode."""
    layer = copy.deepcopy(reference).train(training)
    if impl == "torch_bn":
        return torch_bn.convert(layer)
    if impl == "torch.compile":
        # One static graph per shape: dynamic shapes would reuse graphs but give slower kernels.
        return torch.compile(layer, dynamic=False)
    return layer


def mode_functions(train_layer: torch.nn.Module, eval_layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Dict[str, Callable]:
    """One callable per mode. The forward modes run without autograd, as a kernel comparison;
    the backward modes differentiate with respect to x, weight and bias. ``backward`` reuses one
    retained forward graph, so only the backward pass is timed."""
    x_leaf = x.detach().clone().requires_grad_()
    inputs: Tuple[torch.Tensor, ...] = (x_leaf, *train_layer.parameters())
    retained_output = train_layer(x_leaf)

    @torch.no_grad()
    def forward_train():
        return train_layer(x)

    @torch.no_grad()
    def forward_eval():
        return eval_layer(x)

    def backward():
        return torch.autograd.grad(retained_output, inputs, dy, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(train_layer(x_leaf), inputs, dy)

    functions = {
        "forward-train": forward_train,
        "forward-eval": forward_eval,
        "backward": backward,
        "forward+backward": forward_backward,
    }
    return functions
