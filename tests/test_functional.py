"""torch_bn.batch_norm against torch.nn.functional.batch_norm, and gradcheck/gradgradcheck of the
functional form, the autograd Function and the modules in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torch_bn

SHAPES = {1: (5, 3), 2: (3, 3, 4, 2), 3: (2, 3, 2, 3, 2)}
# Both libraries compute float32 batch norm in float32; sums over a few dozen values agree to a
# few units in the last place.
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
FLOAT64_TOLERANCE = dict(rtol=1e-10, atol=1e-10)


def channel_stats(channels, dtype, device):
    """Random running statistics and affine parameters (never the 0/1 defaults)."""
    return dict(
        running_mean=torch.randn(channels, dtype=dtype, device=device),
        running_var=torch.rand(channels, dtype=dtype, device=device) + 0.5,
        weight=torch.rand(channels, dtype=dtype, device=device) + 0.5,
        bias=torch.randn(channels, dtype=dtype, device=device),
    )


@pytest.mark.parametrize("momentum", [0.1, 0.7])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
# Evaluation without running statistics is an error (test_errors), so it is not among these.
@pytest.mark.parametrize("training, with_running_stats", [(True, True), (True, False), (False, True)], ids=["train", "train-nostats", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_matches_functional_batch_norm(dims, dtype, training, affine, with_running_stats, momentum, device):
    tolerance = FLOAT64_TOLERANCE if dtype == torch.float64 else FLOAT32_TOLERANCE
    stats = channel_stats(3, dtype, device)
    if not affine:
        stats.update(weight=None, bias=None)
    if not with_running_stats:
        stats.update(running_mean=None, running_var=None)
    ours = {k: v.clone().requires_grad_(k in ("weight", "bias")) if v is not None else None for k, v in stats.items()}
    ref = {k: v.clone().requires_grad_(k in ("weight", "bias")) if v is not None else None for k, v in stats.items()}
    x = (torch.randn(SHAPES[dims], dtype=dtype, device=device) * 1.5 + 0.7).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = torch_bn.batch_norm(x, training=training, momentum=momentum, eps=1e-4, **ours)
    y_ref = F.batch_norm(x_ref, training=training, momentum=momentum, eps=1e-4, **ref)
    torch.testing.assert_close(y, y_ref, **tolerance)
    grad_output = torch.randn_like(y_ref)
    y.backward(grad_output)
    y_ref.backward(grad_output)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if stats[name] is None:
            continue
        torch.testing.assert_close(ours[name], ref[name], **tolerance, msg=name)
        if name in ("weight", "bias"):
            torch.testing.assert_close(ours[name].grad, ref[name].grad, **tolerance, msg=f"grad_{name}")


def gradcheck_input(shape, channels_last=False):
    x = torch.randn(shape, dtype=torch.float64) * 1.3 + 0.4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def gradcheck_params(channels):
    return [(torch.rand(channels, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(channels, dtype=torch.float64, requires_grad=True)]


def check_first_and_second_order(fn, inputs):
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, channels_last", [((4, 3), False), ((2, 3, 2, 2), False), ((2, 3, 2, 2), True), ((2, 2, 2, 1, 2), False)], ids=str)
def test_functional_gradcheck(shape, channels_last, training, affine):
    channels = shape[1]
    stats = channel_stats(channels, torch.float64, "cpu")
    running_mean, running_var = stats["running_mean"], stats["running_var"]

    def fn(x, *params):
        weight, bias = params if params else (None, None)
        # Fresh copies: the training update must not feed back into later evaluations.
        return torch_bn.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training=training, eps=1e-3)

    inputs = [gradcheck_input(shape, channels_last)] + (gradcheck_params(channels) if affine else [])
    check_first_and_second_order(fn, inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_function_gradcheck(training):
    stats = channel_stats(3, torch.float64, "cpu")

    def fn(x, weight, bias):
        output, _mean, _invstd = torch_bn.BatchNormFunction.apply(x, weight, bias, stats["running_mean"], stats["running_var"], training, 1e-3)
        return output

    check_first_and_second_order(fn, [gradcheck_input((3, 3, 2))] + gradcheck_params(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls, shape", [(torch_bn.BatchNorm1d, (4, 3)), (torch_bn.BatchNorm2d, (2, 3, 2, 2)), (torch_bn.BatchNorm3d, (2, 3, 1, 2, 2))], ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_gradcheck(cls, shape, training):
    bn = cls(shape[1], eps=1e-3).double().train(training)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)

    def fn(x, weight, bias):
        return torch.func.functional_call(bn, {"weight": weight, "bias": bias}, (x,))

    check_first_and_second_order(fn, [gradcheck_input(shape)] + gradcheck_params(shape[1]))
