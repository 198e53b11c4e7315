"""The performance targets of torch_bn, checked against one run's results.

A target whose measurement the run did not include (a mode, dtype, layout, shape or peer left
out, or the training step skipped) is "n/a", neither passed nor failed.
"""

from typing import List, Optional

from .shapes import shape_label

# (mode, layout, dtype, peer, least geometric-mean speedup of torch_bn over the peer)
GEOMEAN_SPEEDUP_TARGETS = (
    ("forward-train", "NCHW", "float32", "torch", 3.0),
    ("forward-train", "NCHW", "float32", "torch.compile", 1.3),
    ("forward-train", "channels_last", "float32", "torch", 1.5),
    ("forward+backward", "NCHW", "float32", "torch", 2.5),
    ("forward+backward", "NCHW", "float32", "torch.compile", 1.3),
    ("forward+backward", "channels_last", "float32", "torch", 1.5),
    ("forward+backward", "NCHW", "bfloat16", "torch", 1.5),
)
# On (batch, 64, 56, 56) NCHW float32: the most a mode may take, in copies of its minimal bytes
# (forward: one copy of x; forward+backward: 2.5 copies).
COPY_SHAPE = (64, 56, 56)
COPY_RATIO_TARGETS = (("forward-train", 1.4), ("forward+backward", 1.5))
TRAIN_STEP_SPEEDUP = 1.15


def checklist(rows: List[dict], summary: List[dict], train_step: Optional[dict]) -> List[dict]:
    ours = [row for row in rows if row["impl"] == "torch_bn"]
    items = []
    for mode, layout, dtype, peer, bound in GEOMEAN_SPEEDUP_TARGETS:
        group = next((s for s in summary if (s["mode"], s["layout"], s["dtype"]) == (mode, layout, dtype)), None)
        value = group["geomean_speedup"].get(peer) if group else None
        items.append(item(f"{mode} {layout} {dtype}: geomean speedup vs {peer}", value, bound, at_least=True))
    eval_rows = [row for row in ours if row["mode"] == "forward-eval"]
    items.append(slowest_item("forward-eval never slower than torch (every shape, dtype, layout)", eval_rows))
    items.append(slowest_item("no shape slower than torch in any mode, dtype, layout", ours))
    for mode, bound in COPY_RATIO_TARGETS:
        row = next(
            (
                r
                for r in ours
                if tuple(r["shape"][1:]) == COPY_SHAPE and (r["mode"], r["layout"], r["dtype"]) == (mode, "NCHW", "float32")
            ),
            None,
        )
        shape = shape_label(row["shape"]) if row else "Bx" + shape_label(COPY_SHAPE)
        items.append(item(f"{mode} {shape} NCHW float32: time / copy time of the same bytes", row["ratio_to_copy"] if row else None, bound, at_least=False))
    speedup = train_step["speedup"] if train_step else None
    items.append(item("end-to-end training step: speedup vs torch.nn BatchNorm", speedup, TRAIN_STEP_SPEEDUP, at_least=True))
    return items


def slowest_item(name: str, rows: List[dict]) -> dict:
    """The least speedup over torch among ``rows`` must be at least 1."""
    slowest = min((row for row in rows if "torch" in row["speedup"]), key=lambda row: row["speedup"]["torch"], default=None)
    if slowest is None:
        return item(name, None, 1.0, at_least=True)
    where = f"{shape_label(slowest['shape'])} {slowest['dtype']} {slowest['layout']} {slowest['mode']}"
    return item(f"{name}; slowest: {where}", slowest["speedup"]["torch"], 1.0, at_least=True)


def item(name: str, value: Optional[float], bound: float, at_least: bool) -> dict:
    if value is None:
        status = "n/a"
    else:
        status = "PASS" if (value >= bound if at_least else value <= bound) else "FAIL"
    return {"target": name, "value": value, "bound": bound, "at_least": at_least, "status": status}


def format_item(entry: dict) -> str:
    relation = ">=" if entry["at_least"] else "<="
    value = "not measured" if entry["value"] is None else f"{entry['value']:.2f}x"
    return f"[{entry['status']:>4}] {entry['target']}: {value} (target {relation} {entry['bound']}x)"
