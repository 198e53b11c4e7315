"""BatchNorm fused with its activation (and a residual add): ``act(batchnorm(x) + residual)``.

The fused operators add the residual and apply the activation in BatchNorm's normalize pass, and
keep the sign of ``z = batchnorm(x) + residual`` as a bit mask (1 bit per element) for backward,
so that backward reads ``input`` and the mask instead of a saved full-size output; its first
step, ``dz = grad_output * act'(z)``, is fused into BatchNorm's backward, and ``dz`` is also the
residual's gradient.

- ``BatchNormActFunction``: the autograd Function (first-order gradients only).
- ``batch_norm_act``: the functional form, ``torch.nn.functional.batch_norm``'s signature plus
  keyword-only ``residual``, ``activation`` and ``negative_slope``.
- ``BatchNormAct1d/2d/3d``: subclasses of torch_bn's ``BatchNorm1d/2d/3d`` (so of torch.nn's),
  with their parameters, buffers, state_dict keys and running-statistics semantics, and
  ``forward(input, residual=None)``.
"""

from typing import Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops
from .functional import BatchNormCall, batch_norm_function, needs_autograd, normalize, verify_batch_size
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, traced_as_leaf

ACTIVATIONS = ops.ACTIVATIONS
DEFAULT_NEGATIVE_SLOPE = 0.01  # torch.nn.LeakyReLU's


class BatchNormActFunction(torch.autograd.Function):
    """``act(batch_norm(input) + residual)`` with gradients for input, weight, bias and residual.

    ``forward(input, weight, bias, running_mean, running_var, training, eps, residual, activation,
    negative_slope)`` returns ``(output, mean, invstd)`` as ``BatchNormFunction`` does (the first
    seven arguments are its own). ``residual`` is None or a tensor of the input's shape, dtype
    and device (any strides). Saved for backward: the input, the weight, the per-channel mean
    and invstd, and the bit mask. Double backward is not supported (it raises).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, eps, residual, activation, negative_slope):
        if training:
            output, mean, invstd, mask = ops.forward_train_act(input, weight, bias, residual, eps, activation, negative_slope)
        else:
            output, mask = ops.forward_eval_act(
                input, weight, bias, running_mean, running_var, residual, eps, activation, negative_slope
            )
            mean, invstd = ops.eval_statistics(input, running_mean, running_var, eps)
        ctx.training = training
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.save_for_backward(input, weight, mean, invstd, mask)
        ctx.mark_non_differentiable(mean, invstd)
        return output, mean, invstd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_input, grad_weight, grad_bias, grad_residual = ops.act_gradients(
            grad_output, input, weight, mean, invstd, mask, ctx.training, ctx.activation, ctx.negative_slope, (*needs[:3], needs[7])
        )
        return grad_input, grad_weight, grad_bias, None, None, None, None, grad_residual, None, None


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"torch_bn: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")


def apply_activation(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    """The activation as torch ops (the unfused path)."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    return z


def activated(
    normalize_with: Callable[[BatchNormCall], Tensor],
    input: Tensor,
    residual: Optional[Tensor],
    activation: str,
    negative_slope: float,
) -> Tensor:
    """``act(bn(input) + residual)``, where ``normalize_with(function)`` is the caller's batch norm
    (with its running-statistics update) computed by ``function``.

    Fused when ``residual`` is None or matches the input's shape, dtype and device. Any other
    residual (one that broadcasts, or of another dtype) is added unfused, with torch's
    broadcasting and type promotion, as ``bn(input) + residual`` would be.
    """
    if residual is not None and (residual.shape, residual.dtype, residual.device) != (input.shape, input.dtype, input.device):
        return apply_activation(normalize_with(batch_norm_function) + residual, activation, negative_slope)

    def fused(input, weight, bias, running_mean, running_var, training, eps):
        # As batch_norm_function: the forward op alone where no gradient can be asked for (the
        # mask it returns is then not needed).
        if needs_autograd(input, weight, bias, residual):
            return BatchNormActFunction.apply(
                input, weight, bias, running_mean, running_var, training, eps, residual, activation, negative_slope
            )
        if training:
            output, mean, invstd, _mask = ops.forward_train_act(input, weight, bias, residual, eps, activation, negative_slope)
            return output, mean, invstd
        output, _mask = ops.forward_eval_act(
            input, weight, bias, running_mean, running_var, residual, eps, activation, negative_slope
        )
        return output, None, None

    return normalize_with(fused)


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    activation: str = "relu",
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> Tensor:
    """``act(F.batch_norm(input, ...) + residual)`` in the passes of one batch norm.

    The arguments up to ``eps`` are ``torch.nn.functional.batch_norm``'s, with its semantics
    (running statistics updated in place in training). ``activation`` is "relu", "leaky_relu"
    (with ``negative_slope``) or "identity"; ``residual`` (optional) is added before it.
    First-order gradients only.
    """
    check_activation(activation)
    if training:
        verify_batch_size(input.size())

    def normalize_with(function: BatchNormCall) -> Tensor:
        return normalize(input, running_mean, running_var, weight, bias, training, momentum, eps, function=function)

    return activated(normalize_with, input, residual, activation, negative_slope)


class _BatchNormActForward:
    """``forward(input, residual=None)`` = ``act(batchnorm(input) + residual)`` for a torch_bn
    BatchNorm class.

    Constructor: ``(num_features, activation="relu", *, negative_slope=0.01, **kwargs)`` with
    the BatchNorm class's keyword arguments (eps, momentum, affine, track_running_stats, device,
    dtype, running_var_biased). ``activation`` and ``negative_slope`` are plain attributes, shown
    in the repr, never in the state_dict, so BatchNorm checkpoints load into the fused layers
    and back. First-order gradients only.
    """

    def __init__(self, num_features: int, activation: str = "relu", *, negative_slope: float = DEFAULT_NEGATIVE_SLOPE, **kwargs):
        check_activation(activation)
        super().__init__(num_features, **kwargs)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if isinstance(input, torch.fx.Proxy) or isinstance(residual, torch.fx.Proxy):
            return traced_as_leaf(self, input, residual)

        def normalize_with(function: BatchNormCall) -> Tensor:
            return self._normalize(input, function)

        return activated(normalize_with, input, residual, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        activation = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            activation += f", negative_slope={self.negative_slope}"
        return f"{super().extra_repr()}, {activation}"


class BatchNormAct1d(_BatchNormActForward, BatchNorm1d):
    """torch_bn.BatchNorm1d (2D or 3D input), then ``+ residual`` and the activation, fused."""


class BatchNormAct2d(_BatchNormActForward, BatchNorm2d):
    """torch_bn.BatchNorm2d (4D input), then ``+ residual`` and the activation, fused."""


class BatchNormAct3d(_BatchNormActForward, BatchNorm3d):
    """torch_bn.BatchNorm3d (5D input), then ``+ residual`` and the activation, fused."""
