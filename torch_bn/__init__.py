"""torch_bn: fast, exact BatchNorm for PyTorch with its own fused C++ (and CUDA) kernels."""

from . import ops
from .functional import BatchNormFunction, batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction", "batch_norm", "ops"]
