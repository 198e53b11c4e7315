"""Presenting one run: the printed table and summary, and the JSON, CSV and PNG files."""

import csv
import json
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from .cases import IMPLS, MODES, PEERS  # noqa: E402
from .shapes import shape_label  # noqa: E402

TABLE_COLUMNS = (
    ("shape", 18),
    ("dtype", 9),
    ("layout", 13),
    ("mode", 16),
    *((f"{impl} ms", 16) for impl in IMPLS),
    ("copy ms", 9),
    ("GB/s", 7),
    ("x copy", 7),
    *((f"vs {peer}", 16) for peer in PEERS),
)


def table(rows: List[dict]) -> str:
    """One line per (shape, dtype, layout, mode): every impl's median time, then torch_bn's
    effective bandwidth, its ratio to a copy of the same bytes and its speedup over each peer."""
    lines = [format_line(name for name, _ in TABLE_COLUMNS)]
    for key, by_impl in grouped(rows).items():
        ours = by_impl["torch_bn"]
        cells = [shape_label(ours["shape"]), *key[1:]]
        cells += [f"{by_impl[impl]['ms']:.3f}" if impl in by_impl else "-" for impl in IMPLS]
        cells += [f"{ours['copy_ms']:.3f}", f"{ours['gb_per_s']:.1f}", f"{ours['ratio_to_copy']:.2f}"]
        cells += [f"{ours['speedup'][peer]:.2f}x" if peer in ours["speedup"] else "-" for peer in PEERS]
        lines.append(format_line(cells))
    return "\n".join(lines)


def grouped(rows: List[dict]) -> Dict[tuple, Dict[str, dict]]:
    """Rows keyed by (shape, dtype, layout, mode), then by impl, in run order."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        key = (tuple(row["shape"]), row["dtype"], row["layout"], row["mode"])
        groups.setdefault(key, {})[row["impl"]] = row
    return groups


def format_line(cells) -> str:
    return " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, TABLE_COLUMNS))


def summary_text(summary: List[dict]) -> str:
    lines = ["geometric means over the shapes (torch_bn's speedup; min = slowest shape; x copy = torch_bn time / copy time of the same bytes)"]
    for group in summary:
        speedups = ", ".join(
            f"vs {peer} {group['geomean_speedup'][peer]:.2f}x (min {group['min_speedup'][peer]:.2f}x)" for peer in group["geomean_speedup"]
        )
        lines.append(
            f"  {group['dtype']:>8} {group['layout']:>13} {group['mode']:>16}: {speedups}; "
            f"x copy {group['geomean_ratio_to_copy']['torch_bn']:.2f}"
        )
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n")


def write_csv(path: Path, rows: List[dict]) -> None:
    fields = ["shape", "layers", "dtype", "layout", "mode", "impl", "ms", "copy_ms", "gb_per_s", "ratio_to_copy"]
    fields += [f"speedup_vs_{impl}" for impl in IMPLS]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fields)
        writer.writeheader()
        for row in rows:
            flat = {field: row[field] for field in fields if field in row}
            flat["shape"] = shape_label(row["shape"])
            flat.update({f"speedup_vs_{impl}": value for impl, value in row["speedup"].items()})
            writer.writerow(flat)


def write_plot(path: Path, rows: List[dict], title: str) -> None:
    """A grid of bar charts, one per (mode, dtype/layout): torch_bn's speedup over each peer,
    per shape, on a log scale with the break-even line at 1."""
    ours = [row for row in rows if row["impl"] == "torch_bn"]
    modes = [mode for mode in MODES if any(row["mode"] == mode for row in ours)]
    configs = list(dict.fromkeys((row["dtype"], row["layout"]) for row in ours))
    shapes = list(dict.fromkeys(shape_label(row["shape"]) for row in ours))
    cell_width = max(3.2, 0.8 + 0.5 * len(shapes))
    figure, axes = plt.subplots(
        len(modes), len(configs), figsize=(cell_width * len(configs), 0.8 + 2.8 * len(modes)), squeeze=False, sharey=True
    )
    times_format = ticker.FuncFormatter(lambda value, _: f"{value:g}x")
    width = 0.8 / len(PEERS)
    for i, mode in enumerate(modes):
        for j, (dtype, layout) in enumerate(configs):
            axis = axes[i][j]
            cell = {shape_label(r["shape"]): r for r in ours if (r["mode"], r["dtype"], r["layout"]) == (mode, dtype, layout)}
            for k, peer in enumerate(PEERS):
                positions = [index + (k - (len(PEERS) - 1) / 2) * width for index in range(len(shapes))]
                values = [cell[s]["speedup"].get(peer, float("nan")) if s in cell else float("nan") for s in shapes]
                axis.bar(positions, values, width, label=f"vs {peer}")
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_yscale("log")
            axis.yaxis.set_major_locator(ticker.LogLocator(base=2))  # ... 0.5x, 1x, 2x, 4x ...
            axis.yaxis.set_major_formatter(times_format)
            axis.yaxis.set_minor_formatter(ticker.NullFormatter())
            axis.tick_params(axis="y", which="both", labelsize=7)
            axis.set_title(f"{mode}\n{dtype}, {layout}", fontsize=8)
            axis.set_xticks(range(len(shapes)))
            axis.set_xticklabels([s.split("x", 1)[1] for s in shapes], rotation=90, fontsize=7)
        axes[i][0].set_ylabel("torch_bn speedup")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
