"""torch_bn.convert(model, fuse_activations=True): the torch.fx rewrite of BatchNorm -> ReLU and
BatchNorm -> add -> ReLU into BatchNormAct layers, on small ResNet-style nets.

The fused net must give the original's outputs, input and parameter gradients and running
statistics, keep its state_dict keys and tensors, leave the original usable, fuse exactly the
patterns it can prove safe, and report (not fail on) parts that torch.fx cannot trace.
"""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_bn
from torch_bn.fusion import fuse_activations

# benchmarks/ (whose ResNet is fused below) is a package of the checkout, not of the install; the
# root goes last on sys.path so that `import torch_bn` still finds the installed package.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.resnet import ResNet  # noqa: E402

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def conv_bn(in_channels, out_channels, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False), nn.BatchNorm2d(out_channels))


class Block(nn.Module):
    """A basic residual block, spelling the activations and adds in different ways."""

    def __init__(self, in_channels, out_channels, stride, spelling):
        super().__init__()
        self.conv_bn1 = conv_bn(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv_bn2 = conv_bn(out_channels, out_channels)
        self.shortcut = conv_bn(in_channels, out_channels, stride) if stride > 1 or in_channels != out_channels else nn.Identity()
        self.spelling = spelling

    def forward(self, x):
        out = self.relu(self.conv_bn1(x))
        out = self.conv_bn2(out)
        if self.spelling == "iadd":
            out += self.shortcut(x)
            return F.relu(out, inplace=True)
        if self.spelling == "shortcut_first":
            return torch.relu(torch.add(self.shortcut(x), out))
        return (out + self.shortcut(x)).relu()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
        self.blocks = nn.Sequential(Block(8, 8, 1, "iadd"), Block(8, 16, 2, "shortcut_first"), Block(16, 16, 1, "method"))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# Fused: the stem's BN + LeakyReLU, every block's first BN + ReLU and one BN + add + ReLU per
# block. Where both operands of the add are BN outputs (block 1 adds the projection shortcut's
# BN to conv_bn2's), the first operand's BN takes the other as its residual.
EXPECTED_FUSED = {
    "stem.1": ("leaky_relu", None),
    "blocks.0.conv_bn1.1": ("relu", None),
    "blocks.0.conv_bn2.1": ("relu", "residual"),
    "blocks.1.conv_bn1.1": ("relu", None),
    "blocks.1.shortcut.1": ("relu", "residual"),
    "blocks.2.conv_bn1.1": ("relu", None),
    "blocks.2.conv_bn2.1": ("relu", "residual"),
}


def fused_layers(model):
    return {name: layer for name, layer in model.named_modules() if isinstance(layer, torch_bn.BatchNormAct2d)}


def trained(model):
    """Running statistics and num_batches_tracked that are not the initial ones."""
    model(torch.randn(4, 3, 8, 8) + 1)
    return model


def fused_copy(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a traceable net fuses without a report
        return torch_bn.convert(copy.deepcopy(model), fuse_activations=True)


def assert_same_training(reference, fused, steps=3):
    """Outputs, gradients and buffers of ``fused`` match ``reference`` over training steps and in eval."""
    for step in range(steps):
        x = (torch.randn(4, 3, 8, 8) * 2 + step).requires_grad_()
        x_fused = x.detach().clone().requires_grad_()
        out, out_fused = reference(x), fused(x_fused)
        torch.testing.assert_close(out_fused, out, **TOLERANCE)
        grad = torch.randn_like(out)
        out.backward(grad)
        out_fused.backward(grad)
        torch.testing.assert_close(x_fused.grad, x.grad, **TOLERANCE)
        fused_params = dict(fused.named_parameters())
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(fused_params[name].grad, parameter.grad, **TOLERANCE, msg=name)
        torch.testing.assert_close(fused.state_dict(), reference.state_dict(), **TOLERANCE)
    reference.eval()
    fused.eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(fused(x), reference(x), **TOLERANCE)


def test_resnet_style_net_is_fused_and_trains_like_the_original():
    reference = trained(Net())
    fused = fused_copy(reference)
    assert isinstance(fused, torch.fx.GraphModule)
    layers = fused_layers(fused)
    assert {name: layer.activation for name, layer in layers.items()} == {name: act for name, (act, _) in EXPECTED_FUSED.items()}
    assert layers["stem.1"].negative_slope == pytest.approx(0.1)
    residual_calls = {
        node.target for node in fused.graph.nodes if node.op == "call_module" and node.target in layers and len(node.args) == 2
    }
    assert residual_calls == {name for name, (_, residual) in EXPECTED_FUSED.items() if residual}
    modules = dict(fused.named_modules())
    remaining = [node for node in fused.graph.nodes if node.op in ("call_function", "call_method", "call_module")]
    assert not [node for node in remaining if node.target in (F.relu, torch.relu, "relu")]
    assert not [node for node in remaining if node.op == "call_module" and isinstance(modules[node.target], (nn.ReLU, nn.LeakyReLU))]
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert_same_training(reference, fused)


def test_the_original_stays_usable_and_shares_its_tensors():
    model = trained(torch_bn.convert(Net()))
    reference = copy.deepcopy(model)
    fused = torch_bn.convert(model, fuse_activations=True)
    # Same parameter and buffer objects: an optimizer built on the original keeps working.
    originals = dict([*model.named_parameters(), *model.named_buffers()])
    for name, tensor in [*fused.named_parameters(), *fused.named_buffers()]:
        assert tensor is originals[name], name
    assert not fused_layers(model) and type(model.stem[1]) is torch_bn.BatchNorm2d
    x = torch.randn(4, 3, 8, 8) + 2
    torch.testing.assert_close(model(x), reference(x), **TOLERANCE)
    # That training step moved the running statistics the fused net shares and reads in eval.
    fused.eval()
    reference.eval()
    torch.testing.assert_close(fused(x), reference(x), **TOLERANCE)


def test_benchmark_resnet_is_fused():
    reference = trained(ResNet((8, 16), (1, 1)))
    fused = fused_copy(reference)
    # Per bottleneck: two BN + ReLU and the last BN + add + ReLU; the stem's BN + ReLU. The
    # projection shortcuts' BNs feed the add as the residual.
    assert len(fused_layers(fused)) == 1 + 3 * 2
    assert_same_training(reference, fused, steps=2)


class DataDependent(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.body(x)
        if out.sum() > 0:
            out = out * 2
        return torch.relu(self.bn(out))


def test_untraceable_module_is_reported_and_its_children_fused():
    reference = trained(DataDependent())
    model = copy.deepcopy(reference)
    with pytest.warns(UserWarning, match=r"do not trace.*the root \(DataDependent: TraceError"):
        fused = torch_bn.convert(model, fuse_activations=True)
    assert fused is model
    # The Sequential traces on its own; the root's own bn + relu stays unfused.
    assert isinstance(fused.body, torch.fx.GraphModule)
    assert set(fused_layers(fused)) == {"body.1"}
    assert type(fused.bn) is torch_bn.BatchNorm2d
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(fused(x), reference(x), **TOLERANCE)


class Unfusable(nn.Module):
    """Patterns that must stay as they are."""

    def __init__(self):
        super().__init__()
        self.used_twice = nn.BatchNorm2d(3)
        self.called_twice = nn.BatchNorm2d(3)
        self.scaled_add = nn.BatchNorm2d(3)
        self.sync = nn.SyncBatchNorm(3)
        self.subclass = type("MyBatchNorm", (nn.BatchNorm2d,), {})(3)

    def forward(self, x):
        a = self.used_twice(x)
        a = torch.relu(a) + a  # the BN's output is read after the ReLU too
        b = torch.relu(self.called_twice(x)) + self.called_twice(a)
        c = torch.relu(torch.add(self.scaled_add(x), b, alpha=2))
        return torch.relu(self.sync(c)) + torch.relu(self.subclass(c))  # classes without a fused form


def test_patterns_that_cannot_be_fused_are_left_alone():
    reference = trained(Unfusable())
    fused = torch_bn.convert(copy.deepcopy(reference), fuse_activations=True)
    assert not fused_layers(fused)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(fused(x), reference(x), **TOLERANCE)


class BroadcastResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.offset = nn.Parameter(torch.randn(3, 1, 1))

    def forward(self, x):
        return torch.relu(self.bn(x) + self.offset)


def test_broadcast_residual_gives_the_original_results():
    reference = trained(BroadcastResidual())
    fused = fused_copy(reference)
    assert set(fused_layers(fused)) == {"bn"}
    assert_same_training(reference, fused)


def test_revert_refuses_fused_layers():
    fused = torch_bn.convert(Net(), fuse_activations=True)
    with pytest.raises(ValueError, match=r"stem.1 \(activation='leaky_relu'\)"):
        torch_bn.revert(fused)


def test_fusing_twice_changes_nothing_more():
    once = fused_copy(trained(Net()))
    twice = fuse_activations(once)
    assert twice is once
    assert set(fused_layers(twice)) == set(EXPECTED_FUSED)
