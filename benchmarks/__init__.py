"""Benchmarks of torch_bn against torch.nn.BatchNorm2d (eager and torch.compile'd).

Run ``python benchmarks/bench.py`` (see README, "Benchmarks").
"""
