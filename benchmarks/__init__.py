"""Benchmarks of torch_bn against torch.nn.BatchNorm2d (eager and torch.compile'd).

Run from the repository root: ``python -m benchmarks.bench`` (see README, "Benchmarks").
"""
