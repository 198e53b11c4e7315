"""Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) and torch.func's transforms
through torch_bn match torch.nn. The kernels' C++ autograd Functions have no jvp and refuse
torch.func's wrapped tensors; such calls run the ops' formulas in ATen ops (csrc/formulas.cpp)."""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jvp, vmap

import torch_bn

# Both sides are float32 ATen-op compositions of the same formulas, in different orders.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def random_layers(device, channels=3, **kwargs):
    """A torch.nn.BatchNorm2d with non-trivial parameters and running statistics, and a torch_bn
    copy of it."""
    reference = torch.nn.BatchNorm2d(channels, **kwargs).to(device)
    with torch.no_grad():
        if reference.affine:
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.normal_()
        if reference.track_running_stats:
            reference.running_mean.normal_()
            reference.running_var.uniform_(0.5, 1.5)
    return reference, torch_bn.convert(copy.deepcopy(reference))


def random_input(device, layout="contiguous"):
    x = torch.randn(4, 3, 5, 5, device=device) * 2 + 1
    return x.contiguous(memory_format=LAYOUTS[layout])


def assert_same_state(ours, reference):
    for (name, value), expected in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, **TOLERANCE, msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_input_tangent_matches_torch_nn(training, layout, device):
    reference, ours = random_layers(device)
    x = random_input(device, layout)
    tangent = torch.randn_like(x)
    results = []
    for layer in (reference, ours):
        layer.train(training)
        with fwAD.dual_level():
            output, output_tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent)))
        assert output_tangent is not None
        results.append((output, output_tangent))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert_same_state(ours, reference)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parameter_tangents_and_reverse_gradients_match_torch_nn(training, device):
    """Tangents of the input, weight and bias at once, on leaves that also require grad (the C++
    Function used to raise there): the output's tangent and the reverse-mode gradients taken
    through the dual output both match torch.nn.functional.batch_norm's."""
    x = random_input(device)
    weight, bias = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    tangents = [torch.randn_like(t) for t in (x, weight, bias)]
    grad_output = torch.randn_like(x)
    results = []
    for batch_norm in (torch.nn.functional.batch_norm, torch_bn.batch_norm):
        running = (torch.zeros(3, device=device), torch.ones(3, device=device))
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, d) for t, d in zip(leaves, tangents)]
            output = batch_norm(duals[0], *running, duals[1], duals[2], training=training)
            output_tangent = fwAD.unpack_dual(output).tangent
            grads = torch.autograd.grad(output, leaves, grad_output)
        results.append((output_tangent, *grads, *running))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, **TOLERANCE)


# torch.nn's training forward with running statistics updates buffers in place, which torch.func
# refuses: training runs on batch statistics.
TRANSFORMABLE_MODES = pytest.mark.parametrize(
    "training, kwargs",
    [(False, {}), (True, dict(track_running_stats=False))],
    ids=["eval", "train-batch-stats"],
)


@TRANSFORMABLE_MODES
def test_func_jvp_matches_torch_nn(training, kwargs, device):
    """torch.func.jvp over parameters and input."""
    reference, ours = random_layers(device, **kwargs)
    x = random_input(device)
    params = {name: p.detach() for name, p in reference.named_parameters()}
    param_tangents = {name: torch.randn_like(p) for name, p in params.items()}
    x_tangent = torch.randn_like(x)
    results = []
    for layer in (reference.train(training), ours.train(training)):

        def call(params, x, layer=layer):
            return functional_call(layer, params, (x,))

        results.append(jvp(call, (params, x), (param_tangents, x_tangent)))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, **TOLERANCE)
        assert expected.abs().max() > 0.1  # not two empty tangents agreeing


@TRANSFORMABLE_MODES
def test_func_grad_matches_torch_nn(training, kwargs, device):
    reference, ours = random_layers(device, **kwargs)
    x = random_input(device)
    grad_output = torch.randn_like(x)
    params = {name: p.detach() for name, p in reference.named_parameters()}
    results = []
    for layer in (reference.train(training), ours.train(training)):

        def loss(params, x, layer=layer):
            return (functional_call(layer, params, (x,)) * grad_output).sum()

        param_grads, input_grad = grad(loss, argnums=(0, 1))(params, x)
        results.append([*param_grads.values(), input_grad])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_vmap_and_per_sample_gradients_match_torch_nn(device):
    """vmap of evaluation over a stack of inputs, and per-sample parameter gradients
    (vmap of grad), as functorch's tutorials compute them."""
    reference, ours = random_layers(device)
    inputs = torch.randn(6, 2, 3, 5, 5, device=device)
    params = {name: p.detach() for name, p in reference.named_parameters()}
    results = []
    for layer in (reference.eval(), ours.eval()):

        def loss(params, x, layer=layer):
            return functional_call(layer, params, (x,)).square().sum()

        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, inputs)
        results.append([vmap(layer)(inputs), *per_sample.values()])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_op_propagates_the_tangent_of_grad_output(training, device):
    """The backward op is linear in grad_output: its tangent is the op applied to the tangent."""
    x = random_input(device)
    weight = torch.rand(3, device=device) + 0.5
    _, mean, invstd = torch_bn.ops.forward_train(x, weight, None, 1e-5)
    grad_output, tangent = torch.randn_like(x), torch.randn_like(x)
    mask = [True, True, False]
    with fwAD.dual_level():
        grads = torch_bn.ops.backward(fwAD.make_dual(grad_output, tangent), x, weight, mean, invstd, training, mask)
        primals, tangents = zip(*(fwAD.unpack_dual(g) for g in grads))
    for actual, expected in zip(primals, torch_bn.ops.backward(grad_output, x, weight, mean, invstd, training, mask)):
        torch.testing.assert_close(actual, expected, **TOLERANCE)
    expected_tangents = torch_bn.ops.backward(tangent, x, weight, mean, invstd, training, mask)
    for actual, expected in zip(tangents[:2], expected_tangents[:2]):
        torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert grads[2].numel() == 0  # not asked for: empty, as the kernels return it


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("trainable", [True, False], ids=["parameters", "frozen-parameters"])
def test_fused_activation_layers_refuse_tangents(training, trainable, device):
    """The fused layers have no forward-mode formula: they raise, whether the call goes through
    BatchNormActFunction (a gradient can be asked for) or straight to the op, and change nothing."""
    layer = torch_bn.BatchNormAct2d(3).to(device).train(training).requires_grad_(trainable)
    before = copy.deepcopy(layer.state_dict())
    x = random_input(device)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward.mode AD"):
            layer(fwAD.make_dual(x, torch.randn_like(x)))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"
