"""The torch_bn operators: torch.library.opcheck on every op, and a profile showing that the
modules run torch_bn's ops and none of aten's batch norms."""

import pytest
import torch
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
