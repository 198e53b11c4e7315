"""Layers built with from_keras / from_flax train like the source framework, and the
``running_var_biased`` option on its own. Expected numbers come from running Keras and Flax
(BN-FACTS.md, "Reproduced numbers")."""

import numpy as np
import pytest
import torch

import torch_bn

# Float32 results against numbers printed by float32 frameworks.
RTOL = 1e-6


def keras_layer():
    return torch_bn.BatchNorm1d.from_keras(gamma=None, beta=None, moving_mean=[0.0], moving_variance=[1.0])


def flax_layer():
    return torch_bn.BatchNorm1d.from_flax(scale=None, bias=None, mean=[0.0], var=[1.0])


def test_keras_running_statistics_after_one_batch():
    layer = keras_layer()
    layer(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    torch.testing.assert_close(layer.running_mean, torch.tensor([0.025]), rtol=RTOL, atol=0)
    torch.testing.assert_close(layer.running_var, torch.tensor([1.0025]), rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    "make_layer, expected_inference", [(keras_layer, 99.448524), (flax_layer, 99.49823)], ids=["keras", "flax"]
)
def test_training_on_one_value_per_channel_then_inference(make_layer, expected_inference):
    layer = make_layer()
    x = torch.tensor([[100.0]])
    output = layer(x)
    assert output.item() == 0.0  # the bias: one value normalizes to zero
    torch.testing.assert_close(layer.running_mean, torch.tensor([1.0]), rtol=RTOL, atol=0)
    torch.testing.assert_close(layer.running_var, torch.tensor([0.99]), rtol=RTOL, atol=0)
    layer.eval()
    assert layer(x).item() == pytest.approx(expected_inference, rel=RTOL)


def test_fresh_keras_layer_in_inference():
    layer = keras_layer().eval()
    assert layer(torch.tensor([[100.0]])).item() == pytest.approx(99.950035, rel=RTOL)


def test_conventions_are_converted():
    keras = keras_layer()
    flax = flax_layer()
    assert keras.momentum == pytest.approx(0.01) and flax.momentum == pytest.approx(0.01)
    assert keras.eps == 1e-3 and flax.eps == 1e-5
    assert keras.running_var_biased and flax.running_var_biased
    assert "momentum=0.01," in repr(keras) and "running_var_biased=True" in repr(keras)


@pytest.mark.parametrize("to_array", [np.array, torch.tensor, list], ids=["numpy", "tensor", "list"])
def test_weights_are_taken_from_array_likes(to_array):
    gamma, beta, mean, var = [0.5, 2.0], [0.1, -0.2], [1.0, -3.0], [4.0, 0.25]
    layer = torch_bn.BatchNorm2d.from_keras(
        to_array(gamma), to_array(beta), to_array(mean), to_array(var), momentum=0.9, epsilon=1e-2
    )
    for name, values in {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var}.items():
        torch.testing.assert_close(getattr(layer, name).detach(), torch.tensor(values))
    assert type(layer) is torch_bn.BatchNorm2d and layer.momentum == pytest.approx(0.1) and layer.eps == 1e-2
    assert layer.weight.requires_grad and layer.bias.requires_grad


def test_dtype_and_device_are_honoured():
    layer = torch_bn.BatchNorm3d.from_flax(np.ones(3), None, np.zeros(3), np.ones(3), dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == layer.running_var.dtype == torch.float64
    torch.testing.assert_close(layer.bias.detach(), torch.zeros(3, dtype=torch.float64))


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="one value per channel"):
        torch_bn.BatchNorm1d.from_keras([1.0, 2.0], None, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="1D running mean"):
        torch_bn.BatchNorm1d.from_flax(None, None, [[0.0]], [[1.0]])


@pytest.mark.parametrize("momentum", [1.5, -0.1, None, float("nan")], ids=str)
def test_momentum_outside_zero_to_one_is_rejected(momentum):
    """Keras' and Flax's momentum is a decay in [0, 1]; outside it torch's momentum would be too
    (1.5 became -0.5), and None failed in an arithmetic TypeError."""
    with pytest.raises(ValueError, match=r"momentum .* must be a number in \[0, 1\]"):
        torch_bn.BatchNorm2d.from_keras([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0], momentum=momentum)
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
        torch_bn.BatchNorm2d.from_flax([1.0], [0.0], [0.0], [1.0], momentum=momentum)


def test_running_var_biased_option_on_its_own():
    x = torch.randn(6, 3, 5, 5) * 2 + 1
    layer = torch_bn.BatchNorm2d(3, running_var_biased=True)
    reference = torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    biased = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * biased, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, atol=1e-6, rtol=1e-6)
    assert layer.state_dict().keys() == reference.state_dict().keys()
    assert "running_var_biased=True" in repr(layer) and "running_var_biased" not in repr(torch_bn.BatchNorm2d(3))


def test_one_value_per_channel_is_still_rejected_with_torch_conventions():
    layer = torch_bn.BatchNorm1d(1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.tensor([[100.0]]))
    assert layer.num_batches_tracked.item() == 0
