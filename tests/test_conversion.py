"""torch_bn.convert and torch_bn.revert switch a module tree's BatchNorm layers between torch.nn
and torch_bn in place, keeping every tensor, flag and hook, and the outputs."""

import copy

import pytest
import torch

import torch_bn

# torch_bn's kernels against torch.nn's, float32.
ATOL, RTOL = 1e-5, 1e-5


class Net(torch.nn.Module):
    """A BatchNorm of each dimensionality, one nested, and a non-BatchNorm layer between."""

    def __init__(self):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm1d(4)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 1), torch.nn.BatchNorm2d(3, momentum=None))
        self.bn3 = torch.nn.BatchNorm3d(3, affine=False)

    def forward(self, x):
        x = self.bn1(x.flatten(2)).view_as(x)
        x = self.body(x)
        return self.bn3(x.unsqueeze(2))


def trained_net():
    """A net whose running statistics and num_batches_tracked are no longer the initial ones."""
    net = Net()
    net(torch.randn(4, 4, 3, 3) + 2)
    return net


def batchnorm_types(module):
    return [type(m) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_convert_replaces_every_layer_and_keeps_tensors_and_flags():
    net = trained_net()
    net.bn1.weight.requires_grad_(False)
    net.body.eval()
    tensors = {name: t for name, t in [*net.named_parameters(), *net.named_buffers()]}
    assert torch_bn.convert(net) is net
    assert batchnorm_types(net) == [torch_bn.BatchNorm1d, torch_bn.BatchNorm2d, torch_bn.BatchNorm3d]
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        assert t is tensors[name], name  # the same objects: an optimizer built before keeps working
    assert net.body[1].num_batches_tracked.item() == 1
    assert not net.bn1.weight.requires_grad and net.bn1.bias.requires_grad
    assert net.training and not net.body[1].training
    assert net.bn3.weight is None and net.body[1].momentum is None


def test_outputs_and_gradients_are_unchanged():
    net = trained_net()
    converted = torch_bn.convert(copy.deepcopy(net))
    x = torch.randn(5, 4, 3, 3) * 3 + 1
    for mode in (True, False):
        outputs = []
        for model in (net, converted):
            model.train(mode)
            xi = x.clone().requires_grad_()
            y = model(xi)
            y.pow(2).sum().backward()
            outputs.append((y, xi.grad, model.body[1].running_var.clone()))
        for expected, actual in zip(*outputs):
            torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def test_dtype_and_device_are_kept():
    layer = torch.nn.BatchNorm2d(3, dtype=torch.float64, device="meta")
    torch_bn.convert(layer)
    assert layer.weight.dtype == layer.running_mean.dtype == torch.float64
    assert layer.weight.device.type == "meta"


def test_a_bare_layer_is_converted_and_returned():
    layer = torch.nn.BatchNorm2d(3)
    hook_calls = []
    layer.register_forward_hook(lambda *args: hook_calls.append(1))
    converted = torch_bn.convert(layer)
    assert type(converted) is torch_bn.BatchNorm2d
    converted(torch.randn(2, 3, 2, 2))
    assert hook_calls == [1]


def test_sync_batchnorm_keeps_its_process_group():
    group = object()  # stands for a process group: conversion only carries it
    layer = torch.nn.SyncBatchNorm(3, process_group=group)
    assert type(torch_bn.convert(layer)) is torch_bn.SyncBatchNorm and layer.process_group is group
    assert type(torch_bn.revert(layer)) is torch.nn.SyncBatchNorm and layer.process_group is group


def test_subclasses_and_lazy_layers_are_left_alone():
    class CustomBatchNorm(torch.nn.BatchNorm2d):
        pass

    net = torch.nn.Sequential(CustomBatchNorm(3), torch.nn.LazyBatchNorm2d())
    torch_bn.convert(net)
    assert type(net[0]) is CustomBatchNorm and type(net[1]) is torch.nn.LazyBatchNorm2d
    net(torch.randn(2, 3, 2, 2))  # the lazy layer becomes a torch.nn.BatchNorm2d ...
    torch_bn.convert(net)  # ... which converts
    assert type(net[1]) is torch_bn.BatchNorm2d


def test_revert_round_trip_restores_torch_nn_layers():
    net = trained_net()
    expected = copy.deepcopy(net.state_dict())
    torch_bn.revert(torch_bn.convert(net))
    assert batchnorm_types(net) == [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d]
    for layer in net.modules():
        assert "running_var_biased" not in vars(layer) and "frozen" not in vars(layer)
    state = net.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], value) for key, value in expected.items())


def test_revert_refuses_what_torch_nn_cannot_express():
    net = torch.nn.Sequential(torch_bn.BatchNorm1d(2, running_var_biased=True), torch_bn.BatchNorm2d(2))
    with pytest.raises(ValueError, match=r"0 \(running_var_biased=True\)"):
        torch_bn.revert(net)
    assert type(net[1]) is torch_bn.BatchNorm2d  # nothing changed


def test_state_dicts_load_across():
    net = trained_net()
    converted = torch_bn.convert(Net())
    converted.load_state_dict(net.state_dict())  # strict: same keys
    Net().load_state_dict(converted.state_dict())
    torch.testing.assert_close(converted.body[1].running_var, net.body[1].running_var, atol=0, rtol=0)
