"""Numerical behaviour: accuracy against float64 references, known numbers from BN-FACTS.md,
bitwise determinism, empty batches and NaN inputs."""

import pytest
import torch

import torch_bn

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def relative_error(actual, reference):
    """Norm-wise relative error of actual against a float64 reference."""
    return ((actual.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    "mean, std, bound",
    [
        # torch's CPU kernels (2.13) measure about 2e-2, 3e-4 and 3e-4 here: they compute
        # x * scale + shift with a shift of about -mean/std.
        (1e4, 1e-2, 1e-2),
        (1e4, 1.0, 1e-4),
        (100.0, 1e-2, 1e-4),
    ],
    ids=["mean1e4-std1e-2", "mean1e4-std1", "mean100-std1e-2"],
)
def test_large_mean_small_spread(mean, std, bound, layout, training, device):
    x = (torch.randn(16, 8, 12, 12, dtype=torch.float64) * std + mean).float().to(device)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    exact_input = x.double()
    running_mean = exact_input.mean((0, 2, 3)).float()
    running_var = exact_input.var((0, 2, 3)).float()
    errors = {}
    for name, cls in (("torch_bn", torch_bn.BatchNorm2d), ("torch", torch.nn.BatchNorm2d)):
        bn = cls(8).to(device).train(training)
        bn.running_mean.copy_(running_mean)
        bn.running_var.copy_(running_var)
        reference = torch.nn.functional.batch_norm(
            exact_input, running_mean.double(), running_var.double(), training=training, eps=bn.eps
        )
        with torch.no_grad():
            errors[name] = relative_error(bn(x), reference)
    assert errors["torch_bn"] <= bound, f"relative errors {errors}, bound {bound}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_for_means_on_both_sides_of_the_fold(layout, device):
    # The input gradient folds a channel's mean into a constant where the mean is at most a
    # standard deviation from zero and keeps x - mean otherwise: channels on both sides of that
    # line, and far past it, all as accurate as float32 allows (measured: at most 3e-7 NCHW and
    # 9.4e-7 channels-last; folding every channel, the mean-100 one came to 1.6e-6 and 2.3e-6).
    means = torch.tensor([0.0, 0.5, 0.99, 1.01, 2.0, -3.0, -30.0, 100.0], dtype=torch.float64)
    x = (torch.randn(16, 8, 7, 7, dtype=torch.float64) + means.view(1, -1, 1, 1)).float()
    # Correlated with the input, so that the gradient's x - mean term carries weight.
    grad_output = (0.5 * (x.double() - means.view(1, -1, 1, 1)) + torch.randn(x.shape, dtype=torch.float64)).float()
    x, grad_output = (t.contiguous(memory_format=LAYOUTS[layout]).to(device) for t in (x, grad_output))
    weight = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    exact_input = x.double().requires_grad_()
    torch.nn.functional.batch_norm(exact_input, None, None, weight.to(device), training=True).backward(grad_output.double())
    bn = torch_bn.BatchNorm2d(8, track_running_stats=False).to(device)
    with torch.no_grad():
        bn.weight.copy_(weight)
    input = x.clone().requires_grad_()
    bn(input).backward(grad_output)
    for c in range(8):
        error = relative_error(input.grad[:, c], exact_input.grad[:, c])
        assert error <= 1.5e-6, f"channel {c} (mean {means[c].item()}): relative error {error}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_far_from_zero_match_float64_on_cpu(layout):
    # Channels whose mean is 1e6 standard deviations from zero: training's backward reads the
    # saved batch mean, float64 on the CPU (csrc/stats_type.h). Rounded to float32, it moved
    # x - mean by up to a twentieth of a standard deviation, and grad_weight came out 4% off
    # (torch.nn: 1e-2 here). Measured: at most 5.5e-7 over ten seeds.
    x = (torch.randn(16, 8, 6, 6, dtype=torch.float64) * 1e-2 + 1e4).float().contiguous(memory_format=LAYOUTS[layout])
    grad_output = torch.randn(x.shape, dtype=torch.float64).float().contiguous(memory_format=LAYOUTS[layout])
    weight = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    exact = [t.requires_grad_() for t in (x.double(), weight.clone(), torch.zeros(8, dtype=torch.float64))]
    reference = torch.nn.functional.batch_norm(exact[0], None, None, exact[1], exact[2], training=True)
    expected = torch.autograd.grad(reference, exact, grad_output.double())
    bn = torch_bn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.copy_(weight)
    input = x.clone().requires_grad_()
    grads = torch.autograd.grad(bn(input), (input, bn.weight, bn.bias), grad_output)
    for name, grad, reference_grad in zip(("input", "weight", "bias"), grads, expected):
        error = relative_error(grad, reference_grad)
        assert error <= 2e-6, f"grad of {name}: relative error {error}"


@pytest.mark.parametrize("momentum", [1.0, None], ids=["momentum1", "cumulative"])
@pytest.mark.parametrize("std", [1e-5, 1e-6, 1e-7])
def test_running_variance_far_below_eps_on_cpu(std, momentum):
    # The update recovers the batch variance as 1/invstd² - eps, which keeps only invstd's last
    # digits where the variance is far below eps (1e-5): from a float32 invstd it came out 1%, 28%
    # and 80x off at these spreads; from the CPU's float64 one (csrc/stats_type.h) its relative
    # error is about 1e-16·eps/variance. A factor of 1 (momentum 1, a cumulative average's first
    # batch) also takes the batch value as is, not through running + (batch - running)·1.
    # Measured: at most 4.2e-7 over twenty seeds (torch.nn computes the variance directly).
    x = (torch.randn(8, 3, 6, 6, dtype=torch.float64) * std).float()
    bn = torch_bn.BatchNorm2d(3, momentum=momentum)
    bn(x)
    reference = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    reference(x.double())
    torch.testing.assert_close(bn.running_var.double(), reference.running_var, rtol=2e-6, atol=0)


# NCHW planes under 64 values in a batch of 24 or more: backward sums each position of a group
# of channels down four rows (batch entries) at a time, and 27 and 30 leave three and two rows
# over: left out, they would drop a ninth or a fifteenth of each channel's values from its sums.
# Measured: float32 at most 1.2e-7; bfloat16 1.6e-3 on grad_input (its rounding), 9e-8 elsewhere.
@pytest.mark.parametrize("batch", [27, 30])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["float32", "bfloat16"])
def test_backward_by_position_matches_float64(batch, dtype, bound, device):
    channels = 24
    means = torch.linspace(-2.0, 3.0, channels, dtype=torch.float64).view(1, -1, 1, 1)
    x = (torch.randn(batch, channels, 4, 4, dtype=torch.float64) + means).to(device, dtype)
    # Correlated with the input, so that the gradient's x - mean term carries weight.
    noise = torch.randn(x.shape, dtype=torch.float64, device=device)
    grad_output = (0.5 * (x.double() - means.to(device)) + noise).to(dtype)
    weight = torch.linspace(0.5, 2.0, channels, dtype=torch.float64, device=device)
    exact_input, exact_weight, exact_bias = (t.double().requires_grad_() for t in (x, weight, torch.zeros_like(weight)))
    output = torch.nn.functional.batch_norm(exact_input, None, None, exact_weight, exact_bias, training=True)
    output.backward(grad_output.double())
    bn = torch_bn.BatchNorm2d(channels, track_running_stats=False).to(device)
    with torch.no_grad():
        bn.weight.copy_(weight)
    input = x.clone().requires_grad_()
    bn(input).backward(grad_output)
    for name, actual, exact in [
        ("grad_input", input.grad, exact_input.grad),
        ("grad_weight", bn.weight.grad, exact_weight.grad),
        ("grad_bias", bn.bias.grad, exact_bias.grad),
    ]:
        error = relative_error(actual, exact)
        assert error <= bound, f"{name}: relative error {error}"


def drifting_batch(layout, device="cpu", generator=None):
    """A float32 (32, 40, 14, 14) input whose images lie far apart: an offset of 50 per image,
    spread 1 within one."""
    offsets = 50.0 * (torch.arange(32, dtype=torch.float64) - 16.0)
    x = (torch.randn(32, 40, 14, 14, dtype=torch.float64, generator=generator) + offsets.view(-1, 1, 1, 1)).float()
    return x.to(device).contiguous(memory_format=LAYOUTS[layout])


def check_batch_statistics(bn, exact_input, mean_bound, var_rtol):
    """bn (momentum=1, after one training call) holds exact_input's batch statistics: the mean
    within mean_bound of each channel's spread, the unbiased variance within var_rtol of itself."""
    mean_error = (bn.running_mean.double() - exact_input.mean((0, 2, 3))).abs()
    assert (mean_error <= mean_bound * exact_input.std((0, 2, 3))).all(), mean_error.max()
    torch.testing.assert_close(bn.running_var.double(), exact_input.var((0, 2, 3)), rtol=var_rtol, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_drifting_far_from_its_mean(layout, device):
    """Statistics of an input whose images lie far apart (drifting_batch): every piece the CPU
    kernels sum in one pass (an NCHW plane, a channels-last block of rows) lies far from the mean
    of what came before or of a sample, where the one-pass moments would cancel, and takes the
    exact two-pass ones instead."""
    x = drifting_batch(layout, device)
    exact_input = x.double()
    bn = torch_bn.BatchNorm2d(40, momentum=1.0).to(device)
    with torch.no_grad():
        output = bn(x)
    reference = torch.nn.functional.batch_norm(exact_input, None, None, training=True, eps=bn.eps)
    assert relative_error(output, reference) <= 1e-6
    # momentum=1 leaves the batch statistics themselves in the running buffers; the mean is
    # measured against the channel's spread (about 460), the variance against itself.
    check_batch_statistics(bn, exact_input, mean_bound=1e-6, var_rtol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pieces_far_apart_merge_exactly_on_cpu(layout):
    """The same drifting input over ten draws, with bounds that hold with room: where a piece's
    one-pass moments would cancel, its second pass corrects the piece's mean too, whose float32
    error would otherwise be multiplied by the distance between the pieces' means when they are
    merged. Without that correction channels-last reached 1.3e-6 in the variance and 5e-7 of a
    channel's spread in the mean (30 draws); with it 1.9e-7 and 4e-8. CPU kernels only."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = drifting_batch(layout, generator=generator)
        bn = torch_bn.BatchNorm2d(40, momentum=1.0)
        with torch.no_grad():
            bn(x)
        check_batch_statistics(bn, x.double(), mean_bound=2e-7, var_rtol=5e-7)


def test_scattered_far_channels_take_the_exact_moments_on_cpu():
    """Channels-last blocks of rows where only some channels lie far from their sampled mean (the
    drifting input's offsets in those channels, ordinary data in the rest): each run of far
    channels takes the exact two-pass moments, wherever it lies. The far channels come first,
    alone, two within a cache line of each other, and last, past the vectorized columns of 300
    channels. Over ten draws each far channel's mean stays within 3e-8 of its spread (measured:
    at most 1.0e-8; a far channel left to the one-pass moments, 6.8e-8 to 8.4e-8). CPU kernels
    only."""
    channels, far = 300, [0, 41, 100, 108, 200, 299]
    generator = torch.Generator().manual_seed(2)
    offsets = torch.zeros(32, channels, 1, 1, dtype=torch.float64)
    offsets[:, far] = 50.0 * (torch.arange(32, dtype=torch.float64) - 16.0).view(-1, 1, 1, 1)
    for _ in range(10):
        x = (torch.randn(32, channels, 6, 6, dtype=torch.float64, generator=generator) + offsets).float()
        x = x.contiguous(memory_format=torch.channels_last)
        bn = torch_bn.BatchNorm2d(channels, momentum=1.0)
        with torch.no_grad():
            bn(x)
        exact_input = x.double()
        check_batch_statistics(bn, exact_input, mean_bound=2e-7, var_rtol=5e-7)
        mean_error = (bn.running_mean.double() - exact_input.mean((0, 2, 3))).abs() / exact_input.std((0, 2, 3))
        assert (mean_error[far] <= 3e-8).all(), mean_error[far]


# Channels-last bfloat16 with a multiple of 16 channels reads its per-channel values in the
# lanes of 16-value steps (PerChannelSteps on AVX2), 5 channels a vector at a time. A mean of 2
# is folded into the shift, one of 50 stays in the loops (`centered`).
@pytest.mark.parametrize("channels, mean", [(5, 2.0), (32, 2.0), (32, 50.0)], ids=["5ch", "32ch", "32ch-mean50"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types_round_once(dtype, layout, training, channels, mean, device):
    """Half-type results are the float64 result of the same (rounded) data, rounded once."""
    x = (torch.randn(6, channels, 7, 3) * 3 + mean).to(device, dtype).contiguous(memory_format=LAYOUTS[layout])
    grad_output = torch.randn_like(x)
    bn = torch_bn.BatchNorm2d(channels).to(device).train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(mean - 1, mean + 1)
        bn.running_var.uniform_(5, 12)
    reference = torch.nn.BatchNorm2d(channels).to(device).double().train(training)
    reference.load_state_dict(bn.state_dict())

    x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    y_ours, y_ref = bn(x_ours), reference(x_ref)
    y_ours.backward(grad_output)
    y_ref.backward(grad_output.double())
    # One rounding of an O(1) value is at most half a unit in the last place; one unit leaves
    # room for float32 intermediate error. Values near zero get the same absolute bound as 1.
    unit = torch.finfo(dtype).eps
    for name, ours, ref in (("output", y_ours, y_ref), ("grad_input", x_ours.grad, x_ref.grad)):
        scale = ref.abs().clamp_min(1.0)
        error = ((ours.double() - ref).abs() / scale).max().item()
        assert error <= unit, f"{name}: {error / unit:.2f} units in the last place"
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(bn, name).grad.double(), getattr(reference, name).grad, rtol=1e-5, atol=1e-5)


def test_bn_facts_batchnorm1d_single_batch():
    bn = torch_bn.BatchNorm1d(1)
    y = bn(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    torch.testing.assert_close(y.flatten(), torch.tensor([-1.34164, -0.44721, 0.44721, 1.34164]), rtol=0, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, torch.tensor([0.25]), rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.tensor([1.066667]), rtol=0, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


def test_bn_facts_cumulative_average():
    bn = torch_bn.BatchNorm1d(1, momentum=None)
    bn(torch.tensor([[1.0], [3.0]]))
    bn(torch.tensor([[5.0], [7.0]]))
    torch.testing.assert_close(bn.running_mean, torch.tensor([4.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.tensor([2.0]), rtol=0, atol=1e-6)
    assert bn.num_batches_tracked.item() == 2


def train_steps(bn, inputs):
    """Outputs, gradients and running statistics of forward/backward over the inputs."""
    results = []
    for x, grad_output in inputs:
        x = x.clone().requires_grad_()
        y = bn(x)
        y.backward(grad_output)
        results += [y.detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone(), bn.running_mean.clone(), bn.running_var.clone()]
    return results


# Large enough that the kernels split the work between threads. 7x7 planes in a batch of 32
# are summed by position across a group of channels, and planes under 64 values in a batch of 8
# are written a row of such a group at a time (both passes at 2x2 to 5x5, forward-train at 7x7):
# the group's width follows the thread count and decides which values take a loop's scalar tail.
# 2x2 and 3x3 planes are shorter than a vector (2x2 on AVX2, both on AVX-512), so that a row of one
# channel would be all tail where a row of several is vectors; such planes take rows in any batch
# (2x2048 of 3x3, in bfloat16).
@pytest.mark.parametrize(
    "shape",
    [(32, 24, 20, 20), (32, 24, 7, 7), (8, 128, 5, 5), (8, 128, 7, 7), (8, 128, 2, 2), (8, 128, 3, 3), (2, 2048, 3, 3)],
    ids=str,
)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_thread_counts(dtype, layout, shape, device, on_thread_counts):
    inputs = [
        ((torch.randn(shape) * 2 + 1).to(device, dtype).contiguous(memory_format=LAYOUTS[layout]), torch.randn(shape).to(device, dtype))
        for _ in range(2)
    ]
    initial = torch_bn.BatchNorm2d(shape[1]).to(device)

    def train_a_copy():
        bn = torch_bn.BatchNorm2d(shape[1]).to(device)
        bn.load_state_dict(initial.state_dict())
        return train_steps(bn, inputs)

    runs = on_thread_counts((1, 2, 2), train_a_copy)
    for run in runs[1:]:
        for index, (first, other) in enumerate(zip(runs[0], run)):
            assert torch.equal(first, other), f"result {index} differs between runs"


# An NCHW input too small to split between threads goes through the CPU kernels as one group of
# channels, where a larger one is cut into groups per thread: a channel's results must not depend
# on the channels computed beside it. Not 1x1 planes: (N, C, 1, 1) is laid out as rows of
# channels. Batches of 4 or more write planes under 64 values a row of the group at a time: (4,
# 5, 33) forward-train in every dtype (and backward in bfloat16, where a vector is 16 values),
# (6, 7, 4) both passes, its planes shorter than a vector, so that a row of one channel is a
# loop's scalar tail where a row of seven is vectors; so are (2, 7, 4)'s, which take rows in a
# batch of 2 (forward-train in float32 and bfloat16, backward in bfloat16). (24, 5, 3, 3) is
# summed by position, a column per position of the group's rows, a channel's in vectors beside
# others and in the tail alone.
@pytest.mark.parametrize("shape", [(3, 6, 5, 5), (4, 5, 33), (5, 7, 3), (6, 7, 4), (2, 7, 4), (24, 5, 3, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_small_planar_channels_match_each_computed_alone(dtype, shape, on_thread_counts):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).to(dtype)
    grad_output = torch.randn(shape, dtype=torch.float64).to(dtype)
    weight = torch.rand(shape[1], dtype=torch.float64).add(0.5).to(dtype)
    bias = torch.randn(shape[1], dtype=torch.float64).to(dtype)

    def train_and_backward(c0, c1):
        cut = [t[:, c0:c1].contiguous() for t in (x, grad_output)]
        output, mean, invstd = torch.ops.torch_bn.forward_train(cut[0], weight[c0:c1], bias[c0:c1], 1e-5)
        grads = torch.ops.torch_bn.backward(cut[1], cut[0], weight[c0:c1], mean, invstd, True, [True, True, True])
        return [output, mean, invstd, *grads]

    together = on_thread_counts((1, 2), lambda: train_and_backward(0, shape[1]))
    for c in range(shape[1]):
        for index, (full, alone) in enumerate(zip(together[0], train_and_backward(c, c + 1))):
            assert torch.equal(full[:, c : c + 1] if full.dim() > 1 else full[c : c + 1], alone), (c, index)
    assert all(torch.equal(a, b) for a, b in zip(*together)), "the result depends on the thread count"


def check_eval_matches_float64_on_any_thread_count(bn, x, dtype, on_thread_counts):
    """Evaluation of x (float64, any layout) by bn in dtype against a float64 reference, and the
    same result on one thread and on two."""
    bn = bn.to(x.device, dtype).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    per_channel = (-1,) + (1,) * (x.dim() - 2)
    invstd = (bn.running_var.double() + bn.eps).rsqrt()
    reference = ((x - bn.running_mean.double().view(per_channel)) * (invstd * bn.weight.double()).view(per_channel)
                 + bn.bias.double().view(per_channel))
    with torch.no_grad():
        outputs = on_thread_counts((1, 2), lambda: bn(x.to(dtype)))
    # float32: the coefficients and the result each rounded once, on values up to about 20;
    # float16 and bfloat16 (x given in that dtype): the result rounded to 11 and 8 bits.
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-13, torch.float16: 2**-10, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(outputs[0].double(), reference, rtol=tolerance, atol=tolerance)
    assert torch.equal(outputs[0], outputs[1]), "the result depends on the thread count"


# Evaluation writes float planes shorter than 512 bytes as one stream whose vectors straddle two
# planes (affine_planes): planes of exactly one AVX2 float vector, one value more, whole vectors,
# 7x7 and the longest such float32 plane, in a batch that two threads split in mid-channel.
@pytest.mark.parametrize("plane", [8, 9, 16, 49, 127])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eval_on_short_planes_matches_float64(dtype, plane, device, on_thread_counts):
    x = (torch.randn(41, 201, plane, dtype=torch.float64) * 2 + 1).to(device)
    check_eval_matches_float64_on_any_thread_count(torch_bn.BatchNorm1d(201), x, dtype, on_thread_counts)


# A module converted with .half() or .bfloat16() keeps its parameters and running statistics in
# that dtype, which the CPU widens a vector at a time (read_channel_values): 37 channels are whole
# vectors and a tail in every build, 5 a tail alone.
@pytest.mark.parametrize("channels", [5, 37])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_eval_with_half_statistics_matches_float64(dtype, channels, device, on_thread_counts):
    x = (torch.randn(3, channels, 4, 4, dtype=torch.float64) * 2 + 1).to(dtype).double().to(device)
    check_eval_matches_float64_on_any_thread_count(torch_bn.BatchNorm2d(channels), x, dtype, on_thread_counts)


# Evaluation writes NCHW planes under 64 values a row of their group at a time in batches of 4 or
# more (see PlanarPlan::writes_rows) where a plane's run would be mostly scalar work: bfloat16's,
# narrowed value by value, and planes shorter than a vector (2x2; 3x3 too where a vector is 16
# values, AVX-512), these in any batch. (3, 300, 7, 7) and float32 planes of a vector or more are
# one stream (affine_planes). 300 channels, so that groups are cut per thread.
@pytest.mark.parametrize(
    "shape",
    [(8, 300, 5, 5), (8, 300, 7, 7), (3, 300, 7, 7), (8, 300, 3, 3), (8, 300, 2, 2), (3, 300, 2, 2), (1, 300, 3, 3)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eval_on_planes_under_64_values_matches_float64(dtype, shape, device, on_thread_counts):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype).double().to(device)
    check_eval_matches_float64_on_any_thread_count(torch_bn.BatchNorm2d(shape[1]), x, dtype, on_thread_counts)


# Channels-last evaluation splits the rows evenly between threads, here 369 rows of 520 channels
# (one row a group), so that a task starts in mid-block.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channels_last_eval_split_between_threads_matches_float64(dtype, device, on_thread_counts):
    x = (torch.randn(41, 520, 3, 3, dtype=torch.float64) * 2 + 1).to(device, memory_format=torch.channels_last)
    check_eval_matches_float64_on_any_thread_count(torch_bn.BatchNorm2d(520), x, dtype, on_thread_counts)


# Running means within ±1/4 fold into the shift in every channel (|mean·scale| < 1, see
# ChannelAffine); within ±4, most channels keep theirs apart and some fold it.
FOLDED_MEANS, KEPT_MEANS = 0.5, 8.0


def check_no_epilogue_matches_zero_residual(x, mean_spread, on_thread_counts):
    """Evaluation without an epilogue has write loops of its own, not normalize_run: of x (its
    dtype and layout), with running means uniform over a width of mean_spread, it must give
    normalize_run's bits, here taken with a residual of zeros, which adds nothing; on one thread
    and on two."""
    channels = x.shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.rand(channels) - 0.5
    running_mean, running_var = (torch.rand(channels) - 0.5) * mean_spread, torch.rand(channels) + 0.5
    args = (x, *(t.to(x.device, x.dtype) for t in (weight, bias, running_mean, running_var)))

    def both():
        no_epilogue = torch_bn.ops.forward_eval_act(*args, None, 1e-5, "identity", 0.0)[0]
        zero_residual = torch_bn.ops.forward_eval_act(*args, torch.zeros_like(x), 1e-5, "identity", 0.0)[0]
        return no_epilogue, zero_residual

    for no_epilogue, zero_residual in on_thread_counts((1, 2), both):
        assert no_epilogue.stride() == x.stride()
        assert torch.equal(no_epilogue, zero_residual)


# Channels-last rows with every mean folded are written by affine_run through write_run: runs of
# 4·V values and more (64 channels), with single vectors and a last partial one (3 channels:
# groups of 341 rows, 1023 values), and one shorter than an AVX2 float vector (6).
@pytest.mark.parametrize("shape", [(4, 64, 5, 5), (7, 3, 11, 13), (1, 3, 1, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_plain_channels_last_rows_match_those_with_an_epilogue(dtype, shape, device, on_thread_counts):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(device, dtype, memory_format=torch.channels_last)
    check_no_epilogue_matches_zero_residual(x, FOLDED_MEANS, on_thread_counts)


# NCHW planes under 512 bytes and of a vector or more are written on the CPU as one stream
# (affine_planes), with the means folded or kept, half and bfloat16 widened and narrowed in
# registers: one AVX-512 float vector (4x4), 7x7 in a batch under 4 (larger batches write such
# planes by rows), 100 values (10x10: in no batch by rows) and the longest half plane under 512
# bytes (15x17). The longer float32 and float64 planes are written plane by plane, as their
# epilogue is.
@pytest.mark.parametrize("mean_spread", [FOLDED_MEANS, KEPT_MEANS], ids=["folded", "kept"])
@pytest.mark.parametrize("shape", [(1, 300, 4, 4), (3, 300, 7, 7), (5, 300, 10, 10), (1, 64, 15, 17)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_short_planes_without_an_epilogue_match_those_with_one_on_cpu(dtype, shape, mean_spread, on_thread_counts):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
    check_no_epilogue_matches_zero_residual(x, mean_spread, on_thread_counts)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_empty_batch_matches_torch(layout, training, device):
    ours = torch_bn.BatchNorm2d(3).to(device).train(training)
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
        ours.weight.uniform_(0.5, 1.5)
    ref = torch.nn.BatchNorm2d(3).to(device).train(training)
    ref.load_state_dict(ours.state_dict())
    x = torch.empty(0, 3, 4, 5, device=device).contiguous(memory_format=LAYOUTS[layout])
    for bn in (ours, ref):
        x_grad = x.clone().requires_grad_()
        y = bn(x_grad)
        assert y.shape == x.shape
        y.sum().backward()
        assert x_grad.grad.shape == x.shape
    for name, p in ours.named_parameters():
        assert torch.equal(p.grad, getattr(ref, name).grad), name
    for name, b in ours.named_buffers():
        assert torch.equal(b, getattr(ref, name)), name
    # torch counts the empty batch (num_batches_tracked + 1) and leaves the statistics alone.
    assert ours.num_batches_tracked.item() == (1 if training else 0)


def output_and_input_grad(bn, x, grad_output):
    """bn's output on a copy of x, and the gradient that grad_output sends back to that copy."""
    x_grad = x.clone().requires_grad_()
    y = bn(x_grad)
    y.backward(grad_output)
    return y, x_grad.grad


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nan_input_matches_torch(layout, training, device):
    ours = torch_bn.BatchNorm2d(4).to(device).train(training)
    ref = torch.nn.BatchNorm2d(4).to(device).train(training)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 5, 5, device=device)
    x[1, 2, 3, 0] = float("nan")
    x = x.contiguous(memory_format=LAYOUTS[layout])
    grad_output = torch.randn_like(x)
    results = {}
    for name, bn in (("ours", ours), ("ref", ref)):
        y, x_grad = output_and_input_grad(bn, x, grad_output)
        results[name] = [y, x_grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]
    for index, (a, b) in enumerate(zip(results["ours"], results["ref"])):
        assert torch.equal(a.isnan(), b.isnan()), f"result {index}: NaN in different places"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    # The NaN stays in its channel, in training and in evaluation.
    assert results["ours"][0].isnan().any(dim=(0, 2, 3)).tolist() == [False, False, True, False]


@pytest.mark.parametrize("bits", [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000], ids=hex)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_nan_weight_of_any_bits_gives_nan_in_half_types(dtype, layout, training, bits, device):
    """A float32 weight that is NaN makes its channel's output and input gradient NaN in a half
    type, whatever the NaN's bits, as in torch.nn. Rounding float to bfloat16 adds to the bits:
    a NaN whose low 16 bits are set and whose mantissa is all ones above them would carry out of
    the exponent and come out as a zero, unless NaN is kept apart (an input NaN cannot show
    this: widened from a half type, its low bits are zero)."""
    nan = torch.tensor(bits, dtype=torch.uint32).view(torch.float32)
    assert nan.isnan() and nan.view(torch.int32).item() & 0xFFFFFFFF == bits
    x = torch.randn(8, 4, 6, 6, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    grad_output = torch.randn_like(x)
    ours = torch_bn.BatchNorm2d(4).to(device).train(training)
    ref = torch.nn.BatchNorm2d(4).to(device).train(training)
    with torch.no_grad():
        ours.weight[2] = nan
        assert ours.weight.view(torch.int32)[2].item() == nan.view(torch.int32).item()
    ref.load_state_dict(ours.state_dict())
    results = {}
    for name, bn in (("ours", ours), ("ref", ref)):
        y, x_grad = output_and_input_grad(bn, x, grad_output)
        results[name] = {"output": y, "input gradient": x_grad}
    failures = []
    for name, ours_result in results["ours"].items():
        assert ours_result.dtype == dtype
        all_nan = ours_result.isnan().all(dim=(0, 2, 3)).tolist()
        any_nan = ours_result.isnan().any(dim=(0, 2, 3)).tolist()
        if not all_nan == any_nan == [False, False, True, False]:
            failures.append(f"{name}: channels all NaN {all_nan}, with a NaN {any_nan}")
        elif not torch.equal(ours_result.isnan(), results["ref"][name].isnan()):
            failures.append(f"{name}: its NaNs are not where torch.nn's are")
    assert not failures, "; ".join(failures)
