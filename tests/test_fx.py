"""torch.fx's symbolic tracing records torch_bn's layers as calls of the modules, as it records
torch.nn's (its default tracer traces into every module defined outside torch.nn, where a
BatchNorm's input checks cannot branch on a Proxy)."""

import copy

import pytest
import torch
from torch import nn

import torch_bn


def conv_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


def node_summary(graph_module):
    return [(node.op, node.target) for node in graph_module.graph.nodes]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_symbolic_trace_records_layers_as_torch_nn_does(training, device):
    reference = conv_net().to(device).train(training)
    converted = torch_bn.convert(copy.deepcopy(reference))
    untraced = copy.deepcopy(converted)
    traced = torch.fx.symbolic_trace(converted)
    assert node_summary(traced) == node_summary(torch.fx.symbolic_trace(reference))
    x = torch.randn(4, 3, 8, 8, device=device)
    # The traced module calls the converted layers themselves: same outputs and running statistics.
    torch.testing.assert_close(traced(x), untraced(x), rtol=0, atol=0)
    for (name, value), expected in zip(traced.state_dict().items(), untraced.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)


def test_a_layer_traced_alone_raises_as_torch_nn_does():
    for layer in (torch.nn.BatchNorm2d(3), torch_bn.BatchNorm2d(3)):
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(layer)


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch_bn.BatchNormAct2d(4)

    def forward(self, x):
        return self.bn(self.conv(x), x)


def test_fused_layer_with_a_residual_traces_as_one_call(device):
    block = ResidualBlock().to(device).eval()
    traced = torch.fx.symbolic_trace(block)
    assert node_summary(traced) == [("placeholder", "x"), ("call_module", "conv"), ("call_module", "bn"), ("output", "output")]
    x = torch.randn(2, 4, 6, 6, device=device)
    torch.testing.assert_close(traced(x), block(x), rtol=0, atol=0)


def test_fx_quantization_prepares_and_converts_a_converted_model():
    """prepare_fx/convert_fx run over the torch_bn layers (left in float: FX's fusion patterns
    name torch.nn's classes, so conv and BatchNorm are not folded; torch_bn.revert first for
    that). The quantized model stays within int8 rounding of the float one."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = torch_bn.convert(conv_net()).eval()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (x,))
    prepared(x)
    quantized = convert_fx(prepared)
    assert isinstance(quantized.get_submodule("1"), torch_bn.BatchNorm2d)
    expected = model(x)
    assert (quantized(x) - expected).abs().max() <= 0.05 * expected.abs().max()
