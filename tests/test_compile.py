"""torch.compile(fullgraph=True) and torch.export of a small network built on torch_bn match
eager mode.

Compiling is slow, so there are few cases: one network, trained for two steps and evaluated.
"""

import copy

import pytest
import torch
import torch._inductor.config
from torch import nn

import torch_bn


def assert_matches(actual, expected, what):
    """Equal up to float32 rounding, which the compiled graph changes by fusing and reordering
    the work around the torch_bn ops. The absolute part scales with the tensor's largest value:
    a sum whose terms cancel keeps the rounding error of its terms. (A weight gradient of about
    23 was 1.9e-5 off in one element on an AVX2-only CPU, eager and compiled alike about 2e-5
    from float64.)"""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def small_net():
    # Each torch_bn layer sits between layers that inductor compiles, and the second uses the
    # cumulative average (momentum=None), whose factor depends on num_batches_tracked.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        torch_bn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        torch_bn.BatchNorm1d(6, momentum=None),
    )


# Compiling in this process: starting inductor's pool of compile workers costs more than it
# saves for a graph this small (measured: about half the test's time on 2 cores).
@torch._inductor.config.patch(compile_threads=1)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_net_matches_eager(training, device):
    torch._dynamo.reset()
    eager = small_net().to(device)
    with torch.no_grad():
        for module in eager.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy, fullgraph=True)
    eager.train(training)
    compiled_copy.train(training)
    for step in range(2):
        x = torch.randn(4, 3, 7, 7, device=device) * 2 + 0.5
        y_eager, y_compiled = eager(x), compiled(x)
        assert_matches(y_compiled, y_eager, f"step {step} output")
        grad_output = torch.randn_like(y_eager)
        y_eager.backward(grad_output)
        y_compiled.backward(grad_output)
        compiled_state = dict(compiled_copy.named_parameters())
        for name, p_eager in eager.named_parameters():
            assert_matches(compiled_state[name].grad, p_eager.grad, f"step {step} grad {name}")
        compiled_buffers = dict(compiled_copy.named_buffers())
        for name, b_eager in eager.named_buffers():
            assert_matches(compiled_buffers[name], b_eager, f"step {step} {name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_exported_net_matches_eager(training, device):
    eager = small_net().to(device).train(training)
    exported_copy = copy.deepcopy(eager)
    x = torch.randn(4, 3, 7, 7, device=device) * 2 + 0.5
    exported = torch.export.export(exported_copy, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert ("torch_bn.forward_train_update.default" if training else "torch_bn.forward_eval.default") in ops, ops
    assert not [op for op in ops if "batch_norm" in op], ops
    program = exported.module()
    for step in range(2):
        x = torch.randn(4, 3, 7, 7, device=device) * 2 + 0.5
        assert_matches(program(x), eager(x), f"step {step} output")
    # The exported program updates the running statistics as the module does.
    exported_buffers = dict(program.named_buffers())
    assert exported_buffers.keys() == dict(eager.named_buffers()).keys()
    for name, b_eager in eager.named_buffers():
        assert_matches(exported_buffers[name], b_eager, name)


def test_traced_eval_gradients_read_the_statistics_they_are_given(device):
    # Evaluation's autograd kernel builds the statistics its backward takes from the running
    # statistics; under make_fx those ops must be traced from the graph's inputs, not read once
    # and baked into the graph as the tracing call's values.
    from torch.fx.experimental.proxy_tensor import make_fx

    def gradients(x, weight, running_mean, running_var):
        y = torch.ops.torch_bn.forward_eval.default(x, weight, None, running_mean, running_var, 1e-5)
        return torch.autograd.grad(y.square().sum(), (x, weight))

    def inputs():
        x = (torch.randn(4, 3, 5, 5, device=device) * 2 + 0.5).requires_grad_()
        weight = (torch.rand(3, device=device) + 0.5).requires_grad_()
        return x, weight, torch.randn(3, device=device), torch.rand(3, device=device) + 0.5

    traced = make_fx(gradients)(*inputs())
    fresh = inputs()
    for actual, expected, name in zip(traced(*fresh), gradients(*fresh), ("grad_input", "grad_weight")):
        assert_matches(actual, expected, name)
