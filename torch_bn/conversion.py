"""Switching the BatchNorm layers of a module tree between torch.nn and torch_bn.

A layer is converted by changing its class in place (as torch's LazyModuleMixin turns a lazy
layer into its final class): the torch_bn classes subclass the torch.nn ones and add no state, so
the very same parameters and buffers (num_batches_tracked included), hooks, training flag,
requires_grad, device and dtype stay, and an optimizer built beforehand keeps working.

Only the exact classes are converted: a subclass of a torch.nn layer may override ``forward``,
and a LazyBatchNorm has no parameters until its first forward turns it into a torch.nn
BatchNorm (convert after that).
"""

from typing import Callable, Optional

import torch

from . import fusion
from .activation import _BatchNormActForward
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _TorchBNForward
from .sync import SyncBatchNorm

TORCH_TO_TORCH_BN = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.SyncBatchNorm: SyncBatchNorm,
}
TORCH_BN_TO_TORCH = {torch_bn_class: torch_class for torch_class, torch_bn_class in TORCH_TO_TORCH_BN.items()}

# The torch_bn-only attributes, which torch.nn has no equivalent for when True.
_TORCH_BN_OPTIONS = ("running_var_biased", "frozen")


def convert(module: torch.nn.Module, fuse_activations: bool = False) -> torch.nn.Module:
    """Turns every torch.nn BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` (the root included)
    into its torch_bn counterpart, in place, and returns ``module``.

    ``fuse_activations=True`` then also fuses BatchNorm -> ReLU and BatchNorm -> add -> ReLU
    (LeakyReLU too) into ``BatchNormAct`` layers with torch.fx, and returns the fused module,
    which may be a new ``torch.fx.GraphModule`` sharing ``module``'s parameters and buffers
    (see ``torch_bn.fusion.fuse_activations``): use the returned module.
    """
    _retype_all(module, TORCH_TO_TORCH_BN.get)
    return fusion.fuse_activations(module) if fuse_activations else module


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """Turns every torch_bn layer in ``module`` back into its torch.nn class, in place, and returns
    ``module``. Raises ValueError, changing nothing, if a layer is frozen, has
    ``running_var_biased=True`` or a fused activation: torch.nn cannot express those."""
    unrepresentable = [
        f"{name or 'the root'} ({option}=True)"
        for name, layer in module.named_modules()
        if isinstance(layer, _TorchBNForward)
        for option in _TORCH_BN_OPTIONS
        if getattr(layer, option)
    ] + [
        f"{name or 'the root'} (activation={layer.activation!r})"
        for name, layer in module.named_modules()
        if isinstance(layer, _BatchNormActForward)
    ]
    if unrepresentable:
        raise ValueError(
            "torch_bn.revert: torch.nn has no equivalent for " + ", ".join(unrepresentable) + "; unfreeze first or keep the torch_bn layers"
        )
    _retype_all(module, TORCH_BN_TO_TORCH.get)
    for layer in module.modules():
        if type(layer) in TORCH_TO_TORCH_BN:
            for option in _TORCH_BN_OPTIONS:
                layer.__dict__.pop(option, None)
    return module


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm with torch_bn layers: every BatchNorm1d/2d/3d
    and SyncBatchNorm of torch.nn or torch_bn in ``module`` becomes a ``torch_bn.SyncBatchNorm``
    reducing over ``process_group`` (None: the default group), in place; returns ``module``."""
    convertible = set(TORCH_TO_TORCH_BN) | set(TORCH_BN_TO_TORCH)
    _retype_all(module, lambda cls: SyncBatchNorm if cls in convertible else None)
    for layer in module.modules():
        if type(layer) is SyncBatchNorm:
            layer.process_group = process_group
    return module


def _retype_all(module: torch.nn.Module, new_class_of: Callable[[type], Optional[type]]) -> torch.nn.Module:
    for layer in module.modules():
        new_class = new_class_of(type(layer))
        if new_class is not None:
            layer.__class__ = new_class
    return module
