"""Freezing BatchNorm layers for fine-tuning, in a way a parent's ``.train()`` does not undo.

A frozen layer behaves like Keras' ``trainable=False`` BatchNormalization: it normalizes with
its running statistics, never updates them, and its weight and bias do not require grad (a
layer built with ``track_running_stats=False`` has none and keeps using batch statistics, as in
evaluation). The ``frozen`` flag is a plain attribute: it survives pickling
(``torch.save(model)``) but is not in the state_dict, so a state_dict loads into torch.nn and
torch_bn models alike; freeze the model that receives it (before or after loading).
"""

from typing import Optional, Tuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .conversion import TORCH_TO_TORCH_BN, convert
from .modules import _TorchBNForward


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Freezes every BatchNorm layer in ``module`` (the root included), converting torch.nn layers
    to torch_bn in place; returns ``module``. Raises TypeError, changing nothing, on a BatchNorm
    layer it cannot convert (a subclass of a torch.nn class, a LazyBatchNorm before its first forward).
    """
    unconvertible = [
        f"{name or 'the root'} ({type(layer).__name__})"
        for name, layer in module.named_modules()
        if isinstance(layer, _BatchNorm) and not isinstance(layer, _TorchBNForward) and type(layer) not in TORCH_TO_TORCH_BN
    ]
    if unconvertible:
        raise TypeError(
            "torch_bn.freeze: cannot freeze " + ", ".join(unconvertible) + ": only torch.nn.BatchNorm1d/2d/3d, "
            "torch.nn.SyncBatchNorm and torch_bn's layers can be frozen (run a lazy layer once first)"
        )
    convert(module)
    for layer in module.modules():
        if isinstance(layer, _TorchBNForward):
            if not layer.frozen:
                layer.__dict__[_FLAGS_BEFORE_FREEZE] = _trainable_flags(layer)
            layer.frozen = True
            _set_trainable(layer, (False, False))
    return module


def unfreeze(module: torch.nn.Module) -> torch.nn.Module:
    """Makes every frozen BatchNorm layer in ``module`` train normally again (batch statistics in
    training, running statistics updated, weight and bias requiring grad as they did before
    ``freeze``); returns ``module``. The layers stay torch_bn layers (``torch_bn.revert`` turns
    them back into torch.nn ones)."""
    for layer in module.modules():
        if isinstance(layer, _TorchBNForward) and layer.frozen:
            layer.frozen = False
            _set_trainable(layer, layer.__dict__.pop(_FLAGS_BEFORE_FREEZE, (True, True)))
    return module


def freeze_all_but_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """The other fine-tuning recipe: every parameter outside BatchNorm layers stops requiring
    grad, and the BatchNorm layers train normally (``unfreeze``), their weight and bias
    requiring grad as they did; returns ``module``."""
    layers = [layer for layer in unfreeze(module).modules() if isinstance(layer, _BatchNorm)]
    flags = [_trainable_flags(layer) for layer in layers]
    module.requires_grad_(False)
    for layer, layer_flags in zip(layers, flags):
        _set_trainable(layer, layer_flags)
    return module


# Where freeze keeps a layer's (weight, bias) requires_grad flags for unfreeze: a layer whose
# weight the user fixed (Keras' scale=False, see the README) must not come back trainable.
_FLAGS_BEFORE_FREEZE = "_requires_grad_before_freeze"


def _trainable_flags(layer: _BatchNorm) -> Tuple[Optional[bool], Optional[bool]]:
    return tuple(None if p is None else p.requires_grad for p in (layer.weight, layer.bias))


def _set_trainable(layer: _BatchNorm, flags: Tuple[Optional[bool], Optional[bool]]) -> None:
    for parameter, flag in zip((layer.weight, layer.bias), flags):
        if parameter is not None:
            parameter.requires_grad_(flag is not False)
