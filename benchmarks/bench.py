"""Benchmarks torch_bn against torch.nn.BatchNorm2d, eager and torch.compile'd, on the BatchNorm
input shapes of ResNet-50, plus an end-to-end training step:

    python benchmarks/bench.py          # every shape, float32 and bfloat16, NCHW and channels_last
    python benchmarks/bench.py --quick  # one shape, float32, in under a minute

Runs on the CPU, and on CUDA too when present (``--device``). Prints a table, a summary and the
targets' PASS/FAIL checklist, and writes bench.json, bench.csv and bench.png into ``--out``.

Timing: for each case (shape, dtype, layout) every (mode, impl) and a copy of x are timed in
rounds, each a short ``torch.utils.benchmark`` block, the order rotating from round to round; a
time is the median over the rounds. torch.compile compiles one static graph per case and mode
(``dynamic=False``: with ``dynamic=True`` it still recompiled for every channel count, the
parameters' shapes being static, and its kernels ran up to several times slower); compiling and
warming up happen before any timing, and the compile time is reported apart.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import List, Tuple

import torch
from tqdm import tqdm

if __name__ == "__main__" and not __package__:
    # Run as a script: import this folder as the package "benchmarks", with the repository root
    # after site-packages so that the installed torch_bn (with its compiled _C) is the one found.
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import machine, report, targets, train_step
from .cases import DTYPES, IMPLS, LAYOUTS, MODES, Case, implementation, mode_functions, reference_batch_norm
from .metrics import COPY, case_rows, summarize
from .shapes import parse_chw, resnet50_shapes, shape_label
from .timing import interleaved_times, synchronize

RESULTS = Path(__file__).resolve().parent / "results"
FULL = {
    "shapes": None,
    "dtypes": list(DTYPES),
    "layouts": list(LAYOUTS),
    "repeats": 5,
    "block_time": 0.05,
    "train_steps": 8,
    "out": str(RESULTS / "{device}"),
}
# Its own folder, so that a quick look does not overwrite a full run's results.
QUICK = {
    "shapes": [(64, 56, 56)],
    "dtypes": ["float32"],
    "layouts": list(LAYOUTS),
    "repeats": 3,
    "block_time": 0.02,
    "train_steps": 2,
    "out": str(RESULTS / "{device}-quick"),
}


def at_least(lowest: float, kind: type = int):
    """An argparse type: a number of ``kind`` of at least ``lowest``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < lowest:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} >= {lowest}, got {text!r}")
        return value

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a short run; presets {QUICK}")
    parser.add_argument("--batch", type=at_least(1), default=32, help="batch size of every shape (default 32)")
    parser.add_argument("--shapes", nargs="+", type=parse_chw, metavar="CxHxW", help="default: ResNet-50's 12 BatchNorm shapes")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all", help="all: the CPU, and CUDA when present")
    parser.add_argument("--repeats", type=at_least(1), help="timing rounds per case; times are medians over them")
    parser.add_argument("--block-time", type=at_least(1e-6, float), help="seconds of one timing block")
    parser.add_argument("--warmup", type=at_least(0), default=3, help="untimed calls of each function before timing")
    parser.add_argument("--train-steps", type=at_least(0), help="timed steps of the end-to-end benchmark; 0 skips it")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(), help="torch's CPU threads")
    parser.add_argument("--out", help=f"results folder, {{device}} replaced; default {FULL['out']} ({QUICK['out']} with --quick)")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if len(devices_of(args)) > 1 and "{device}" not in args.out:
        parser.error("--out needs {device} in it when several devices run")
    # Created here, before a run of minutes, so that a bad folder fails now, not when results are written.
    for device in devices_of(args):
        try:
            out = out_folder(args, device)
            out.mkdir(parents=True, exist_ok=True)
        except (KeyError, IndexError, ValueError, OSError) as error:
            parser.error(f"--out {args.out!r}: {type(error).__name__}: {error}")
    return args


def out_folder(args: argparse.Namespace, device: str) -> Path:
    return Path(args.out.format(device=device))


def cases_of(args: argparse.Namespace) -> List[Case]:
    layers = dict(resnet50_shapes(args.batch))
    shapes = list(layers) if args.shapes is None else [(args.batch, *chw) for chw in args.shapes]
    return [Case(shape, layers.get(shape, 0), dtype, layout) for shape in shapes for dtype in args.dtypes for layout in args.layouts]


def measure_case(case: Case, device: str, args: argparse.Namespace) -> Tuple[List[dict], float]:
    """The case's rows, and the seconds torch.compile took to compile and warm up."""
    # A fresh graph cache per case: past its recompile limit dynamo would fall back to eager.
    torch._dynamo.reset()
    x, dy = case.random_tensor(device), case.random_tensor(device)
    reference = reference_batch_norm(case, device)
    functions = {COPY: x.clone}
    compile_seconds = 0.0
    for impl in impls_of(args):
        start = time.perf_counter()
        train_layer, eval_layer = implementation(impl, reference, training=True), implementation(impl, reference, training=False)
        by_mode = mode_functions(train_layer, eval_layer, x, dy)
        for mode in args.modes:
            functions[(mode, impl)] = by_mode[mode]
            for _ in range(args.warmup):
                by_mode[mode]()
        synchronize(device)
        if impl == "torch.compile":
            compile_seconds = time.perf_counter() - start
    load = machine.load_average()[0]
    times = interleaved_times(functions, args.repeats, args.block_time, args.threads)
    rows = case_rows(case, times)
    for row in rows:
        row["load_average"] = load  # as the case started; this benchmark's own threads add about 2
    return rows, compile_seconds


def devices_of(args: argparse.Namespace) -> List[str]:
    if args.device == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [args.device]


def impls_of(args: argparse.Namespace) -> List[str]:
    return [impl for impl in IMPLS if not (args.no_compile and impl == "torch.compile")]


def run_device(device: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    about = machine.describe(device)
    cases = cases_of(args)
    rows: List[dict] = []
    compile_seconds = []
    progress = tqdm(cases, desc=device, unit="case", file=sys.stderr, dynamic_ncols=True)
    for case in progress:
        progress.set_postfix_str(f"{shape_label(case.shape)} {case.dtype} {case.layout}")
        case_result, seconds = measure_case(case, device, args)
        rows += case_result
        compile_seconds.append(seconds)
    progress.close()
    train = None
    if args.train_steps:
        print(f"end-to-end training step on {device} ...", file=sys.stderr)
        train = train_step.run(args.batch, args.train_steps, device=device)
    summary = summarize(rows)
    about["load_average_at_end"] = machine.load_average()
    return {
        "machine": about,
        "options": {**vars(args), "impls": impls_of(args)},
        "compile": {
            "mode": "torch.compile(module, dynamic=False): one static graph per case; compiling and warm-up are not timed",
            "seconds_total": sum(compile_seconds),
            "seconds_max": max(compile_seconds, default=0.0),
        },
        "run_seconds": time.perf_counter() - start,
        "rows": rows,
        "summary": summary,
        "train_step": train,
        "checklist": targets.checklist(rows, summary, train),
    }


def present(results: dict, out: Path) -> None:
    about, options = results["machine"], results["options"]
    hardware = about.get("device_name", about["cpu"])
    print(f"\n{hardware} ({about['device']}), torch {about['torch']}, {options['threads']} threads, batch {options['batch']}")
    print(report.table(results["rows"]))
    print()
    print(report.summary_text(results["summary"]))
    if results["train_step"]:
        print("\n" + train_step.describe(results["train_step"]))
    print(f"\ntargets ({about['device']}):")
    print("\n".join(targets.format_item(entry) for entry in results["checklist"]))
    compile_info = results["compile"]
    print(
        f"\nrun took {results['run_seconds']:.0f} s, of which torch.compile {compile_info['seconds_total']:.0f} s "
        f"({compile_info['mode']}); load average {about['load_average']} at start, {about['load_average_at_end']} at end"
    )
    report.write_json(out / "bench.json", results)
    report.write_csv(out / "bench.csv", results["rows"])
    title = f"torch_bn vs torch.nn.BatchNorm2d, {hardware}, batch {options['batch']}, torch {about['torch']}"
    report.write_plot(out / "bench.png", results["rows"], title)
    print(f"wrote {out}/bench.json, bench.csv, bench.png")


def main(argv=None) -> int:
    """Exit status 1 where the training step's losses disagree (the results are written first)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    status = 0
    for device in devices_of(args):
        torch.manual_seed(0)
        results = run_device(device, args)
        present(results, out_folder(args, device))
        if results["train_step"] and not results["train_step"]["losses_agree"]:
            print(f"error: the training step's losses disagree on {device}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
