"""Bad input gets a clear error and changes nothing.

torch.nn bumps num_batches_tracked before some of its checks run, so a rejected call can still
change its state; every rejected torch_bn call must leave running_mean, running_var,
num_batches_tracked, weight and bias exactly as they were.
"""

import re

import pytest
import torch

import torch_bn

# Pairs (input device, device of the misplaced tensor). "meta" stands in for another device on
# machines without a GPU.
DEVICE_PAIRS = [("cpu", "meta")] + ([("cpu", "cuda"), ("cuda", "cpu")] if torch.cuda.is_available() else [])
VALID_SHAPES = {torch_bn.BatchNorm1d: (4, 3, 2), torch_bn.BatchNorm2d: (4, 3, 2, 2), torch_bn.BatchNorm3d: (4, 3, 2, 2, 2)}


def trained_bn2d(channels=3, device="cpu", **kwargs):
    """A BatchNorm2d whose state is not the initial one, so an accidental write would show."""
    bn = torch_bn.BatchNorm2d(channels, **kwargs).to(device)
    bn(torch.randn(4, channels, 3, 3, device=device) * 2 + 1)
    return bn


def snapshot(module):
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def unchanged(after, before):
    """Bit for bit the same tensor; a meta tensor has no values, only its device and shape."""
    if after.device != before.device or after.shape != before.shape:
        return False
    return before.device.type == "meta" or torch.equal(after, before)


def assert_rejected(module, input, error, message):
    """Calling module(input) raises error matching message, and the state stays bit for bit."""
    before = snapshot(module)
    with pytest.raises(error, match=message):
        module(input)
    after = snapshot(module)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert unchanged(after[name], value), f"{name} changed"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "cls, shape, message",
    [
        (torch_bn.BatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
        (torch_bn.BatchNorm1d, (3,), "expected 2D or 3D input (got 1D input)"),
        (torch_bn.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
        (torch_bn.BatchNorm2d, (2, 3, 4, 5, 6), "expected 4D input (got 5D input)"),
        (torch_bn.BatchNorm3d, (2, 3, 4, 5), "expected 5D input (got 4D input)"),
    ],
    ids=str,
)
def test_wrong_rank_uses_torch_wording(cls, shape, message, training):
    bn = cls(3)
    bn(torch.randn(VALID_SHAPES[cls]) * 2 + 1)  # a state that an accidental write would change
    bn.train(training)
    assert_rejected(bn, torch.randn(shape), ValueError, re.escape(message))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine, track_running_stats", [(True, True), (True, False), (False, True)], ids=str)
def test_wrong_channel_count(affine, track_running_stats, training):
    bn = trained_bn2d(affine=affine, track_running_stats=track_running_stats).train(training)
    assert_rejected(bn, torch.randn(2, 4, 3, 3), RuntimeError, "should contain 4 elements")


@pytest.mark.parametrize(
    "cls, shape",
    [(torch_bn.BatchNorm1d, (1, 3)), (torch_bn.BatchNorm1d, (1, 3, 1)), (torch_bn.BatchNorm2d, (1, 3, 1, 1)), (torch_bn.BatchNorm3d, (1, 3, 1, 1, 1))],
    ids=str,
)
def test_one_value_per_channel_in_training(cls, shape):
    bn = cls(3)
    message = f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}"
    assert_rejected(bn, torch.randn(shape), ValueError, re.escape(message))
    # torch.nn raises the same error with the same message.
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(torch.nn, cls.__name__)(3)(torch.randn(shape))


def test_one_value_per_channel_without_running_stats_in_eval():
    # Without running statistics evaluation uses batch statistics, so the same check applies.
    bn = torch_bn.BatchNorm2d(3, track_running_stats=False).eval()
    assert_rejected(bn, torch.randn(1, 3, 1, 1), ValueError, "Expected more than 1 value per channel")


def test_one_value_per_channel_is_fine_in_eval():
    bn = trained_bn2d().eval()
    x = torch.randn(1, 3, 1, 1)
    expected = torch.nn.BatchNorm2d(3).eval()
    expected.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), expected(x), rtol=1e-5, atol=1e-5)


def test_one_value_per_channel_in_functional_training():
    running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
    before = (running_mean.clone(), running_var.clone())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch_bn.batch_norm(torch.randn(1, 3), running_mean, running_var, training=True)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_non_floating_input(dtype, training):
    bn = trained_bn2d().train(training)
    assert_rejected(bn, torch.randint(0, 2, (2, 3, 3, 3)).to(dtype), RuntimeError, "floating")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("length", [2, 4])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_per_channel_tensor_of_wrong_length(name, length, training):
    bn = trained_bn2d().train(training)
    replacement = torch.rand(length) + 0.5
    if name in ("weight", "bias"):
        setattr(bn, name, torch.nn.Parameter(replacement))
    else:
        setattr(bn, name, replacement)
    assert_rejected(bn, torch.randn(2, 3, 3, 3), RuntimeError, f"{name} should contain 3 elements")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("device, other", DEVICE_PAIRS, ids=str)
def test_per_channel_tensor_on_another_device(device, other, name, training):
    bn = trained_bn2d(device=device).train(training)
    misplaced = getattr(bn, name).detach().to(other)
    if name in ("weight", "bias"):
        setattr(bn, name, torch.nn.Parameter(misplaced))
    else:
        setattr(bn, name, misplaced)
    assert_rejected(bn, torch.randn(2, 3, 3, 3, device=device), RuntimeError, f"{name}.*{other}|{other}.*{name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("cls", [torch_bn.BatchNorm2d, torch_bn.BatchNormAct2d], ids=lambda c: c.__name__)
def test_per_channel_tensor_not_floating(cls, name, training):
    bn = cls(3)
    bn(torch.randn(4, 3, 3, 3) * 2 + 1)  # a state that an accidental write would change
    bn.train(training)
    integral = torch.arange(1, 4)
    if name in ("weight", "bias"):
        setattr(bn, name, torch.nn.Parameter(integral, requires_grad=False))
    else:
        setattr(bn, name, integral)
    assert_rejected(bn, torch.randn(2, 3, 3, 3), RuntimeError, f"{name} must be floating point")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fake_kernels_reject_what_the_kernels_reject(device):
    """A meta input runs the ops' fake kernels (as torch.compile's tracing does): they raise the
    CPU kernels' errors, so a traced graph does not accept what eager rejects."""
    x = torch.randn(2, 3, 3, 3, device=device)
    floats, integers = torch.ones(3, device=device), torch.ones(3, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="weight must be floating point"):
        torch_bn.ops.forward_train(x, integers, floats, 1e-5)
    with pytest.raises(RuntimeError, match="running_var must be floating point"):
        torch_bn.ops.forward_eval(x, floats, floats, floats, integers, 1e-5)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_not_positive_in_training(eps):
    bn = trained_bn2d()
    bn.eps = eps
    # A ValueError, as torch.nn.functional.batch_norm raises.
    assert_rejected(bn, torch.randn(2, 3, 3, 3), ValueError, "eps must be positive")


def test_eps_zero_is_allowed_in_eval():
    ours = trained_bn2d().eval()
    ours.eps = 0.0
    ref = torch.nn.BatchNorm2d(3, eps=0.0).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(running_mean=torch.zeros(4)), "running_mean should contain 3 elements"),
        (dict(running_var=torch.ones(2)), "running_var should contain 3 elements"),
        (dict(weight=torch.ones(4)), "weight should contain 3 elements"),
        (dict(bias=torch.zeros(4)), "bias should contain 3 elements"),
        (dict(eps=0.0), "eps must be positive"),
        (dict(input=torch.randn(2, 3, dtype=torch.float64).to(torch.int64)), "floating"),
        (dict(running_mean=torch.zeros(3, device="meta")), "running_mean.*meta|meta.*running_mean"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
def test_functional_rejects_and_leaves_running_stats(bad, message):
    args = dict(input=torch.randn(5, 3), running_mean=torch.randn(3), running_var=torch.rand(3) + 0.5, weight=torch.rand(3) + 0.5, bias=torch.randn(3), eps=1e-5)
    args.update(bad)
    before = {name: t.clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises((RuntimeError, ValueError), match=message):
        torch_bn.batch_norm(training=True, momentum=0.1, **args)
    for name, value in before.items():
        assert unchanged(args[name], value), f"{name} changed"


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_one_running_statistic_missing_in_training(missing):
    """torch.nn's ValueError: with one of the two, training would normalize with batch statistics
    and update neither."""
    bn = trained_bn2d()
    setattr(bn, missing, None)
    assert_rejected(bn, torch.randn(2, 3, 3, 3), ValueError, "must either both be None or neither be None")
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3))
    args[missing] = None
    kept = next(t for t in args.values() if t is not None)
    before = kept.clone()
    with pytest.raises(ValueError, match="must either both be None or neither be None"):
        torch_bn.batch_norm(torch.randn(2, 3, 3, 3), training=True, **args)
    assert torch.equal(kept, before)


def test_functional_momentum_none_is_a_type_error():
    """torch.nn.functional.batch_norm's TypeError: only the modules read momentum=None as a
    cumulative average, over their num_batches_tracked."""
    running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
    before = [running_mean.clone(), running_var.clone()]
    with pytest.raises(TypeError, match="momentum"):
        torch_bn.batch_norm(torch.randn(4, 3), running_mean, running_var, training=True, momentum=None)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


def test_update_running_stats_checks_before_writing():
    running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
    num_batches_tracked = torch.tensor(7)
    before = [t.clone() for t in (running_mean, running_var, num_batches_tracked)]
    mean, invstd = torch.randn(3), torch.rand(4) + 0.5  # invstd has one value too many
    with pytest.raises(RuntimeError, match="invstd should contain 3 elements"):
        torch_bn.ops.update_running_stats(running_mean, running_var, num_batches_tracked, mean, invstd, 0.1, 1e-5, 10, True)
    for value, old in zip((running_mean, running_var, num_batches_tracked), before):
        assert torch.equal(value, old)
