"""A description of the machine and software a run measured, for the results' JSON."""

import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's name, and what tells apart two CPUs that a VM names alike (an AMD EPYC Zen 3 and
    Zen 4 are both "AMD EPYC"): family and model, the vector ISA torch's kernels use, and the L2
    and L3 sizes, e.g. "AMD EPYC (family 25 model 1, AVX2, L2 512K, L3 32768K)"."""
    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    details.append(torch.backends.cpu.get_cpu_capability())
    details += [f"L{level} {size}" for level, size in data_cache_sizes() if level >= 2]
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name} ({', '.join(details)})"


def data_cache_sizes() -> list:
    """(level, size) of the first CPU's data and unified caches, as Linux reports them."""
    caches = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() != "Instruction":
                caches.append((int((index / "level").read_text()), (index / "size").read_text().strip()))
        except (OSError, ValueError):
            continue
    return sorted(caches)


def git_commit() -> str:
    """The commit of the checkout, "+dirty" when it has changes (the kernels measured may then
    differ from the commit's); "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def load_average() -> list:
    """The 1, 5 and 15 minute load averages: on a shared machine, how busy it was."""
    return [round(load, 2) for load in os.getloadavg()]


def describe(device: str) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        # glibc's allocator settings decide whether a fresh output costs page faults (see scripts/bench.sh).
        "malloc_env": {name: value for name, value in os.environ.items() if name.startswith("MALLOC_")},
        "device": device,
    }
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
