"""``torch_bn.BatchNorm1d/2d/3d``: the torch.nn classes with torch_bn's kernels.

Each is a subclass of its torch.nn counterpart, so parameters, buffers, state_dict keys,
repr, ``isinstance`` checks and checkpoints are those of torch.nn; only ``forward`` differs.
"""

import torch
from torch import Tensor

from .functional import normalize, verify_batch_size


class _TorchBNForward:
    """torch.nn's _BatchNorm.forward, computed by the torch_bn operators.

    Unlike torch, which bumps ``num_batches_tracked`` before the input is checked, nothing is
    changed until every check has passed.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        training = self.training or (self.running_mean is None and self.running_var is None)
        if training:
            verify_batch_size(input.size())
        # Running statistics are read in evaluation and updated in training when tracked.
        use_running = not self.training or self.track_running_stats
        tracking = self.training and self.track_running_stats
        return normalize(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            training,
            self.momentum,
            self.eps,
            num_batches_tracked=self.num_batches_tracked if tracking else None,
        )


class BatchNorm1d(_TorchBNForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d (2D or 3D input) with torch_bn's kernels."""


class BatchNorm2d(_TorchBNForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d (4D input) with torch_bn's kernels."""


class BatchNorm3d(_TorchBNForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d (5D input) with torch_bn's kernels."""
