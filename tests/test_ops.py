"""The torch_bn operators: torch.library.opcheck on every op, and a profile showing that the
modules run torch_bn's ops and none of aten's batch norms."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.profiler import ProfilerActivity, profile

import torch_bn

# Inputs in both kernel layouts, both statistics dtypes, a half type, and a size that is not a
# multiple of any vector width.
SAMPLES = [
    ((4, 3, 5, 2), torch.float32, False),
    ((4, 3, 5, 2), torch.float32, True),
    ((3, 17), torch.float64, False),
    ((2, 5, 3, 3), torch.bfloat16, True),
    ((2, 3, 2, 3, 2), torch.float16, False),
]
SAMPLE_IDS = [f"{tuple(s)}-{d}-{'cl' if cl else 'contig'}" for s, d, cl in SAMPLES]

# torch warns that backpropagating through an op without an autograd kernel "may lead to silently
# incorrect behavior" and that this fallback will be removed: every op must say how (or that it
# cannot be) differentiated.
pytestmark = pytest.mark.filterwarnings("error:.*an autograd kernel was not registered")


def sample_input(shape, dtype, channels_last, device, requires_grad):
    x = torch.randn(shape, device=device) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x.to(dtype).requires_grad_(requires_grad)


def per_channel(channels, dtype, device, requires_grad=False, low=0.5, high=1.5):
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.empty(channels, dtype=stats_dtype, device=device).uniform_(low, high).requires_grad_(requires_grad)


def opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert all(result == "SUCCESS" for result in results.values()), results


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("shape, dtype, channels_last", SAMPLES, ids=SAMPLE_IDS)
def test_forward_train(shape, dtype, channels_last, requires_grad, affine, device):
    x = sample_input(shape, dtype, channels_last, device, requires_grad)
    weight = per_channel(shape[1], dtype, device, requires_grad) if affine else None
    bias = per_channel(shape[1], dtype, device, requires_grad, -1.0, 1.0) if affine else None
    opcheck(torch.ops.torch_bn.forward_train.default, (x, weight, bias, 1e-5))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("shape, dtype, channels_last", SAMPLES, ids=SAMPLE_IDS)
def test_forward_eval(shape, dtype, channels_last, requires_grad, affine, device):
    channels = shape[1]
    x = sample_input(shape, dtype, channels_last, device, requires_grad)
    weight = per_channel(channels, dtype, device, requires_grad) if affine else None
    bias = per_channel(channels, dtype, device, requires_grad, -1.0, 1.0) if affine else None
    running_mean = per_channel(channels, dtype, device, low=-1.0, high=1.0)
    running_var = per_channel(channels, dtype, device)
    opcheck(torch.ops.torch_bn.forward_eval.default, (x, weight, bias, running_mean, running_var, 1e-5))


@pytest.mark.parametrize(
    "output_mask, requires_grad",
    [([True, True, True], False), ([True, False, False], False), ([False, True, True], False), ([False, False, True], False), ([True, True, True], True)],
    ids=str,
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, dtype, channels_last", SAMPLES, ids=SAMPLE_IDS)
def test_backward(shape, dtype, channels_last, training, output_mask, requires_grad, device):
    channels = shape[1]
    x = sample_input(shape, dtype, channels_last, device, requires_grad)
    grad_output = sample_input(shape, dtype, channels_last, device, requires_grad)
    weight = per_channel(channels, dtype, device, requires_grad)
    mean = per_channel(channels, dtype, device, low=-1.0, high=1.0)
    invstd = per_channel(channels, dtype, device)
    opcheck(torch.ops.torch_bn.backward.default, (grad_output, x, weight, mean, invstd, training, output_mask))


def gradcheck_inputs(shape, affine):
    """float64 (input, weight, bias) for gradcheck, the parameters only when ``affine``."""
    x = (torch.randn(shape, dtype=torch.float64) * 1.3 + 0.4).requires_grad_()
    if not affine:
        return [x]
    return [x, (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(shape[1], dtype=torch.float64, requires_grad=True)]


# The ops' own gradients (registered in C++), checked against finite differences, to second
# order: forward_train's statistics are non-differentiable outputs, but its double backward
# recomputes them from the input, so their dependence on it is not lost.
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_forward_train_gradcheck(affine):
    inputs = gradcheck_inputs((3, 2, 2, 2), affine)
    padded = inputs + [None] * (3 - len(inputs))
    _output, mean, invstd = torch.ops.torch_bn.forward_train.default(*padded, 1e-3)
    assert not mean.requires_grad and not invstd.requires_grad

    def fn(x, *params):
        weight, bias = params or (None, None)
        return torch.ops.torch_bn.forward_train.default(x, weight, bias, 1e-3)[0]

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_forward_eval_gradcheck(affine):
    inputs = gradcheck_inputs((3, 2, 2, 2), affine)
    running_mean = torch.randn(2, dtype=torch.float64)
    running_var = torch.rand(2, dtype=torch.float64) + 0.5

    def fn(x, *params):
        weight, bias = params or (None, None)
        return torch.ops.torch_bn.forward_eval.default(x, weight, bias, running_mean, running_var, 1e-3)

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_gradcheck(training, affine):
    # The backward op as a function of all of its tensor inputs: its double backward.
    x, *params = gradcheck_inputs((3, 2, 2, 2), affine)
    weight = params[0] if params else None
    grad_output = torch.randn_like(x).requires_grad_()
    mean = torch.randn(2, dtype=torch.float64, requires_grad=True)
    invstd = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    mask = [True, affine, True]

    def fn(grad_output, x, mean, invstd, *weight):
        grads = torch.ops.torch_bn.backward.default(grad_output, x, weight[0] if weight else None, mean, invstd, training, mask)
        return tuple(g for g, wanted in zip(grads, mask) if wanted)

    assert gradcheck(fn, [grad_output, x, mean, invstd] + ([weight] if affine else []))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("count", [0, 40], ids=["empty", "count40"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_update_running_stats(dtype, count, unbiased, momentum, requires_grad, device):
    running_mean = per_channel(3, dtype, device, low=-1.0, high=1.0)
    running_var = per_channel(3, dtype, device)
    num_batches_tracked = torch.tensor(3, device=device)
    # Batch statistics that require grad, as they come out of a differentiable forward.
    mean = per_channel(3, dtype, device, requires_grad, low=-1.0, high=1.0)
    invstd = per_channel(3, dtype, device, requires_grad)
    opcheck(
        torch.ops.torch_bn.update_running_stats.default,
        (running_mean, running_var, num_batches_tracked, mean, invstd, momentum, 1e-5, count, unbiased),
    )


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("momentum, tracked", [(0.1, True), (None, True), (0.1, False)], ids=["m0.1", "mNone", "untracked"])
@pytest.mark.parametrize("shape, dtype, channels_last", SAMPLES, ids=SAMPLE_IDS)
def test_forward_train_update(shape, dtype, channels_last, momentum, tracked, requires_grad, device):
    channels = shape[1]
    x = sample_input(shape, dtype, channels_last, device, requires_grad)
    weight = per_channel(channels, dtype, device, requires_grad)
    bias = per_channel(channels, dtype, device, requires_grad, -1.0, 1.0)
    running_mean = per_channel(channels, dtype, device, low=-1.0, high=1.0)
    running_var = per_channel(channels, dtype, device)
    num_batches_tracked = torch.tensor(3, device=device) if tracked else None
    args = (x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, 1e-5, True)
    opcheck(torch.ops.torch_bn.forward_train_update.default, args)


def test_forward_train_update_is_forward_train_then_update(device):
    """The composite gives bitwise what its two ops give when called one after the other."""
    x = sample_input((6, 4, 3, 5), torch.float32, True, device, requires_grad=False)
    weight, bias = per_channel(4, torch.float32, device), per_channel(4, torch.float32, device, low=-1.0, high=1.0)
    fused = [per_channel(4, torch.float32, device, low=-1.0, high=1.0), per_channel(4, torch.float32, device), torch.tensor(3, device=device)]
    separate = [t.clone() for t in fused]
    output, mean, invstd = torch.ops.torch_bn.forward_train_update.default(x, weight, bias, *fused, None, 1e-5, False)
    expected = torch.ops.torch_bn.forward_train.default(x, weight, bias, 1e-5)
    torch.ops.torch_bn.update_running_stats.default(*separate, expected[1], expected[2], None, 1e-5, 6 * 3 * 5, False)
    for actual, wanted in zip([output, mean, invstd] + fused, list(expected) + separate):
        assert torch.equal(actual, wanted)
    assert fused[2].item() == 4


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls, shape", [(torch_bn.BatchNorm1d, (8, 4)), (torch_bn.BatchNorm2d, (4, 4, 5, 5)), (torch_bn.BatchNorm3d, (2, 4, 3, 3, 3))], ids=lambda v: getattr(v, "__name__", str(v)))
def test_profile_runs_torch_bn_ops_only(cls, shape, training, device):
    bn = cls(shape[1]).to(device).train(training)
    x = torch.randn(shape, device=device, requires_grad=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        bn(x).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert any(name.startswith("torch_bn::") for name in names), names
    expected = {"torch_bn::forward_train", "torch_bn::backward"} if training else {"torch_bn::forward_eval", "torch_bn::backward"}
    assert expected <= names, names
    assert not [name for name in names if name.startswith("aten::") and "batch_norm" in name], names
