"""``torch_bn.SyncBatchNorm``: batch statistics over every process of a torch.distributed group.

Forward: each process takes its per-channel (count, mean, M2) from the forward_train kernel,
all-gathers them and merges them in float64 with Chan et al.'s pairwise formula, so processes
may hold different batch sizes, none included; forward_eval then normalizes with the global
mean and variance, and the running statistics are updated with the global count.

Backward: the two per-channel sums Σdy and Σdy·xhat are all-reduced and each process computes
its slice of ``dx = weight·invstd·(dy - Σdy/N - xhat·Σdy·xhat/N)``. The weight and bias
gradients are this process's share, as in torch.nn.SyncBatchNorm: DDP's gradient all-reduce
combines them.

Works with any backend that has all_gather and all_reduce (gloo on CPU, NCCL on CUDA); outside
torch.distributed, with a group of one process, or in evaluation, it is a plain torch_bn layer.
"""

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from . import ops
from .modules import _TorchBNForward


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics and gradient sums reduced over ``process_group``.

    ``forward(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
    running_var_biased, process_group)``; the running statistics (when given) are updated in place.
    First-order gradients only, as torch.nn.SyncBatchNorm.
    """

    @staticmethod
    def forward(
        ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, running_var_biased, process_group
    ):
        count, mean, var = _global_statistics(input, eps, process_group)
        if count == 1 and not running_var_biased:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel over the process "
                f"group (input size {input.size()} on this process)"
            )
        output = ops.forward_eval(input, weight, bias, mean, var, eps)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            ops.update_running_stats(
                running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count, not running_var_biased
            )
        ctx.save_for_backward(input, weight, mean, var, invstd)
        ctx.count = count
        ctx.eps = eps
        ctx.process_group = process_group
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, var, invstd = ctx.saved_tensors
        # In evaluation mode the backward kernel's grad_weight and grad_bias are Σdy·xhat and Σdy
        # for the given mean and invstd; a unit weight of the statistics' dtype returns them in
        # float32 (float64) whatever the parameters' dtype.
        _, sum_dy_xhat, sum_dy = ops.backward(
            grad_output, input, torch.ones_like(mean), mean, invstd, False, [False, True, True]
        )
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.process_group)
            grad_input = _input_gradient(grad_output, input, weight, mean, var, invstd, sums, ctx.count, ctx.eps)
        param_dtype = weight.dtype if weight is not None else input.dtype
        grad_weight = sum_dy_xhat.to(param_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(param_dtype) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _global_statistics(input: Tensor, eps: float, group) -> Tuple[int, Tensor, Tensor]:
    """(N, mean, biased variance) per channel over the group; statistics in ops.stats_dtype."""
    channels = input.shape[1]
    count = input.numel() // channels
    # forward_train's output is discarded: it is the kernel that computes the statistics.
    # An empty input gives mean 0 and invstd 1/sqrt(eps), hence M2 = 0.
    _, mean, invstd = ops.forward_train(input, None, None, eps)
    var = (invstd.double().pow(-2) - eps).clamp_min_(0)
    local = torch.cat([mean.new_tensor([count], dtype=torch.float64), mean.double(), var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stats = torch.stack(gathered)
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - global_mean) ** 2).sum(0)
    dtype = ops.stats_dtype(input)
    return int(total.item()), global_mean.to(dtype), (m2 / total).to(dtype)


def _input_gradient(grad_output, input, weight, mean, var, invstd, sums, count, eps) -> Tensor:
    """``dx = a·dy + (xhat·w' + b')`` with ``a = weight·invstd``, ``w' = -a·Σdy·xhat/N`` and
    ``b' = -a·Σdy/N``: per channel an affine function of xhat, which forward_eval evaluates in one
    pass from ``input`` (the backward kernel cannot be used: it takes its sums from the local batch).
    """
    sum_dy, sum_dy_xhat = sums
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    grad_input = ops.forward_eval(input, -scale * sum_dy_xhat / count, -scale * sum_dy / count, mean, var, eps)
    shape = [1, -1] + [1] * (input.dim() - 2)
    return grad_input.addcmul_(grad_output, scale.view(shape))


class SyncBatchNorm(_TorchBNForward, _BatchNorm):
    """torch.nn.SyncBatchNorm with torch_bn's kernels, on CPU (gloo) as well as CUDA (NCCL).

    Takes torch.nn.SyncBatchNorm's arguments (``process_group=None`` is the default group), plus
    the keyword ``running_var_biased``, and accepts any input of at least 2 dimensions. Unlike
    the other torch_bn layers it is not a subclass of its torch.nn counterpart: DDP refuses every
    ``torch.nn.SyncBatchNorm`` instance on CPU. It is a ``_BatchNorm`` with the same attributes,
    parameters and buffers, so state_dicts and ``torch_bn.revert`` go both ways.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        *,
        running_var_biased: bool = False,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, running_var_biased=running_var_biased
        )
        self.process_group = process_group

    # torch.nn.SyncBatchNorm's input checks and messages.
    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        tracking = self.track_running_stats
        return SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.num_batches_tracked if tracking else None,
            self.momentum,
            self.eps,
            self.running_var_biased,
            group,
        )

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        """The group to reduce over, or None when this call computes what a plain layer does."""
        if not (self._training_mode and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """``torch_bn.convert_sync_batchnorm`` (torch.nn's classmethod would build torch.nn layers)."""
        from .conversion import convert_sync_batchnorm  # conversion imports this module

        return convert_sync_batchnorm(module, process_group)
