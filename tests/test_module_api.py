"""torch_bn modules are torch.nn modules to everything around them: state_dict, copies,
pickling, torch.save, repr, .to(dtype) and isinstance."""

import copy
import io
import pickle

import pytest
import torch

import torch_bn

CLASSES = [torch_bn.BatchNorm1d, torch_bn.BatchNorm2d, torch_bn.BatchNorm3d]
# By class name, for torch_bn and torch.nn modules alike.
INPUT_SHAPES = {"BatchNorm1d": (6, 4, 3), "BatchNorm2d": (3, 4, 3, 2), "BatchNorm3d": (2, 4, 3, 2, 2)}
CONSTRUCTIONS = [
    dict(),
    dict(eps=1e-3, momentum=0.3),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
]


def torch_nn_class(cls):
    return getattr(torch.nn, cls.__name__)


def used(module):
    """The module after a training step, so that its state is not the initial one."""
    module(torch.randn(INPUT_SHAPES[type(module).__name__]) * 2 + 1)
    return module


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def assert_same_behaviour(a, b):
    """Equal outputs on the same input, in training (updating both) and in evaluation."""
    for training in (True, False):
        a.train(training)
        b.train(training)
        x = torch.randn(INPUT_SHAPES[type(a).__name__]) * 2 + 1
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert_same_state(a, b)


@pytest.mark.parametrize("kwargs", CONSTRUCTIONS, ids=str)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_repr_and_isinstance(cls, kwargs):
    ours = cls(4, **kwargs)
    assert repr(ours) == repr(torch_nn_class(cls)(4, **kwargs))
    assert isinstance(ours, torch_nn_class(cls))
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("kwargs", CONSTRUCTIONS, ids=str)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_state_dict_round_trip_with_torch_nn(cls, kwargs):
    ours = used(cls(4, **kwargs))
    theirs = torch_nn_class(cls)(4, **kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(theirs, ours)

    back = cls(4, **kwargs)
    back.load_state_dict(used(theirs).state_dict(), strict=True)
    assert_same_state(back, theirs)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_deepcopy(cls):
    ours = used(cls(4, momentum=None))
    clone = copy.deepcopy(ours)
    assert type(clone) is cls
    assert clone.running_mean.data_ptr() != ours.running_mean.data_ptr()
    assert_same_behaviour(clone, ours)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_pickle(cls):
    ours = used(cls(4))
    clone = pickle.loads(pickle.dumps(ours))
    assert type(clone) is cls
    assert_same_behaviour(clone, ours)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_torch_save_load(cls):
    ours = used(cls(4, eps=1e-3))
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    assert type(clone) is cls
    assert_same_behaviour(clone, ours)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_to_dtype(dtype):
    ours = used(torch_bn.BatchNorm2d(4)).to(dtype)
    reference = torch.nn.BatchNorm2d(4)
    reference.load_state_dict(ours.state_dict())
    reference.to(dtype)
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == reference.state_dict()[name].dtype, name
    assert ours.weight.dtype == dtype and ours.num_batches_tracked.dtype == torch.int64
    x = (torch.randn(3, 4, 3, 2) * 2 + 1).to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    # Both compute in float32 (float64 for float64) and round to dtype; torch may round
    # intermediates to dtype too, hence a few units in the last place.
    tolerance = {torch.float64: 1e-10, torch.float16: 8e-3, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(y, reference(x), rtol=tolerance, atol=tolerance)
