"""Interleaved timing with torch.utils.benchmark, for a shared, noisy machine.

Each repeat times every callable once, one short ``blocked_autorange`` block each, in an order
rotated from repeat to repeat; a callable's time is the median over the repeats. A burst of load
from another process then lands on all the callables alike instead of on one of them.
"""

import time
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.utils import benchmark


def interleaved_times(functions: Dict[str, Callable], repeats: int, block_time: float, num_threads: int) -> Dict[str, List[float]]:
    """Seconds per call of each function, one median per repeat."""
    timers = {
        name: benchmark.Timer(stmt="function()", globals={"function": function}, num_threads=num_threads)
        for name, function in functions.items()
    }
    names = list(timers)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timers[name].blocked_autorange(min_run_time=block_time).median)
    return times


def timed_call(function: Callable[[], Any], device: str) -> Tuple[float, Any]:
    """(seconds, result) of one call of ``function``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
