"""Building torch_bn layers from Keras and Flax BatchNorm weights, with their training conventions.

| | torch | Keras | Flax |
|---|---|---|---|
| names | weight, bias, running_mean, running_var | gamma, beta, moving_mean, moving_variance | scale, bias, mean, var |
| momentum | factor on the batch (0.1) | decay of the running value (0.99) | as Keras |
| eps | 1e-5 | 1e-3 | 1e-5 |
| running variance | unbiased | biased | biased |

A layer built here keeps the source framework's behaviour from then on: torch momentum is
``1 - momentum``, and ``running_var_biased=True`` stores the biased batch variance and accepts
one value per channel in training.
"""

import math
from typing import Any, Optional

import torch


class KerasFlaxConstructors:
    """``from_keras`` and ``from_flax`` classmethods for the torch_bn BatchNorm classes."""

    @classmethod
    def from_keras(
        cls,
        gamma: Any,
        beta: Any,
        moving_mean: Any,
        moving_variance: Any,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        """A layer holding a Keras ``BatchNormalization``'s weights and training like it.

        Arguments are array-likes of one value per channel (numpy arrays, tensors, lists);
        ``gamma=None`` means ones and ``beta=None`` zeros, Keras' initial values.
        ``momentum`` and ``epsilon`` are Keras' (defaults: Keras' defaults).
        """
        return _build(cls, gamma, beta, moving_mean, moving_variance, momentum, epsilon, device, dtype)

    @classmethod
    def from_flax(
        cls,
        scale: Any,
        bias: Any,
        mean: Any,
        var: Any,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        """A layer holding a Flax ``BatchNorm``'s ``params`` (scale, bias) and ``batch_stats``
        (mean, var) and training like it; ``scale=None`` means ones and ``bias=None`` zeros.
        ``momentum`` and ``epsilon`` are Flax's (defaults: Flax's defaults).
        """
        return _build(cls, scale, bias, mean, var, momentum, epsilon, device, dtype)


def _build(cls, scale, shift, mean, var, decay, eps, device, dtype):
    momentum = _torch_momentum(decay)
    values = {"running_mean": _per_channel(mean), "running_var": _per_channel(var)}
    if values["running_mean"].dim() != 1:
        raise ValueError(f"{cls.__name__}: expected a 1D running mean, got shape {tuple(values['running_mean'].shape)}")
    channels = values["running_mean"].shape[0]
    values["weight"] = torch.ones(channels) if scale is None else _per_channel(scale)
    values["bias"] = torch.zeros(channels) if shift is None else _per_channel(shift)
    for name, value in values.items():
        if value.shape != (channels,):
            raise ValueError(
                f"{cls.__name__}: expected one value per channel ({channels}) for {name}, got shape {tuple(value.shape)}"
            )
    layer = cls(
        channels,
        eps=eps,
        momentum=momentum,
        affine=True,
        track_running_stats=True,
        device=device,
        dtype=dtype,
        running_var_biased=True,
    )
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(value)
    return layer


def _torch_momentum(decay: float) -> float:
    # A decay outside [0, 1] would make torch's momentum one too, and the running statistics
    # diverge; checked before anything is built.
    try:
        value = float(decay)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum (the decay of the running statistics) must be a number in [0, 1], got {decay!r}")
    # 1 - 0.99 is 0.010000000000000009 in binary; 15 significant digits drop that representation
    # error (far below float32's resolution) so that the repr reads momentum=0.01.
    return float(f"{1.0 - value:.15g}")


def _per_channel(values: Any) -> torch.Tensor:
    # np.asarray-able objects (TensorFlow and JAX arrays included) go through the array protocol.
    if not isinstance(values, torch.Tensor) and hasattr(values, "__array__"):
        values = values.__array__()
    return torch.as_tensor(values).detach().cpu()
