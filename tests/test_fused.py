"""Fused BatchNorm + activation (+ residual): torch_bn.BatchNormAct1d/2d/3d, batch_norm_act and the
three fused operators, against the torch.nn composition ``act(BatchNorm(x) + residual)``.

Covers outputs, every gradient (input, residual, weight, bias) and the running statistics over
activation x residual x layout x dtype x mode; gradcheck in float64; what is saved for backward
(the input, a 1-bit mask and per-channel tensors only); the bit mask itself; the module API
(state_dict, checkpoints, repr, options); opcheck and torch.compile.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import torch_bn
from torch_bn import ops

ACTIVATIONS = ["identity", "relu", "leaky_relu"]
SLOPE = 0.2
SHAPE = (4, 3, 5, 6)
# Planes of 32 values or more, and 16 channels: the bfloat16 loops read 16 values at a time, by
# parity on AVX2 (channels-last where C is a multiple of 16), where SHAPE's 30-value planes and 3
# channels are read a vector at a time.
LONG_PLANES_SHAPE = (2, 16, 8, 8)
# Planes of under 64 values in a batch of 24 or more, which the NCHW kernels sum and write by
# position: backward gathers the residual's gradient and gates dy by the mask a row at a time.
BY_POSITION_SHAPE = (24, 6, 5, 6)
# Tolerances of the fused results against the torch.nn composition run in the same dtype
# (half types: against float32, since torch_bn rounds once and torch.nn after every op).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
}


def reference_activation(z, activation):
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, SLOPE)
    return z


def random_input(shape, dtype, device, channels_last=False):
    """Per-channel means and scales away from 0 and 1, so that normalization has work to do."""
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    mean = torch.linspace(-2.0, 3.0, channels, dtype=torch.float64).view(view)
    scale = torch.linspace(0.5, 2.0, channels, dtype=torch.float64).view(view)
    x = (torch.randn(shape, dtype=torch.float64) * scale + mean).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x


def randomize_(layer):
    """Affine parameters and running statistics that are not the 0/1 defaults."""
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        if layer.running_mean is not None:
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    return layer


def pair(cls, reference_cls, channels, activation, device, **kwargs):
    """A fused layer and a torch.nn layer with the same parameters and buffers."""
    reference = randomize_(reference_cls(channels, device=device, **kwargs))
    fused = cls(channels, activation, negative_slope=SLOPE, device=device, **kwargs)
    fused.load_state_dict(reference.state_dict())
    return fused, reference


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def assert_grads_close(actual, expected, tolerance, names):
    for a, e, name in zip(actual, expected, names):
        torch.testing.assert_close(a, e.to(a.dtype), **tolerance, msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["noresidual", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "shape", [SHAPE, LONG_PLANES_SHAPE, BY_POSITION_SHAPE], ids=["3ch-planes30", "16ch-planes64", "batch24-planes30"]
)
def test_module_matches_torch_nn_composition(shape, activation, with_residual, channels_last, dtype, training, device):
    reference_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    fused, reference = pair(
        torch_bn.BatchNormAct2d, torch.nn.BatchNorm2d, shape[1], activation, device, dtype=param_dtype
    )
    fused.train(training)
    reference.train(training)
    x = leaf(random_input(shape, dtype, device, channels_last))
    # A contiguous residual for a channels-last input too: any strides are accepted.
    residual = leaf(torch.randn(shape, device=device, dtype=dtype)) if with_residual else None
    grad_output = torch.randn(shape, device=device, dtype=dtype)

    y = fused(x, residual)
    x_ref = leaf(x, reference_dtype)
    residual_ref = leaf(residual, reference_dtype) if with_residual else None
    z_ref = reference(x_ref) + (residual_ref if with_residual else 0)
    y_ref = reference_activation(z_ref, activation)
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_ref.to(dtype), **tolerance)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    y.backward(grad_output)
    y_ref.backward(grad_output.to(reference_dtype))
    grads = [x.grad, fused.weight.grad, fused.bias.grad] + ([residual.grad] if with_residual else [])
    expected = [x_ref.grad, reference.weight.grad, reference.bias.grad] + ([residual_ref.grad] if with_residual else [])
    param_tolerance = TOLERANCES[torch.float32 if dtype == torch.bfloat16 else dtype]
    assert_grads_close(grads[:1], expected[:1], tolerance, ["grad_input"])
    assert_grads_close(grads[1:3], expected[1:3], param_tolerance, ["grad_weight", "grad_bias"])
    assert_grads_close(grads[3:], expected[3:], tolerance, ["grad_residual"])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), **param_tolerance, msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["noresidual", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_without_autograd_matches_torch_nn_composition(activation, with_residual, training):
    """Under no_grad the layer calls the forward operators directly (no autograd.Function)."""
    fused, reference = pair(torch_bn.BatchNormAct2d, torch.nn.BatchNorm2d, 3, activation, "cpu")
    fused.train(training)
    reference.train(training)
    x = random_input(SHAPE, torch.float32, "cpu")
    residual = torch.randn(SHAPE) if with_residual else None
    with torch.no_grad():
        for _step in range(2):
            y = fused(x, residual)
            y_ref = reference_activation(reference(x) + (residual if with_residual else 0), activation)
            torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    assert y.grad_fn is None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), **TOLERANCES[torch.float32], msg=name)


@pytest.mark.parametrize(
    "cls, reference_cls, shape, channels_last",
    [
        (torch_bn.BatchNormAct1d, torch.nn.BatchNorm1d, (6, 4), False),
        (torch_bn.BatchNormAct1d, torch.nn.BatchNorm1d, (3, 4, 5), False),
        (torch_bn.BatchNormAct3d, torch.nn.BatchNorm3d, (2, 4, 3, 2, 3), False),
        (torch_bn.BatchNormAct3d, torch.nn.BatchNorm3d, (2, 4, 3, 2, 3), True),
    ],
    ids=["1d-2D", "1d-3D", "3d", "3d-channels_last"],
)
def test_1d_and_3d_layers_match_torch_nn_composition(cls, reference_cls, shape, channels_last, device):
    fused, reference = pair(cls, reference_cls, shape[1], "leaky_relu", device)
    x = leaf(random_input(shape, torch.float32, device, channels_last))
    residual = leaf(torch.randn(shape, device=device))
    x_ref, residual_ref = leaf(x), leaf(residual)
    y = fused(x, residual)
    y_ref = F.leaky_relu(reference(x_ref) + residual_ref, SLOPE)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    grad_output = torch.randn_like(y_ref)
    y.backward(grad_output)
    y_ref.backward(grad_output)
    assert_grads_close(
        [x.grad, residual.grad, fused.weight.grad, fused.bias.grad],
        [x_ref.grad, residual_ref.grad, reference.weight.grad, reference.bias.grad],
        TOLERANCES[torch.float32],
        ["grad_input", "grad_residual", "grad_weight", "grad_bias"],
    )
    torch.testing.assert_close(fused.running_var, reference.running_var, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("momentum", [0.3, None], ids=["m0.3", "mNone"])
@pytest.mark.parametrize("track_running_stats", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_running_statistics_follow_torch_nn_over_steps(affine, track_running_stats, momentum):
    options = dict(affine=affine, track_running_stats=track_running_stats, momentum=momentum)
    fused, reference = pair(torch_bn.BatchNormAct2d, torch.nn.BatchNorm2d, 3, "relu", "cpu", **options)
    for step, training in enumerate([True, True, False, True]):
        fused.train(training)
        reference.train(training)
        x = random_input(SHAPE, torch.float32, "cpu") + step
        residual = torch.randn(SHAPE)
        torch.testing.assert_close(fused(x, residual), torch.relu(reference(x) + residual), **TOLERANCES[torch.float32])
        torch.testing.assert_close(fused.state_dict(), reference.state_dict(), **TOLERANCES[torch.float32])


def test_functional_matches_torch_nn_composition():
    running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    x, residual = random_input(SHAPE, torch.float32, "cpu"), torch.randn(SHAPE)
    ours = (running_mean.clone(), running_var.clone())
    y = torch_bn.batch_norm_act(
        x, *ours, weight, bias, True, 0.2, 1e-3, residual=residual, activation="leaky_relu", negative_slope=SLOPE
    )
    expected = F.leaky_relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.2, 1e-3) + residual, SLOPE)
    torch.testing.assert_close(y, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ours, (running_mean, running_var), **TOLERANCES[torch.float32])


@pytest.mark.parametrize(
    "residual_shape, residual_dtype",
    [((1, 3, 1, 1), torch.float32), ((5, 6), torch.float32), (SHAPE, torch.float64)],
    ids=["broadcast-channels", "broadcast-trailing", "float64"],
)
def test_residual_that_does_not_match_is_added_unfused(residual_shape, residual_dtype):
    """Broadcasting and type promotion as in ``relu(bn(x) + residual)``."""
    fused, reference = pair(torch_bn.BatchNormAct2d, torch.nn.BatchNorm2d, 3, "relu", "cpu")
    x = leaf(random_input(SHAPE, torch.float32, "cpu"))
    residual = leaf(torch.randn(residual_shape, dtype=residual_dtype))
    x_ref, residual_ref = leaf(x), leaf(residual)
    y = fused(x, residual)
    y_ref = torch.relu(reference(x_ref) + residual_ref)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(residual.grad, residual_ref.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["noresidual", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_gradcheck(channels_last, activation, with_residual, training):
    running_mean = torch.randn(3, dtype=torch.float64)
    running_var = torch.rand(3, dtype=torch.float64) + 0.5
    x = leaf(random_input((3, 3, 2, 3), torch.float64, "cpu", channels_last))
    weight = leaf(torch.rand(3, dtype=torch.float64) + 0.5)
    bias = leaf(torch.randn(3, dtype=torch.float64))
    inputs = [x, weight, bias] + ([leaf(torch.randn(3, 3, 2, 3, dtype=torch.float64))] if with_residual else [])

    def fn(x, weight, bias, residual=None):
        # Fresh running statistics: the training update must not feed back into later calls.
        return torch_bn.batch_norm_act(
            x, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-3,
            residual=residual, activation=activation, negative_slope=SLOPE,
        )

    assert gradcheck(fn, inputs)


def test_double_backward_raises():
    layer = torch_bn.BatchNormAct2d(3).double()
    x = leaf(random_input(SHAPE, torch.float64, "cpu"))
    (grad_x,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ops_double_backward_raises(training):
    # The ops' autograd (registered in C++) as the layer's: a gradient of their gradient raises
    # rather than coming out as if the mask's dependence on the input were nothing.
    x = leaf(random_input(SHAPE, torch.float64, "cpu"))
    weight, bias = (leaf(torch.rand(SHAPE[1], dtype=torch.float64) + 0.5) for _ in range(2))
    if training:
        output = ops.forward_train_act(x, weight, bias, None, 1e-3, "relu", SLOPE)[0]
    else:
        running_mean, running_var = torch.zeros(SHAPE[1], dtype=torch.float64), torch.ones(SHAPE[1], dtype=torch.float64)
        output = ops.forward_eval_act(x, weight, bias, running_mean, running_var, None, 1e-3, "relu", SLOPE)[0]
    grad_x, grad_weight = torch.autograd.grad(output.pow(2).sum(), (x, weight), create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        (grad_x.sum() + grad_weight.sum()).backward()


def saved_bytes(fn):
    """(bytes of every tensor saved for backward during ``fn()``, those tensors)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.numel() * t.element_size() for t in saved), saved


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saves_only_the_input_the_bit_mask_and_per_channel_tensors(activation, training):
    layer = torch_bn.BatchNormAct2d(8, activation, negative_slope=SLOPE).train(training)
    shape = (4, 8, 7, 9)
    x = leaf(random_input(shape, torch.float32, "cpu"))
    residual = leaf(torch.randn(shape))
    total, saved = saved_bytes(lambda: layer(x, residual))
    numel = x.numel()
    mask_bytes = 0 if activation == "identity" else (numel + 7) // 8
    full_size = [t for t in saved if t.numel() > shape[1] and t.dtype != torch.uint8]
    assert len(full_size) == 1 and full_size[0].data_ptr() == x.data_ptr()
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert [t.numel() for t in masks] == [mask_bytes]
    per_channel_bytes = total - numel * x.element_size() - mask_bytes
    assert 0 < per_channel_bytes <= 4 * shape[1] * 8  # weight, mean, invstd: O(C)
    # The torch.nn composition saves the activation's output as well.
    reference = torch.nn.BatchNorm2d(8).train(training)
    reference_total, _ = saved_bytes(lambda: reference_activation(reference(x) + residual, activation))
    if activation != "identity":
        assert reference_total - total >= numel * x.element_size() - mask_bytes - per_channel_bytes


def pack_bits(z, channels_last):
    """Bit e = z_e > 0 for e in the memory order of a contiguous or channels-last tensor, LSB first."""
    ordered = z.permute(0, 2, 3, 1) if channels_last else z
    bits = (ordered > 0).flatten()
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).view(-1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
# 120 and 135 elements: whole and partial last byte; 7x7 planes in several tasks, whose spans
# share bytes at their ends, written plane by plane and (batch 32) a row of a group at a time.
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 5, 3, 3), (8, 24, 7, 7), (32, 24, 7, 7)], ids=str)
def test_mask_holds_the_sign_of_z_in_memory_order(shape, channels_last, training):
    x = random_input(shape, torch.float32, "cpu", channels_last)
    residual = torch.randn(shape)
    if training:
        output, _mean, _invstd, mask = torch_bn.ops.forward_train_act(x, None, None, residual, 1e-5, "leaky_relu", SLOPE)
        z = torch_bn.ops.forward_train(x, None, None, 1e-5)[0] + residual
    else:
        running_mean, running_var = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
        output, mask = torch_bn.ops.forward_eval_act(x, None, None, running_mean, running_var, residual, 1e-5, "leaky_relu", SLOPE)
        z = torch_bn.ops.forward_eval(x, None, None, running_mean, running_var, 1e-5) + residual
    assert mask.dtype == torch.uint8 and mask.shape == ((x.numel() + 7) // 8,)
    assert torch.equal(mask, pack_bits(z, channels_last))
    torch.testing.assert_close(output, F.leaky_relu(z, SLOPE), **TOLERANCES[torch.float32])
    identity_mask = torch_bn.ops.forward_train_act(x, None, None, residual, 1e-5, "identity", 0.0)[3]
    assert identity_mask.dtype == torch.uint8 and identity_mask.numel() == 0


def per_channel(dtype, low=0.5, high=1.5, requires_grad=False):
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.empty(3, dtype=stats).uniform_(low, high).requires_grad_(requires_grad)


def opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert all(result == "SUCCESS" for result in results.values()), results


OPCHECK_SAMPLES = [(torch.float32, False), (torch.float32, True), (torch.float64, False), (torch.bfloat16, True)]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype, channels_last", OPCHECK_SAMPLES, ids=str)
def test_opcheck_forward_ops(dtype, channels_last, activation, requires_grad):
    x = random_input(SHAPE, dtype, "cpu", channels_last).requires_grad_(requires_grad)
    residual = torch.randn(SHAPE, dtype=dtype).requires_grad_(requires_grad)
    weight = per_channel(dtype, requires_grad=requires_grad)
    bias = per_channel(dtype, -1.0, 1.0, requires_grad)
    opcheck(torch.ops.torch_bn.forward_train_act.default, (x, weight, bias, residual, 1e-5, activation, SLOPE))
    running_mean, running_var = per_channel(dtype, -1.0, 1.0), per_channel(dtype)
    opcheck(
        torch.ops.torch_bn.forward_eval_act.default,
        (x, weight, bias, running_mean, running_var, residual, 1e-5, activation, SLOPE),
    )


@pytest.mark.parametrize("output_mask", [[True, True, True, True], [False, False, False, True], [True, False, True, False]], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype, channels_last", OPCHECK_SAMPLES, ids=str)
def test_opcheck_backward_act(dtype, channels_last, training, output_mask):
    x = random_input(SHAPE, dtype, "cpu", channels_last)
    grad_output = torch.randn(SHAPE, dtype=dtype)
    mask = torch.randint(0, 256, ((x.numel() + 7) // 8,), dtype=torch.uint8)
    args = (grad_output, x, per_channel(dtype), per_channel(dtype, -1.0, 1.0), per_channel(dtype), mask, training)
    opcheck(torch.ops.torch_bn.backward_act.default, (*args, "leaky_relu", SLOPE, output_mask))


def test_bad_activation_is_rejected():
    with pytest.raises(ValueError, match="activation must be one of"):
        torch_bn.BatchNormAct2d(3, "gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch_bn.batch_norm_act(torch.randn(SHAPE), None, None, training=True, activation="tanh")
    with pytest.raises(RuntimeError, match="activation must be"):
        torch_bn.ops.forward_train_act(torch.randn(SHAPE), None, None, None, 1e-5, "gelu", 0.0)


def test_rejected_input_changes_no_running_statistics():
    layer = torch_bn.BatchNormAct2d(3)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1))
    torch.testing.assert_close(layer.state_dict(), before, rtol=0, atol=0)


def test_state_dict_and_checkpoints_are_batchnorm2d_ones():
    fused = torch_bn.BatchNormAct2d(3, "leaky_relu", negative_slope=SLOPE, eps=1e-3, momentum=0.2)
    reference = randomize_(torch.nn.BatchNorm2d(3))
    assert isinstance(fused, torch_bn.BatchNorm2d) and isinstance(fused, torch.nn.BatchNorm2d)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    fused.load_state_dict(reference.state_dict(), strict=True)
    torch.testing.assert_close(fused.state_dict(), reference.state_dict(), rtol=0, atol=0)
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict(fused.state_dict(), strict=True)
    torch_repr = repr(torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.2))
    assert repr(fused) == "BatchNormAct2d" + torch_repr[len("BatchNorm2d") : -1] + ", activation='leaky_relu', negative_slope=0.2)"
    assert repr(torch_bn.BatchNormAct2d(3)).endswith(", activation='relu')")


def test_freeze_and_keras_options_carry_over():
    fused = randomize_(torch_bn.BatchNormAct2d.from_keras(None, None, torch.zeros(3), torch.ones(3)))
    assert fused.running_var_biased and fused.activation == "relu"
    torch_bn.freeze(fused)
    before = fused.running_mean.clone()
    x = random_input(SHAPE, torch.float32, "cpu")
    # Frozen: evaluation-mode output in training mode, running statistics untouched.
    expected = torch.relu(F.batch_norm(x, fused.running_mean, fused.running_var, fused.weight, fused.bias, False, 0.0, fused.eps))
    torch.testing.assert_close(fused.train()(x), expected, **TOLERANCES[torch.float32])
    assert torch.equal(fused.running_mean, before)


def test_compiled_layer_matches_eager():
    fused = torch_bn.BatchNormAct2d(3)
    compiled = torch.compile(torch_bn.BatchNormAct2d(3), fullgraph=True)
    x = random_input(SHAPE, torch.float32, "cpu", channels_last=True)
    residual = torch.randn(SHAPE)
    leaves = [leaf(x), leaf(residual)], [leaf(x), leaf(residual)]
    outputs = [layer(*inputs) for layer, inputs in zip((fused, compiled), leaves)]
    torch.testing.assert_close(outputs[1], outputs[0], **TOLERANCES[torch.float32])
    for output in outputs:
        output.sum().backward()
    for eager, compiled_leaf in zip(*leaves):
        torch.testing.assert_close(compiled_leaf.grad, eager.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(compiled.running_var, fused.running_var, **TOLERANCES[torch.float32])
