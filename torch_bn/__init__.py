"""torch_bn: fast, exact BatchNorm for PyTorch with its own fused C++ (and CUDA) kernels."""

from . import ops
from .activation import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchNormActFunction, batch_norm_act
from .conversion import convert, convert_sync_batchnorm, revert
from .freezing import freeze, freeze_all_but_batchnorm, unfreeze
from .functional import BatchNormFunction, batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm, SyncBatchNormFunction

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormActFunction",
    "BatchNormFunction",
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "batch_norm",
    "batch_norm_act",
    "convert",
    "convert_sync_batchnorm",
    "freeze",
    "freeze_all_but_batchnorm",
    "ops",
    "revert",
    "unfreeze",
]
