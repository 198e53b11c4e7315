"""The functional form of torch_bn: ``batch_norm`` (torch.nn.functional.batch_norm's signature)
and ``BatchNormFunction``, the autograd Function over the torch_bn operators."""

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops


class BatchNormFunction(torch.autograd.Function):
    """Batch normalization with gradients for input, weight and bias.

    ``forward(input, weight, bias, running_mean, running_var, training, eps)`` returns
    ``(output, mean, invstd)``: in training the batch statistics, in evaluation the running mean
    and 1/sqrt(running_var + eps); both are non-differentiable. First-order gradients run the
    fused backward kernel; under ``create_graph=True`` the backward is composed of
    differentiable torch ops, so double backward works.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, eps):
        if training:
            output, mean, invstd = ops.forward_train(input, weight, bias, eps)
        else:
            output = ops.forward_eval(input, weight, bias, running_mean, running_var, eps)
            mean, invstd = ops.eval_statistics(input, running_mean, running_var, eps)
        ctx.training = training
        ctx.eps = eps
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        return output, mean, invstd

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            grads = _differentiable_backward(grad_output, input, weight, mean, invstd, ctx.training, ctx.eps, needs)
        else:
            grads = ops.gradients(grad_output, input, weight, mean, invstd, ctx.training, needs)
        return (*grads, None, None, None, None)


def _differentiable_backward(grad_output, input, weight, mean, invstd, training, eps, needs):
    """The backward formulas in differentiable torch ops, for higher-order gradients.

    In training the statistics are recomputed from ``input`` so that their dependence on it is
    part of the graph; in evaluation they are constants.
    """
    if training:
        grads = ops.training_backward_formula(grad_output, input, weight, eps)
    else:
        grads = ops.backward_formula(grad_output, input, weight, mean, invstd, training)
    return tuple(g if wanted else None for g, wanted in zip(grads, needs))


# BatchNormFunction.apply's signature: (input, weight, bias, running_mean, running_var, training,
# eps) -> (output, mean, invstd). ``normalize`` takes any such function; it reads mean and invstd
# in training only.
BatchNormCall = Callable[
    [Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], bool, float],
    Tuple[Tensor, Optional[Tensor], Optional[Tensor]],
]


def needs_autograd(*tensors: Optional[Tensor]) -> bool:
    """Whether a gradient can be asked for through any of ``tensors`` (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def batch_norm_function(input, weight, bias, running_mean, running_var, training, eps):
    """The forward ops as a ``BatchNormCall``, with the ops' own autograd (registered in C++)
    rather than BatchNormFunction's: the same gradients, double backward included, without a
    Python Function's bookkeeping, which costs more than a small layer's kernel. In evaluation
    mean and invstd are None."""
    if training:
        return ops.forward_train(input, weight, bias, eps)
    return ops.forward_eval(input, weight, bias, running_mean, running_var, eps), None, None


def verify_batch_size(size: torch.Size) -> None:
    """torch's check (and message) that training sees more than one value per channel."""
    values = size[0]
    for extent in size[2:]:
        values *= extent
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def normalize(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
    unbiased_running_var: bool = True,
    function: BatchNormCall = batch_norm_function,
) -> Tensor:
    """Batch norm plus the running-statistics update, as the modules need it.

    ``momentum=None`` is the cumulative average over ``num_batches_tracked``, which is
    incremented (after every check has passed) when given. ``unbiased_running_var=False``
    stores the biased batch variance, as Keras and Flax do. ``function`` computes the output
    and the statistics the update reads (the fused activation layers pass their own).
    """
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("torch_bn: running_mean and running_var are required when training=False")
    if (running_mean is None) != (running_var is None):
        # torch's error: with one of them, training would update neither.
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    updates = training and running_mean is not None and running_var is not None
    if updates and momentum is None and num_batches_tracked is None:
        momentum = 0.0  # torch's factor when there is nothing to average over
    if updates and function is batch_norm_function:
        # The checks, the forward and the update in one op: as separate calls from here their
        # dispatch cost as much as a small layer's statistics.
        return ops.forward_train_update(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, unbiased_running_var
        )[0]
    if training:
        # The forward op never sees the running statistics in training: check them before it
        # runs, so that a bad buffer is reported as such and nothing is computed or changed.
        ops.check_per_channel(input, running_mean, "running_mean")
        ops.check_per_channel(input, running_var, "running_var")
    output, mean, invstd = function(input, weight, bias, running_mean, running_var, training, eps)
    if updates:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        with torch.no_grad():
            ops.update_running_stats(
                running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count, unbiased_running_var
            )
    return output


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm``: same signature, same semantics.

    In training the output uses the biased batch variance and, when running statistics are
    given, they are updated in place with ``momentum`` and the unbiased batch variance.
    """
    if momentum is None:
        # torch.nn.functional's error: only the modules read None as a cumulative average.
        raise TypeError("batch_norm(): argument 'momentum' must be float, not NoneType")
    if training:
        verify_batch_size(input.size())
    return normalize(input, running_mean, running_var, weight, bias, training, momentum, eps)
