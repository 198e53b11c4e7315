"""From measured times to result rows and their geometric-mean summaries."""

import statistics
from typing import Dict, Hashable, List

from .cases import COPY_TRAFFIC, IMPLS, MINIMAL_TRAFFIC, PEERS, Case

COPY = "copy"


def case_rows(case: Case, times: Dict[Hashable, List[float]]) -> List[dict]:
    """One row per (mode, impl) timed on ``case``. ``times`` maps (mode, impl) and COPY to the
    per-repeat seconds; a row's time is their median. A row keeps every round, the copy's too,
    so that other statistics can be computed from a run's results later."""
    copy_seconds = statistics.median(times[COPY])
    copy_rounds_ms = [s * 1e3 for s in times[COPY]]
    median = {key: statistics.median(values) for key, values in times.items() if key != COPY}
    rows = []
    for (mode, impl), seconds in median.items():
        traffic = MINIMAL_TRAFFIC[mode]
        rows.append(
            {
                "shape": list(case.shape),
                "layers": case.layers,
                "dtype": case.dtype,
                "layout": case.layout,
                "mode": mode,
                "impl": impl,
                "ms": seconds * 1e3,
                "repeats_ms": [s * 1e3 for s in times[(mode, impl)]],
                "copy_ms": copy_seconds * 1e3,
                "copy_repeats_ms": copy_rounds_ms,
                "gb_per_s": traffic * case.bytes() / seconds / 1e9,
                # A copy of x moves COPY_TRAFFIC * S; scale it to the mode's minimal traffic.
                "ratio_to_copy": seconds / (copy_seconds * traffic / COPY_TRAFFIC),
                "speedup": {
                    other: median[(mode, other)] / seconds for other in IMPLS if other != impl and (mode, other) in median
                },
            }
        )
    return rows


def summarize(rows: List[dict]) -> List[dict]:
    """Per (dtype, layout, mode), over the shapes: the geometric mean and the minimum of
    torch_bn's speedup over each peer, every impl's geometric-mean ratio to a copy, and every
    impl's total time over ResNet-50's BatchNorm layers (each shape times its layer count)."""
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["dtype"], row["layout"], row["mode"]), []).append(row)
    summary = []
    for (dtype, layout, mode), group in groups.items():
        ours = [row for row in group if row["impl"] == "torch_bn"]
        peers = [peer for peer in PEERS if all(peer in row["speedup"] for row in ours)]
        summary.append(
            {
                "dtype": dtype,
                "layout": layout,
                "mode": mode,
                "shapes": len(ours),
                "geomean_speedup": {peer: statistics.geometric_mean(row["speedup"][peer] for row in ours) for peer in peers},
                "min_speedup": {peer: min(row["speedup"][peer] for row in ours) for peer in peers},
                "geomean_ratio_to_copy": {
                    impl: statistics.geometric_mean(row["ratio_to_copy"] for row in group if row["impl"] == impl)
                    for impl in impls_in(group)
                },
                "resnet50_layers_ms": {
                    impl: sum(row["ms"] * row["layers"] for row in group if row["impl"] == impl) for impl in impls_in(group)
                },
            }
        )
    return summary


def impls_in(rows: List[dict]) -> List[str]:
    return [impl for impl in IMPLS if any(row["impl"] == impl for row in rows)]
