"""A pass whose inputs and outputs together reach the streaming bound (24 MiB here, see conftest.py)
writes its outputs with non-temporal stores that bypass the cache (streams_output and RunStores in
csrc/cpu), run by run where a run is whole, aligned cache lines. Other NCHW runs are gathered in a
buffer and streamed a line at a time by forward-train and by the input gradient, in training or
evaluation (StagedStores); the forward pass in evaluation streams their whole lines and gathers only
the lines they share with their neighbours (SharedLineStores). Planes under 512 bytes are written as
for smaller tensors: in every pass where they have 64 values or more, in evaluation where fewer.
These tests run inputs past those sizes whose runs are streamed, staged, gathered, or not, and check
that every value lands: element-wise results equal, bitwise, those of the same layer on slices of
the batch (each under every threshold, so written through the cache), and training results match
float64.
"""

import os
import subprocess
import sys

import pytest
import torch

import torch_bn

# The bound in force (conftest.py pins it, whatever the machine's L3).
CACHE_BYTES = int(os.environ["TORCH_BN_STREAM_BYTES"])
# (N, C, H, W) at float32, bfloat16 doubling N, of two sizes. Just over 16 MiB every pass streams
# (x and y alone reach CACHE_BYTES); just over 10.7 MiB, backward (x, dy and dx) and the forward
# with a residual stream, and the plain forward (x and y, 21.4 MiB) does not (NCHW, it fetches
# its output ahead instead, see fetches_output_ahead). 56x56 planes, and channels-last rows of
# 112, 896, 1792 or 2688 channels, are whole lines (streamed); 14x14 planes
# are not (784 bytes, every other one starting mid-line; bfloat16 392 bytes, under the 512 from
# which such planes stream); 7x7 planes with N >= 24 are summed, and written in training (bfloat16 also
# in evaluation), a group's row at a time; 61x71 planes and 83 channels are odd everywhere.
SHAPES = [(12, 112, 56, 56), (24, 896, 14, 14), (32, 2688, 7, 7), (12, 83, 61, 71)]
SHAPES += [(8, 112, 56, 56), (16, 896, 14, 14), (32, 1792, 7, 7), (8, 83, 61, 71)]
DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
SLICES = 4


# NCHW (N, C, H, W) at float32 whose backward (x, dy and dx: 16 MiB) is under the bound but
# reaches half of it: the input gradient is written through the cache, each next batch's lines
# fetched ahead (fetches_output_ahead), in 14x14 planes and in 7x7 rows, whose statistics fetch
# each next row of x and dy too (moves_past_cache).
FETCHED_SHAPES = [(8, 896, 14, 14), (32, 896, 7, 7)]

# channels-last float32 (N, C, H, W) whose x alone reaches the bound: the forward statistics read
# its rows, of at most 1 KiB, in memory order, two at a time (forward_train_rows). 112 channels
# leave 9-row groups, so that blocks of odd row counts end on one row; 83 channels end each row
# on scalar columns.
ROW_WALK_SHAPES = [(20, 112, 56, 56), (24, 83, 61, 71)]


def random_input(shape, dtype, layout):
    n, c, h, w = shape
    if dtype == torch.bfloat16:
        n *= 2
    mean = torch.linspace(-2.0, 3.0, c).view(1, c, 1, 1)
    return (torch.randn(n, c, h, w) * 1.5 + mean).to(dtype).contiguous(memory_format=LAYOUTS[layout])


def large_input(shape, dtype, layout):
    x = random_input(shape, dtype, layout)
    assert 3 * x.numel() * x.element_size() >= CACHE_BYTES
    # No pass moves more than four tensors of a slice's size (backward's x, dy and two gradients).
    assert 4 * (x.numel() * x.element_size() // SLICES) < CACHE_BYTES
    return x


def randomized(layer):
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    return layer


def evaluate(layer, x, residual, grad_output):
    """Output, input gradient and residual gradient of a fused layer in evaluation."""
    x = x.detach().requires_grad_()
    residual = residual.detach().requires_grad_()
    output = layer(x, residual=residual)
    output.backward(grad_output)
    return output.detach(), x.grad, residual.grad


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_evaluation_equals_that_of_slices(shape, dtype, layout):
    """relu(bn(x) + residual) in evaluation and its gradients are element-wise: the whole batch
    (streamed) and its slices (cached) give the same bits, sign mask included."""
    x = large_input(shape, dtype, layout)
    residual, grad_output = torch.randn_like(x), torch.randn_like(x)
    layer = randomized(torch_bn.BatchNormAct2d(x.shape[1], "relu")).to(dtype).eval()
    whole = evaluate(layer, x, residual, grad_output)
    pieces = [
        evaluate(layer, *parts)
        for parts in zip(x.chunk(SLICES), residual.chunk(SLICES), grad_output.chunk(SLICES))
    ]
    for name, actual, parts in zip(("output", "input gradient", "residual gradient"), whole, zip(*pieces)):
        assert torch.equal(actual, torch.cat(parts)), name
        assert actual.is_contiguous(memory_format=LAYOUTS[layout]), name


def relative_error(actual, reference):
    return ((actual.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_matches_float64(shape, dtype, layout):
    assert_training_matches_float64(large_input(shape, dtype, layout))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FETCHED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_that_fetches_the_input_gradient_matches_float64(shape, dtype):
    x = random_input(shape, dtype, "contiguous")
    assert CACHE_BYTES // 2 <= 3 * x.numel() * x.element_size() < CACHE_BYTES
    assert_training_matches_float64(x)


@pytest.mark.parametrize("shape", ROW_WALK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_that_reads_rows_in_memory_order_matches_float64(shape):
    x = random_input(shape, torch.float32, "channels_last")
    assert x.numel() * x.element_size() >= CACHE_BYTES
    assert x.shape[1] * x.element_size() <= 1024
    assert_training_matches_float64(x)


def assert_training_matches_float64(x):
    """Training forward and input gradient against float64 on the same (rounded) values: one
    rounding of the result to float32 (norm-wise 1e-6) or bfloat16 (4e-3)."""
    dtype = x.dtype
    grad_output = torch.randn_like(x)
    layer = randomized(torch_bn.BatchNorm2d(x.shape[1])).to(dtype)
    x_leaf = x.detach().requires_grad_()
    output = layer(x_leaf)
    output.backward(grad_output)
    exact = x.double().requires_grad_()
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    reference = torch.nn.functional.batch_norm(exact, None, None, weight, bias, training=True, eps=layer.eps)
    reference.backward(grad_output.double())
    bound = 1e-6 if dtype == torch.float32 else 4e-3
    assert relative_error(output, reference.detach()) <= bound
    assert relative_error(x_leaf.grad, exact.grad) <= 10 * bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streamed_passes_bitwise_across_thread_counts(dtype, on_thread_counts):
    """Streamed NCHW passes fetch the next group of their task while they write (on AMD CPUs,
    and here, see conftest.py), a piece of 512 values at a time, so which runs are split follows
    the thread count. 13x79 planes are 1027 values, which pieces of 512 alone would end with
    three: a split may not change how any value is computed."""
    n = 32 if dtype == torch.float32 else 64
    x = (torch.randn(n, 128, 13, 79) * 2 + 1).to(dtype)
    grad_output = torch.randn_like(x)
    assert 2 * x.numel() * x.element_size() >= CACHE_BYTES

    def train_a_layer():
        x_leaf = x.clone().requires_grad_()
        layer = torch_bn.BatchNorm2d(128).to(dtype)
        output = layer(x_leaf)
        output.backward(grad_output)
        return output.detach(), x_leaf.grad, layer.weight.grad, layer.bias.grad

    runs = on_thread_counts((1, 2), train_a_layer)
    for name, one, two in zip(("output", "input gradient", "weight gradient", "bias gradient"), *runs):
        assert torch.equal(one, two), name


def train_in_fresh_process(input_size, **variables):
    """The stderr of a process that trains a BatchNorm2d on randn(input_size) with the environment
    `variables` set, asserting that it failed. The kernels read their variables once per
    process, hence a fresh one; -P keeps the source folder (without _C) off sys.path."""
    channels = input_size[1]
    script = f"import torch, torch_bn; torch_bn.BatchNorm2d({channels})(torch.randn{tuple(input_size)})"
    env = dict(os.environ, **variables)
    result = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    return result.stderr


@pytest.mark.parametrize("value", ["lots", "-1", "24MiB"])
def test_stream_bound_variable_takes_a_positive_byte_count(value):
    stderr = train_in_fresh_process((2, 3, 4, 4), TORCH_BN_STREAM_BYTES=value)
    assert f"TORCH_BN_STREAM_BYTES must be a positive number of bytes, got '{value}'" in stderr


@pytest.mark.parametrize("value", ["true", "2", ""])
def test_fetch_variable_takes_0_or_1(value):
    # Read where a streamed pass goes on to its next group: with a 1-byte bound every pass
    # streams, and 4x16x32x32 is work enough to be cut into groups of channels, several to a
    # task (an input too small to split between threads is one group).
    stderr = train_in_fresh_process((4, 16, 32, 32), TORCH_BN_STREAM_BYTES="1", TORCH_BN_FETCH_NEXT_GROUP=value)
    assert f"TORCH_BN_FETCH_NEXT_GROUP must be 0 or 1, got '{value}'" in stderr
