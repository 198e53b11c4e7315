"""``torch_bn.BatchNorm1d/2d/3d``: the torch.nn classes with torch_bn's kernels.

Each is a subclass of its torch.nn counterpart, so parameters, buffers, state_dict keys,
repr, ``isinstance`` checks and checkpoints are those of torch.nn; only ``forward`` differs.
Two options beyond torch.nn are plain attributes (pickled with the module, shown in the repr
when set, never in the state_dict, so checkpoints load into torch.nn and back):

- ``running_var_biased`` (constructor keyword): the running variance is updated with the biased
  batch variance, as Keras and Flax do, and training on one value per channel is allowed (the
  output is then ``bias``), since only the unbiased variance is undefined there.
- ``frozen`` (set by ``torch_bn.freeze``): the layer computes what it computes in evaluation
  mode even when ``training`` is True, so a parent's ``.train()`` does not undo it.
"""

from typing import Any

import torch
import torch.fx
from torch import Tensor

from .conventions import KerasFlaxConstructors
from .functional import BatchNormCall, batch_norm_function, normalize, verify_batch_size


def traced_as_leaf(module: torch.nn.Module, *args: Any) -> torch.fx.Proxy:
    """``module(*args)`` under torch.fx's symbolic tracing (an argument is a Proxy), recorded as
    one call_module node, as FX records torch.nn's layers: its default tracer traces into every
    module defined outside torch.nn, and a BatchNorm's input checks cannot branch on a Proxy
    (symbolic_trace, prepare_fx and fuse_fx raised TraceError on converted models)."""
    tracer = next(arg for arg in args if isinstance(arg, torch.fx.Proxy)).tracer
    if getattr(tracer, "root", None) is module:
        raise torch.fx.proxy.TraceError(
            f"torch_bn: a {type(module).__name__} traced as the root cannot be traced into (nor can torch.nn's); "
            "trace a module that contains it"
        )
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class _TorchBNForward(KerasFlaxConstructors):
    """torch.nn's _BatchNorm.forward, computed by the torch_bn operators.

    Unlike torch, which bumps ``num_batches_tracked`` before the input is checked, nothing is
    changed until every check has passed.
    """

    # Class-level defaults: layers converted from torch.nn (by a class change) and layers
    # pickled before an option existed read these.
    running_var_biased = False
    frozen = False

    def __init__(self, *args, running_var_biased: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.running_var_biased = running_var_biased

    @property
    def _training_mode(self) -> bool:
        """Whether this call trains: ``training`` unless the layer is frozen."""
        return self.training and not self.frozen

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input)
        return self._normalize(input)

    def _normalize(self, input: Tensor, function: BatchNormCall = batch_norm_function) -> Tensor:
        """The module's batch norm (statistics and their update as its flags say), computed by
        ``function`` (see ``functional.normalize``)."""
        self._check_input_dim(input)
        training_mode = self._training_mode
        # Running statistics are read in evaluation and updated in training when tracked.
        use_running = not training_mode or self.track_running_stats
        tracking = training_mode and self.track_running_stats
        running_mean = self._registered("running_mean") if use_running else None
        running_var = self._registered("running_var") if use_running else None
        batch_stats = training_mode or (running_mean is None and running_var is None)
        if batch_stats and not self.running_var_biased:
            verify_batch_size(input.size())
        return normalize(
            input,
            running_mean,
            running_var,
            self._registered("weight"),
            self._registered("bias"),
            batch_stats,
            self.momentum,
            self.eps,
            num_batches_tracked=self._registered("num_batches_tracked") if tracking else None,
            unbiased_running_var=not self.running_var_biased,
            function=function,
        )

    def _registered(self, name: str):
        """``getattr(self, name)`` for a parameter or buffer, read from nn.Module's dicts, where
        its ``__setattr__`` keeps them. Through its ``__getattr__``, a call's reads made
        evaluation and forward-train 2.4-3 µs slower at 2x8x4x4 and 8-16 µs (2-8%) at 32x512x7x7
        and 32x256x14x14 float32 (medians of 9 rounds interleaved in one process, 2 threads,
        Intel Xeon VM)."""
        parameters, buffers = self._parameters, self._buffers
        if name in parameters:
            return parameters[name]
        if name in buffers:
            return buffers[name]
        return getattr(self, name)

    def extra_repr(self) -> str:
        options = [name for name in ("running_var_biased", "frozen") if getattr(self, name)]
        return ", ".join([super().extra_repr()] + [f"{name}=True" for name in options])


class BatchNorm1d(_TorchBNForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d (2D or 3D input) with torch_bn's kernels.

    Takes torch.nn.BatchNorm1d's arguments, plus the keyword ``running_var_biased``.
    """


class BatchNorm2d(_TorchBNForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d (4D input) with torch_bn's kernels.

    Takes torch.nn.BatchNorm2d's arguments, plus the keyword ``running_var_biased``.
    """


class BatchNorm3d(_TorchBNForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d (5D input) with torch_bn's kernels.

    Takes torch.nn.BatchNorm3d's arguments, plus the keyword ``running_var_biased``.
    """
