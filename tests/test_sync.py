"""torch_bn.SyncBatchNorm over two gloo processes on the loopback interface must compute what one
process running torch.nn.BatchNorm on the concatenated batch computes: outputs, input gradients,
weight and bias gradients summed over the processes (what DDP's all-reduce does), running
statistics. The processes run once per module (forked: a spawned child would spend seconds
importing torch) and every case is checked here, in the pytest process.
"""

import datetime
import socket
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_bn

WORLD_SIZE = 2
TIMEOUT_S = 60
# Float32 results against torch.nn's float32 results.
ATOL, RTOL = 1e-5, 1e-5


@dataclass(frozen=True)
class Case:
    name: str
    batch_sizes: Tuple[int, ...]  # one per rank
    sample_shape: Tuple[int, ...]  # (C, ...)
    momentum: Optional[float] = 0.1


CASES = [
    Case("unequal_batches_2d", (3, 5), (3, 4, 4)),
    Case("empty_rank_2d_cumulative", (4, 0), (3, 4, 4), momentum=None),
    Case("one_value_per_rank_1d", (1, 1), (5,)),
    Case("unequal_batches_3d", (2, 3), (2, 3, 2, 2)),
]
ONE_VALUE_OVERALL = Case("one_value_overall", (1, 0), (2,))


def draw(case: Case, generator: torch.Generator) -> dict:
    """The global batch, upstream gradient and affine parameters of a case (offset from zero so
    that a wrong mean shows)."""
    total = sum(case.batch_sizes)
    channels = case.sample_shape[0]
    return {
        "x": torch.randn(total, *case.sample_shape, generator=generator) * 2 + 3,
        "dy": torch.randn(total, *case.sample_shape, generator=generator),
        "weight": torch.rand(channels, generator=generator) + 0.5,
        "bias": torch.randn(channels, generator=generator),
    }


def rank_slice(case: Case, rank: int) -> slice:
    start = sum(case.batch_sizes[:rank])
    return slice(start, start + case.batch_sizes[rank])


def train_step(layer: torch.nn.Module, data: dict, rows: slice) -> dict:
    """One training forward and backward on rows of the batch; what the test compares."""
    with torch.no_grad():
        layer.weight.copy_(data["weight"])
        layer.bias.copy_(data["bias"])
    x = data["x"][rows].clone().requires_grad_()
    y = layer(x)
    (y * data["dy"][rows]).sum().backward()
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": layer.weight.grad,
        "dbias": layer.bias.grad,
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "num_batches_tracked": layer.num_batches_tracked.item(),
    }


def reference_layer(case: Case) -> torch.nn.Module:
    layer_class = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    return layer_class[len(case.sample_shape) + 1](case.sample_shape[0], momentum=case.momentum)


def conv_net() -> torch.nn.Module:
    """The same initial weights in every process."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def ddp_step(rank: int, data: dict) -> dict:
    """One DDP training step of conv_net with torch_bn.SyncBatchNorm, on CPU."""
    net = torch_bn.convert_sync_batchnorm(conv_net())
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    rows = rank_slice(CASES[0], rank)
    y = ddp(data["x"][rows])
    (y * data["dy"][rows][:, :1]).sum().backward()
    return {"y": y.detach(), "mean_conv_grad": net[0].weight.grad}


def worker(rank: int, port: int, datasets: dict, out_dir: str) -> None:
    # The parent may have run OpenMP regions: a forked child must not use OpenMP's thread pool.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 2),
    )
    try:
        results = {}
        for case in CASES:
            layer = torch_bn.SyncBatchNorm(case.sample_shape[0], momentum=case.momentum)
            results[case.name] = train_step(layer, datasets[case.name], rank_slice(case, rank))

        layer = torch_bn.SyncBatchNorm(ONE_VALUE_OVERALL.sample_shape[0])
        x = datasets[ONE_VALUE_OVERALL.name]["x"][rank_slice(ONE_VALUE_OVERALL, rank)]
        try:
            layer(x)
            results["one_value_error"] = None
        except ValueError as error:
            results["one_value_error"] = str(error)
        results["one_value_untouched"] = layer.num_batches_tracked.item() == 0 and bool(
            (layer.running_var == 1).all()
        )

        # Every rank creates every group (torch.distributed's rule); each uses its own.
        groups = [dist.new_group([r]) for r in range(WORLD_SIZE)]
        case = CASES[0]
        layer = torch_bn.SyncBatchNorm(case.sample_shape[0], process_group=groups[rank])
        results["own_group"] = train_step(layer, datasets[case.name], rank_slice(case, rank))
        results["ddp"] = ddp_step(rank, datasets[case.name])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def datasets():
    generator = torch.Generator().manual_seed(0)
    return {case.name: draw(case, generator) for case in CASES + [ONE_VALUE_OVERALL]}


@pytest.fixture(scope="module")
def rank_results(datasets, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("GLOO_SOCKET_IFNAME", "lo")
    # DDP imports torch._dynamo on construction (seconds); imported here once, the forked
    # processes inherit it instead of importing it side by side.
    import torch._dynamo  # noqa: F401
    out_dir = tmp_path_factory.mktemp("sync")
    context = mp.start_processes(
        worker, args=(free_port(), datasets, str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="fork"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} processes did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_one_process_on_the_concatenated_batch(case, datasets, rank_results):
    expected = train_step(reference_layer(case), datasets[case.name], slice(None))
    per_rank = [results[case.name] for results in rank_results]
    assert_close(torch.cat([r["y"] for r in per_rank]), expected["y"])
    assert_close(torch.cat([r["dx"] for r in per_rank]), expected["dx"])
    assert_close(sum(r["dweight"] for r in per_rank), expected["dweight"])
    assert_close(sum(r["dbias"] for r in per_rank), expected["dbias"])
    for r in per_rank:
        assert_close(r["running_mean"], expected["running_mean"])
        assert_close(r["running_var"], expected["running_var"])
        assert r["num_batches_tracked"] == expected["num_batches_tracked"] == 1


def test_one_value_per_channel_over_the_group_is_rejected_on_every_rank(rank_results):
    for results in rank_results:
        assert "Expected more than 1 value per channel when training" in results["one_value_error"]
        assert results["one_value_untouched"]


def test_a_group_of_one_process_is_a_plain_layer(datasets, rank_results):
    case = CASES[0]
    for rank, results in enumerate(rank_results):
        expected = train_step(reference_layer(case), datasets[case.name], rank_slice(case, rank))
        for key, value in expected.items():
            assert_close(results["own_group"][key], value)


def test_ddp_on_cpu_matches_one_process(datasets, rank_results):
    data = datasets[CASES[0].name]
    net = conv_net()
    y = net(data["x"])
    (y * data["dy"][:, :1]).sum().backward()
    assert_close(torch.cat([results["ddp"]["y"] for results in rank_results]), y.detach())
    for results in rank_results:
        # DDP averages the processes' gradients; the one-process loss is their sum.
        assert_close(results["ddp"]["mean_conv_grad"] * WORLD_SIZE, net[0].weight.grad)


def test_outside_torch_distributed_it_is_a_plain_layer(datasets):
    case = CASES[0]
    assert not dist.is_initialized()
    actual = train_step(torch_bn.SyncBatchNorm(case.sample_shape[0]), datasets[case.name], slice(None))
    expected = train_step(reference_layer(case), datasets[case.name], slice(None))
    for key, value in expected.items():
        assert_close(actual[key], value)


def test_convert_sync_batchnorm_builds_torch_bn_layers_in_place():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Sequential(torch_bn.BatchNorm1d(4)), torch.nn.SyncBatchNorm(5))
    weight = model[0].weight
    group = object()  # stands for a process group: conversion only stores it
    assert torch_bn.convert_sync_batchnorm(model, group) is model
    layers = [model[0], model[1][0], model[2]]
    assert all(type(layer) is torch_bn.SyncBatchNorm and layer.process_group is group for layer in layers)
    assert model[0].weight is weight
    # torch.nn's inherited classmethod would build torch.nn layers.
    converted = torch_bn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert type(converted) is torch_bn.SyncBatchNorm and converted.process_group is None
