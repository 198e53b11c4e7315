"""torch_bn.BatchNorm1d/2d/3d against torch.nn on the same device, step by step.

Each case runs several forward/backward steps and compares the output, every gradient, the
running statistics and num_batches_tracked with torch.nn's, over the full cross product of
module x dtype x layout x mode x affine x track_running_stats x momentum on small shapes.
"""

import pytest
import torch

import torch_bn

PAIRS = {1: (torch_bn.BatchNorm1d, torch.nn.BatchNorm1d), 2: (torch_bn.BatchNorm2d, torch.nn.BatchNorm2d), 3: (torch_bn.BatchNorm3d, torch.nn.BatchNorm3d)}
SMALL_SHAPES = {1: (4, 3, 5), 2: (3, 3, 5, 4), 3: (2, 3, 3, 4, 2)}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
STEPS = 3

# Tolerances against torch.nn, for tensors in the input's dtype (output, grad_input). For half
# types they are wider than one rounding: torch's CPU kernels round intermediates to the input
# dtype (up to ~2 units in the last place of an O(1) value, measured), while torch_bn rounds once;
# test_numerics checks torch_bn's half-type results against a float64 reference tightly.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=4e-3, atol=8e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=4e-2),
}
# For the float32 tensors (weight/bias grads, running statistics) that half-type inputs produce:
# torch rounds grad_bias to the input dtype for some layouts (relative error ~3e-3 in bfloat16).
HALF_PARAM_TOLERANCE = dict(rtol=6e-3, atol=1e-3)


def tolerance(tensor, input_dtype):
    """A tensor's tolerance: that of its own dtype, or HALF_PARAM_TOLERANCE for float32
    tensors computed from a half-type input."""
    half_types = (torch.float16, torch.bfloat16)
    if input_dtype in half_types and tensor.dtype not in half_types:
        return HALF_PARAM_TOLERANCE
    return TOLERANCES[tensor.dtype]


def param_dtype(dtype):
    # As with torch.nn, half and bfloat16 inputs run on float32 weights and running statistics.
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_input(shape, dtype, device, channels_last=False):
    """Per-channel means and scales away from 0 and 1, so that normalization has work to do."""
    dims = len(shape) - 2
    channels = shape[1]
    stat_shape = (1, channels) + (1,) * dims
    mean = torch.linspace(-2.0, 3.0, channels, dtype=torch.float64).view(stat_shape)
    scale = torch.linspace(0.5, 2.0, channels, dtype=torch.float64).view(stat_shape)
    x = (torch.randn(shape, dtype=torch.float64) * scale + mean).to(device=device, dtype=dtype)
    if not channels_last:
        return x
    if dims == 1:
        # BatchNorm1d's (N, C, L) input with the channels innermost in memory.
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous(memory_format=CHANNELS_LAST[dims])


def make_pair(dims, channels, device, dtype, **kwargs):
    """A torch_bn module and a torch.nn one with identical random parameters and statistics."""
    ours_cls, ref_cls = PAIRS[dims]
    ref = ref_cls(channels, **kwargs)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1.0, 1.0)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-1.0, 1.0)
            ref.running_var.uniform_(0.5, 2.0)
            ref.num_batches_tracked.fill_(4)
    ours = ours_cls(channels, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours.to(device, param_dtype(dtype)), ref.to(device, param_dtype(dtype))


def assert_close(actual, expected, input_dtype, what):
    tol = tolerance(expected, input_dtype)
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def assert_same_state(ours, ref, dtype):
    for name in ("running_mean", "running_var"):
        if getattr(ref, name) is None:
            assert getattr(ours, name) is None
        else:
            assert_close(getattr(ours, name), getattr(ref, name), dtype, name)
    if ref.num_batches_tracked is not None:
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


def run_steps(ours, ref, make_x, dtype, steps=STEPS):
    """Forward and backward on both modules for several fresh inputs, comparing everything."""
    for step in range(steps):
        x = make_x()
        x_ours = x.clone().requires_grad_()
        x_ref = x.clone().requires_grad_()
        y_ours, y_ref = ours(x_ours), ref(x_ref)
        assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
        assert y_ours.stride() == y_ref.stride(), "output memory layout differs from torch.nn"
        assert_close(y_ours, y_ref, dtype, f"step {step} output")
        grad_output = torch.randn_like(y_ref)
        y_ours.backward(grad_output)
        y_ref.backward(grad_output)
        assert_close(x_ours.grad, x_ref.grad, dtype, f"step {step} grad_input")
        for name, p_ref in ref.named_parameters():
            p_ours = getattr(ours, name)
            assert_close(p_ours.grad, p_ref.grad, dtype, f"step {step} grad_{name}")
            p_ours.grad, p_ref.grad = None, None
        assert_same_state(ours, ref, dtype)


@pytest.mark.parametrize("momentum", [0.1, 0.35, None], ids=["m0.1", "m0.35", "mNone"])
@pytest.mark.parametrize("track_running_stats", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_matches_torch_nn(dims, dtype, channels_last, training, affine, track_running_stats, momentum, device):
    ours, ref = make_pair(dims, 3, device, dtype, affine=affine, track_running_stats=track_running_stats, momentum=momentum)
    ours.train(training)
    ref.train(training)
    run_steps(ours, ref, lambda: make_input(SMALL_SHAPES[dims], dtype, device, channels_last), dtype)


@pytest.mark.parametrize(
    "dims, shape",
    [
        (1, (7, 17)),  # BatchNorm1d on (N, C)
        (1, (5, 16, 9)),
        (2, (2, 17, 3, 5)),  # C not a multiple of 8 or 16
        (2, (3, 16, 7, 9)),
        (2, (4, 5, 1, 1)),  # spatial size 1
        (2, (24, 40, 3, 3)),  # short planes in a batch that the kernels sum and write by position
        (2, (1, 3, 4, 5)),  # N = 1 with spatial > 1
        (3, (2, 17, 3, 2, 5)),
        (3, (1, 3, 1, 1, 2)),
    ],
    ids=str,
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_torch_nn_on_more_shapes(dims, shape, channels_last, training, dtype, device):
    if len(shape) == 2:
        channels_last = False  # (N, C) has a single layout
    ours, ref = make_pair(dims, shape[1], device, dtype)
    ours.train(training)
    ref.train(training)
    run_steps(ours, ref, lambda: make_input(shape, dtype, device, channels_last), dtype, steps=2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_input_gives_contiguous_output(training, device):
    ours, ref = make_pair(2, 3, device, torch.float32)
    ours.train(training)
    ref.train(training)

    def odd_strided():
        x = make_input((4, 3, 9, 10), torch.float32, device)[1:, :, ::2, 1::3]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x

    run_steps(ours, ref, odd_strided, torch.float32, steps=2)
    assert ours(odd_strided()).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_module_matches_torch_nn(dtype, device):
    # A module converted with .half()/.bfloat16() keeps its parameters in the input's dtype.
    ours, ref = make_pair(2, 5, device, torch.float32)
    ours.to(dtype)
    ref.to(dtype)
    run_steps(ours, ref, lambda: make_input((3, 5, 4, 4), dtype, device), dtype, steps=2)
    assert ours.weight.dtype == dtype and ours.running_mean.dtype == dtype


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_buffer_versions_move_as_torch_nn(training, device):
    # Version counters are how autograd tells that a saved tensor changed in place, so they
    # move as torch.nn's: num_batches_tracked's once per training call (torch_bn increments it
    # through its data on the CPU, not with add_), the running statistics' not at all.
    ours, ref = make_pair(2, 3, device, torch.float32)
    ours.train(training)
    ref.train(training)
    names = ("running_mean", "running_var", "num_batches_tracked")

    def versions(module):
        return [getattr(module, name)._version for name in names]

    before = versions(ours), versions(ref)
    for _ in range(2):
        x = make_input((4, 3, 5, 5), torch.float32, device).requires_grad_()
        ours(x).sum().backward()
        ref(x).sum().backward()
    moved = [[now - then for now, then in zip(versions(module), old)] for module, old in zip((ours, ref), before)]
    assert moved[0] == moved[1]
    assert moved[0][2] == (2 if training else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eval_gradients_use_the_statistics_of_their_forward(dtype, device):
    # Evaluation saves a copy of the running statistics for its backward, so changing the
    # buffers in place before the backward runs (torch.nn raises there, its saved buffers'
    # versions having moved) leaves the gradients those of the statistics the forward used.
    ours, _ref = make_pair(2, 3, device, dtype)
    ours.eval()
    x = make_input((4, 3, 5, 5), dtype, device)
    grad_output = torch.randn_like(x)

    def input_grad(change_buffers):
        x_grad = x.clone().requires_grad_()
        y = ours(x_grad)
        if change_buffers:
            with torch.no_grad():
                ours.running_mean.add_(1.0)
                ours.running_var.mul_(4.0)
        y.backward(grad_output)
        return x_grad.grad

    expected = input_grad(change_buffers=False)
    assert torch.equal(input_grad(change_buffers=True), expected)
    assert not torch.equal(input_grad(change_buffers=False), expected), "the buffers' change had no effect"


class Doubled(torch.nn.Module):
    def forward(self, tensor):
        return 2 * tensor


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parametrized_tensors_read_as_torch_nn(training, device):
    # torch.nn.utils.parametrize moves a parameter or buffer out of the module's dicts behind a
    # property on the module's class; the layer must read that property, as torch.nn's does.
    # The running statistics are parametrized in evaluation only: training writes them in place.
    ours, ref = make_pair(2, 3, device, torch.float32)
    names = ("weight",) if training else ("weight", "running_var")
    for module in (ours, ref):
        for name in names:
            torch.nn.utils.parametrize.register_parametrization(module, name, Doubled())
        module.train(training)
    x = make_input((4, 3, 5, 5), torch.float32, device)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    assert_close(y_ours, y_ref, torch.float32, "output")
    grad_output = torch.randn_like(y_ref)
    y_ours.backward(grad_output)
    y_ref.backward(grad_output)
    assert_close(x_ours.grad, x_ref.grad, torch.float32, "grad_input")
    original = [module.parametrizations.weight.original.grad for module in (ours, ref)]
    assert_close(original[0], original[1], torch.float32, "grad of the weight's original")
    assert_same_state(ours, ref, torch.float32)
