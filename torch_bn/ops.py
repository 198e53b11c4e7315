"""The torch_bn operators: one wrapper per op and its fake kernel.

The kernels and the ops' autograd are registered from C++ (csrc/ops.cpp has every schema,
csrc/autograd.cpp their gradients); loading ``torch_bn._C`` runs those registrations. Fake
kernels let ``torch.compile`` and ``torch.export`` trace the ops without running them.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the torch_bn operators)


def forward_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (output, batch mean, batch 1/sqrt(biased variance + eps))."""
    return torch.ops.torch_bn.forward_train.default(input, weight, bias, eps)


def forward_eval(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    return torch.ops.torch_bn.forward_eval.default(input, weight, bias, running_mean, running_var, eps)


def backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_weight, grad_bias); an output not asked for is an empty tensor."""
    return torch.ops.torch_bn.backward.default(grad_output, input, weight, mean, invstd, training, output_mask)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    momentum: Optional[float],
    eps: float,
    count: int,
    unbiased: bool,
) -> None:
    """Blends the batch statistics into the running ones in place (see csrc/ops.cpp)."""
    torch.ops.torch_bn.update_running_stats.default(
        running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count, unbiased
    )


def forward_train_update(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    unbiased: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """forward_train, then update_running_stats over the input's values per channel, in one call
    (a composite of the two ops; see csrc/forward_train_update.cpp)."""
    return torch.ops.torch_bn.forward_train_update.default(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, unbiased
    )


def stats_dtype(input: Tensor) -> torch.dtype:
    """The dtype of batch statistics (csrc/stats_type.h): float64 on the CPU, whose kernels keep
    them in double; elsewhere float64 for float64 input, float32 otherwise (as ATen)."""
    return torch.float64 if input.device.type == "cpu" or input.dtype == torch.float64 else torch.float32


def _kernel_layout_empty(input: Tensor) -> Tensor:
    # The kernels write contiguous and channels-last inputs in their own layout and copy any
    # other layout to contiguous first.
    channels_last = (input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last)) or (
        input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d)
    )
    if input.is_contiguous() or channels_last:
        return torch.empty_like(input)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _check_input(input: Tensor) -> None:
    torch._check(input.dim() >= 2, lambda: f"torch_bn: expected input of at least 2 dimensions, got {input.dim()}D input")
    torch._check(input.is_floating_point(), lambda: f"torch_bn: expected a floating-point input, got {input.dtype}")


def check_per_channel(input: Tensor, t: Optional[Tensor], name: str) -> None:
    """The C++ ops' check of a per-channel tensor, for fake kernels and for Python callers.

    Plain raises rather than torch._check with a message closure, which Dynamo cannot trace.
    """
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != input.shape[1]:
        raise RuntimeError(
            f"torch_bn: {name} should contain {input.shape[1]} elements (one per channel), got shape {list(t.shape)}"
        )
    # A tensor on another device can route the call to the fake kernel (meta) or to the wrong
    # backend, so the fake kernels check devices too.
    if t.device != input.device:
        raise RuntimeError(f"torch_bn: {name} is on {t.device} but expected {input.device}")
    if not t.is_floating_point():
        raise RuntimeError(f"torch_bn: {name} must be floating point, got {t.dtype}")


@torch.library.register_fake("torch_bn::forward_train")
def _forward_train_fake(input, weight, bias, eps):
    _check_input(input)
    check_per_channel(input, weight, "weight")
    check_per_channel(input, bias, "bias")
    channels = input.shape[1]
    stats = input.new_empty((channels,), dtype=stats_dtype(input))
    return _kernel_layout_empty(input), stats, torch.empty_like(stats)


@torch.library.register_fake("torch_bn::forward_eval")
def _forward_eval_fake(input, weight, bias, running_mean, running_var, eps):
    _check_input(input)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        check_per_channel(input, t, name)
    return _kernel_layout_empty(input)


@torch.library.register_fake("torch_bn::backward")
def _backward_fake(grad_output, input, weight, mean, invstd, training, output_mask):
    _check_input(input)
    channels = input.shape[1]
    param_dtype = weight.dtype if weight is not None else input.dtype
    grad_input = _kernel_layout_empty(input) if output_mask[0] else input.new_empty((0,))
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=param_dtype)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("torch_bn::update_running_stats")
def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count, unbiased):
    return None


def gradients(grad_output, input, weight, mean, invstd, training, needs_grad):
    """(grad_input, grad_weight, grad_bias) through the backward op, None where not needed."""
    mask = [bool(needs_grad[0]), bool(needs_grad[1]) and weight is not None, bool(needs_grad[2])]
    if not any(mask):
        return None, None, None
    grads = backward(grad_output, input, weight, mean, invstd, training, mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, mask))


def backward_formula(grad_output, input, weight, mean, invstd, training):
    """torch_bn::backward written in differentiable torch ops, ``mean`` and ``invstd`` taken as given.

    Returns (grad_input, grad_weight, grad_bias); grad_weight is None without a weight.
    """
    grad_input, grad_weight, grad_bias = torch.ops.torch_bn.backward_formula.default(
        grad_output, input, weight, mean, invstd, training
    )
    return grad_input, grad_weight if weight is not None else None, grad_bias


def training_backward_formula(grad_output, input, weight, eps):
    """backward_formula in training with the batch statistics recomputed from ``input`` in
    differentiable ops, so that their dependence on it is part of the graph."""
    grad_input, grad_weight, grad_bias = torch.ops.torch_bn.training_backward_formula.default(grad_output, input, weight, eps)
    return grad_input, grad_weight if weight is not None else None, grad_bias


# BatchNorm with a fused activation epilogue: z = BN(x) (+ residual), output = act(z); the sign
# of z is kept as a bit mask (1 bit per element) for the backward pass instead of the output.
ACTIVATIONS = ("identity", "relu", "leaky_relu")


def forward_train_act(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    activation: str,
    negative_slope: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (output, batch mean, batch invstd, mask of z > 0)."""
    return torch.ops.torch_bn.forward_train_act.default(input, weight, bias, residual, eps, activation, negative_slope)


def forward_eval_act(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    residual: Optional[Tensor],
    eps: float,
    activation: str,
    negative_slope: float,
) -> Tuple[Tensor, Tensor]:
    """Returns (output, mask of z > 0)."""
    return torch.ops.torch_bn.forward_eval_act.default(
        input, weight, bias, running_mean, running_var, residual, eps, activation, negative_slope
    )


def backward_act(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    mask: Tensor,
    training: bool,
    activation: str,
    negative_slope: float,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_weight, grad_bias, grad_residual); an output not asked for is empty."""
    return torch.ops.torch_bn.backward_act.default(
        grad_output, input, weight, mean, invstd, mask, training, activation, negative_slope, output_mask
    )


def eval_statistics(input: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(mean, invstd) that the backward ops take in evaluation: a copy of the running mean (so a
    later in-place update of the buffer cannot change a saved tensor) and 1/sqrt(running_var + eps)."""
    dtype = stats_dtype(input)
    return running_mean.to(dtype, copy=True), torch.rsqrt(running_var.to(dtype, copy=True).add_(eps))


def _check_act_inputs(input: Tensor, residual: Optional[Tensor], activation: str) -> None:
    torch._check(
        activation in ACTIVATIONS,
        lambda: f"torch_bn: activation must be 'identity', 'relu' or 'leaky_relu', got '{activation}'",
    )
    if residual is not None:
        torch._check(
            residual.shape == input.shape and residual.dtype == input.dtype and residual.device == input.device,
            lambda: f"torch_bn: residual should match the input ({list(input.shape)}, {input.dtype}, {input.device}), "
            f"got {list(residual.shape)}, {residual.dtype}, {residual.device}",
        )


def _mask_empty(input: Tensor, activation: str) -> Tensor:
    bits = 0 if activation == "identity" else input.numel()
    return input.new_empty(((bits + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("torch_bn::forward_train_act")
def _forward_train_act_fake(input, weight, bias, residual, eps, activation, negative_slope):
    _check_act_inputs(input, residual, activation)
    output, mean, invstd = _forward_train_fake(input, weight, bias, eps)
    return output, mean, invstd, _mask_empty(input, activation)


@torch.library.register_fake("torch_bn::forward_eval_act")
def _forward_eval_act_fake(input, weight, bias, running_mean, running_var, residual, eps, activation, negative_slope):
    _check_act_inputs(input, residual, activation)
    output = _forward_eval_fake(input, weight, bias, running_mean, running_var, eps)
    return output, _mask_empty(input, activation)


@torch.library.register_fake("torch_bn::backward_act")
def _backward_act_fake(grad_output, input, weight, mean, invstd, mask, training, activation, negative_slope, output_mask):
    _check_act_inputs(input, None, activation)
    grads = _backward_fake(grad_output, input, weight, mean, invstd, training, output_mask[:3])
    grad_residual = _kernel_layout_empty(input) if output_mask[3] else input.new_empty((0,))
    return (*grads, grad_residual)


def act_gradients(grad_output, input, weight, mean, invstd, mask, training, activation, negative_slope, needs_grad):
    """(grad_input, grad_weight, grad_bias, grad_residual) through backward_act, None where not
    needed; ``needs_grad`` is for (input, weight, bias, residual)."""
    output_mask = [bool(needs_grad[0]), bool(needs_grad[1]) and weight is not None, bool(needs_grad[2]), bool(needs_grad[3])]
    if not any(output_mask):
        return None, None, None, None
    grads = backward_act(grad_output, input, weight, mean, invstd, mask, training, activation, negative_slope, output_mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, output_mask))
