"""torch_bn.freeze gives Keras' trainable=False behaviour: running statistics used and never
updated, weight and bias frozen, and a parent's .train() does not undo it."""

import copy
import io

import pytest
import torch

import torch_bn

# torch_bn's kernels against torch.nn's, float32.
ATOL, RTOL = 1e-5, 1e-5

SHAPES = {torch.nn.BatchNorm1d: (6, 3, 5), torch.nn.BatchNorm2d: (6, 3, 4, 4), torch.nn.BatchNorm3d: (6, 3, 2, 3, 3)}


def trained_model(layer_class):
    """A BatchNorm inside a container, trained once so that its running statistics differ from
    any batch's and its affine parameters from the initial ones."""
    model = torch.nn.Sequential(torch.nn.Identity(), layer_class(3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    model(torch.randn(SHAPES[layer_class]) * 2 + 1)
    return model


def output_and_input_grad(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("layer_class", list(SHAPES), ids=lambda c: c.__name__)
def test_frozen_layer_in_train_mode_computes_eval_mode(layer_class):
    model = trained_model(layer_class)
    reference = copy.deepcopy(model).eval()
    stats = {name: b.clone() for name, b in model[1].named_buffers()}
    assert torch_bn.freeze(model) is model
    model.train()
    x = torch.randn(SHAPES[layer_class]) * 3 - 2
    y, dx = output_and_input_grad(model, x)
    expected_y, expected_dx = output_and_input_grad(reference, x)
    torch.testing.assert_close(y, expected_y, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dx, expected_dx, atol=ATOL, rtol=RTOL)
    for name, buffer in model[1].named_buffers():
        assert torch.equal(buffer, stats[name]), name
    assert not model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[1].weight.grad is None
    assert type(model[1]) is torch_bn.conversion.TORCH_TO_TORCH_BN[layer_class] and model[1].frozen
    assert "frozen=True" in repr(model[1])


def test_freeze_converts_torch_nn_layers_and_a_bare_root():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.SyncBatchNorm(3), torch_bn.BatchNorm1d(3))
    torch_bn.freeze(model)
    assert [type(m) for m in model] == [torch_bn.BatchNorm2d, torch_bn.SyncBatchNorm, torch_bn.BatchNorm1d]
    assert all(m.frozen for m in model)
    layer = torch_bn.freeze(torch.nn.BatchNorm2d(3))
    assert type(layer) is torch_bn.BatchNorm2d and layer.frozen


def test_unfreeze_restores_training():
    model = trained_model(torch.nn.BatchNorm2d)
    reference = copy.deepcopy(model)
    torch_bn.unfreeze(torch_bn.freeze(model))
    x = torch.randn(SHAPES[torch.nn.BatchNorm2d]) + 4
    torch.testing.assert_close(model(x), reference(x), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, atol=1e-6, rtol=1e-6)
    assert model[1].num_batches_tracked.item() == 2
    assert model[1].weight.requires_grad and model[1].bias.requires_grad and not model[1].frozen


def test_freeze_all_but_batchnorm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch_bn.freeze(torch.nn.BatchNorm1d(3)))
    assert torch_bn.freeze_all_but_batchnorm(model) is model
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    model(torch.randn(5, 4))
    assert model[1].num_batches_tracked.item() == 1  # the BatchNorm trains


def test_a_fixed_weight_stays_fixed_through_freezing():
    """The README's Keras recipe for scale=False fixes the weight (requires_grad False): freeze,
    unfreeze and freeze_all_but_batchnorm keep it fixed and leave the bias trainable."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch_bn.BatchNorm1d(3))
    model[1].weight.requires_grad_(False)
    torch_bn.unfreeze(torch_bn.freeze(model))
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]
    torch_bn.freeze(model)
    torch_bn.freeze_all_but_batchnorm(model)
    assert [p.requires_grad for p in model.parameters()] == [False, False, False, True]
    assert not model[1].frozen
    torch_bn.freeze_all_but_batchnorm(model)
    assert [p.requires_grad for p in model.parameters()] == [False, False, False, True]


def test_unconvertible_layer_is_rejected_and_nothing_changes():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match=r"1 \(LazyBatchNorm2d\)"):
        torch_bn.freeze(model)
    assert type(model[0]) is torch.nn.BatchNorm2d and model[0].weight.requires_grad


def test_whole_model_pickle_keeps_it_frozen():
    model = torch_bn.freeze(trained_model(torch.nn.BatchNorm2d))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).train()
    x = torch.randn(SHAPES[torch.nn.BatchNorm2d])
    assert loaded[1].frozen and not loaded[1].weight.requires_grad
    torch.testing.assert_close(loaded(x), model.eval()(x), atol=0, rtol=0)


def test_state_dict_into_a_fresh_frozen_model():
    model = torch_bn.freeze(trained_model(torch.nn.BatchNorm2d))
    fresh = torch_bn.freeze(torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm2d(3)))
    fresh.load_state_dict(model.state_dict())
    plain = torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm2d(3))
    plain.load_state_dict(model.state_dict())  # same keys as torch.nn: "frozen" is not in it
    x = torch.randn(SHAPES[torch.nn.BatchNorm2d])
    torch.testing.assert_close(fresh.train()(x), model.train()(x), atol=0, rtol=0)
    torch.testing.assert_close(fresh(x), plain.eval()(x), atol=ATOL, rtol=RTOL)
