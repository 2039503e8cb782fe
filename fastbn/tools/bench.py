"""``python -m fastbn bench``: fastbn against NumPy, PyTorch and the memory roofline.

Batch norm is memory-bound, so its floor is the time its bytes take through
DRAM.  This module times every (operation, shape, dtype) of a matrix in one
run, side by side with

* a straightforward NumPy implementation (whole-array reductions);
* PyTorch on the CPU: ``torch.nn.functional.batch_norm`` and its autograd
  backward, ``torch.var_mean`` for the moments (optional: skipped when torch
  is not installed);
* the memory roofline: the fewest bytes the operation must move (see
  :func:`fastbn.tools.cases.minimal_passes`) at the bandwidth of ``np.copyto`` on the same
  tensor, measured in the same run;

and writes a Markdown report, a README-ready snippet, the raw numbers as JSON
and PNG charts (matplotlib, optional; see :mod:`fastbn.tools.report`).  It
also sweeps tensor size (1 MB to 400 MB) and thread count (1 and 2).

Every figure is a median over several timed calls made after warm-up calls,
so compilation never counts; compile time is measured on its own, in a fresh
interpreter with an empty kernel cache.  What is timed (the cases, their
inputs and the table of implementations, :data:`fastbn.tools.cases.LIBRARIES`)
lives in :mod:`fastbn.tools.cases`, which the pytest-benchmark suite in
``bench/`` reads too.

Nothing here is imported by ``import fastbn``; NumPy is the only import at
module level, so ``python -m fastbn --help`` stays instant.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from fastbn.tools import cases, report
from fastbn.tools import charts as chart_files

# The bar the report checks each row against (medians, 2-core machine).
BAR_TORCH = 2.0
BAR_SLAB_FORWARD = 3.5
BAR_SLAB_BACKWARD = 2.5
BAR_ROOFLINE = 0.60
BAR_ROOFLINE_MIN_BYTES = 48 * cases.MB

# Size sweep: (80, C, 56, 56) float32 is 1.0 MB per channel, so C is the size in MB.
SWEEP_CHANNELS = (1, 2, 5, 10, 25, 50, 100, 200, 400)
SWEEP_OPERATIONS = ("forward_train", "backward_train", "moments")


# ------------------------------------------------------------- the run ---
class _Progress:
    """tqdm when installed, else a plain counter on stderr."""

    def __init__(self, total, enabled):
        self._bar = None
        self._done = 0
        self._total = total
        self._enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label=""):
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(label[:40])
            self._bar.update(1)
        elif self._enabled:
            print(f"[{self._done}/{self._total}] {label}", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def run_matrix(matrix, libraries, repeats, rounds, progress):
    """Time every case; returns a list of result dicts (one per case)."""
    from fastbn.backends.cpu.machine import machine

    results = []
    by_input = {}
    for case in matrix:
        by_input.setdefault((case.shape, case.dtype), []).append(case)
    cache_bytes = machine().core_cache_bytes
    for (shape, dtype), group in by_input.items():
        data = cases.Inputs(shape, dtype)

        # data bound as a default: the loop deletes it after its last use
        def copy_existing(data=data):
            np.copyto(data.copy_target, data.x)

        def copy_fresh(data=data):
            # Like every batch-norm call, writes (and returns) a newly
            # allocated array: the OS zeroes each page on its first touch.
            target = np.empty_like(data.x)
            np.copyto(target, data.x)
            return target

        copies, _ = cases.time_interleaved({"copy": copy_existing, "copy_fresh": copy_fresh}, repeats, rounds)
        page_in = max(0.0, copies["copy_fresh"] - copies["copy"])
        bandwidth = 2 * data.nbytes / copies["copy"]
        for case in group:
            functions = {name: cases.LIBRARIES[name](case.operation, data) for name in libraries}
            error = cases.check_case(case, data, functions["fastbn"]())
            reused = cases.reused_output_callable(case.operation, data)
            if reused is not None:
                functions["reused"] = reused
            times, samples = cases.time_interleaved(functions, repeats, rounds)
            passes = cases.minimal_passes(case, cache_bytes)
            roofline = passes * data.nbytes / bandwidth
            roofline_alloc = roofline + cases.fresh_outputs(case.operation) * page_in
            row = {
                "operation": case.operation,
                "shape": case.shape.label,
                "dims": list(case.shape.dims),
                "axis": case.shape.axis,
                "dtype": case.dtype,
                "bytes": data.nbytes,
                "layout": "channels-last" if case.shape.channels_last else "channel slab",
                "passes": passes,
                "copy_ms": 1e3 * copies["copy"],
                "copy_fresh_ms": 1e3 * copies["copy_fresh"],
                "page_in_ms": 1e3 * page_in,
                "roofline_ms": 1e3 * roofline,
                "roofline_alloc_ms": 1e3 * roofline_alloc,
                "error": error,
                "error_ok": error <= cases.tolerance(case.dtype),
                "samples": len(samples["fastbn"]),
            }
            for name in functions:
                row[f"{name}_ms"] = 1e3 * times[name]
            results.append(evaluate_bar(row))
            progress.step(case.label)
            del functions
            gc.collect()
        del data
        gc.collect()
    return results


def evaluate_bar(row):
    """Add the issue's bar to a result row: which checks apply, and whether each passes."""
    fastbn_ms = row["fastbn_ms"]
    row["gb_s"] = row["passes"] * row["bytes"] / (fastbn_ms / 1e3) / 1e9
    row["roofline_pct"] = 100 * row["roofline_ms"] / fastbn_ms
    row["roofline_alloc_pct"] = 100 * row["roofline_alloc_ms"] / fastbn_ms
    if "numpy_ms" in row:
        row["vs_numpy"] = row["numpy_ms"] / fastbn_ms
    reused_ms = row.get("reused_ms", fastbn_ms)  # moments allocate no output
    row["reused_roofline_pct"] = 100 * row["roofline_ms"] / reused_ms
    checks = {}
    if "torch_ms" in row:
        row["vs_torch"] = row["torch_ms"] / fastbn_ms
        row["vs_torch_reused"] = row["torch_ms"] / reused_ms
        need = BAR_TORCH
        if row["layout"] == "channel slab" and row["operation"] == "forward_train":
            need = BAR_SLAB_FORWARD
        elif row["layout"] == "channel slab" and row["operation"] == "backward_train":
            need = BAR_SLAB_BACKWARD
        checks["torch"] = {"need": need, "ok": row["vs_torch"] >= need, "ok_reused": row["vs_torch_reused"] >= need}
    if row["bytes"] >= BAR_ROOFLINE_MIN_BYTES:
        checks["roofline"] = {
            "need": 100 * BAR_ROOFLINE,
            "ok": row["roofline_pct"] >= 100 * BAR_ROOFLINE,
            "ok_with_page_in": row["roofline_alloc_pct"] >= 100 * BAR_ROOFLINE,
            "ok_reused": row["reused_roofline_pct"] >= 100 * BAR_ROOFLINE,
        }
    row["checks"] = checks
    return row


def run_size_sweep(repeats, progress, with_torch):
    """fastbn (and PyTorch training forward) against tensor size, float32 (80, C, 56, 56)."""
    points = []
    for channels in SWEEP_CHANNELS:
        shape = cases.Shape((80, channels, 56, 56), 1)
        data = cases.Inputs(shape, "float32", seed=channels)
        functions = {op: cases.LIBRARIES["fastbn"](op, data) for op in SWEEP_OPERATIONS}
        functions["copy"] = lambda data=data: np.copyto(data.copy_target, data.x)
        if with_torch:
            functions["torch forward_train"] = cases.LIBRARIES["torch"]("forward_train", data)
        # Fewer calls for the big ones: a 400 MB forward is 0.1 s.
        big = data.nbytes > 100 * cases.MB
        times, _ = cases.time_interleaved(
            functions, max(2, repeats // 2) if big else repeats, 2 if big else 3, warmup=1
        )
        points.append({"channels": channels, "bytes": data.nbytes, **{k: 1e3 * v for k, v in times.items()}})
        progress.step(f"size {data.nbytes / cases.MB:.0f} MB")
        del functions, data
        gc.collect()
    return points


def run_thread_sweep(shapes, repeats, rounds, progress, with_torch):
    """fastbn and PyTorch training forward and backward on 1 and 2 threads (float32)."""
    import numba

    default_numba = numba.get_num_threads()
    torch = None
    if with_torch:
        import torch

        default_torch = torch.get_num_threads()
    rows = []
    try:
        for shape in shapes:
            data = cases.Inputs(shape, "float32")
            row = {"shape": shape.label}
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                if torch is not None:
                    torch.set_num_threads(threads)
                functions = {}
                for operation in ("forward_train", "backward_train"):
                    functions[f"fastbn {operation}"] = cases.LIBRARIES["fastbn"](operation, data)
                    if torch is not None:
                        functions[f"torch {operation}"] = cases.LIBRARIES["torch"](operation, data)
                times, _ = cases.time_interleaved(functions, repeats, rounds)
                for name, seconds in times.items():
                    row[f"{name} @{threads}"] = 1e3 * seconds
                progress.step(f"threads {shape.label} @{threads}")
            rows.append(row)
            del data
            gc.collect()
    finally:
        numba.set_num_threads(default_numba)
        if torch is not None:
            torch.set_num_threads(default_torch)
    return rows


_COMPILE_SCRIPT = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import fastbn
rng = np.random.default_rng(0)
out = {"import": time.perf_counter() - t0}
for label, shape, axis in (("channel slab", (8, 16, 8, 8), 1), ("channels-last", (8, 8, 8, 16), -1)):
    x = rng.standard_normal(shape).astype(np.float32)
    weight = np.ones(shape[axis], np.float32)
    running_mean, running_var = np.zeros_like(weight), np.ones_like(weight)
    calls = {
        "forward_train": lambda: fastbn.forward(x, weight, weight, axis=axis),
        "forward_eval": lambda: fastbn.forward(x, weight, weight, running_mean=running_mean,
                                               running_var=running_var, training=False, axis=axis),
        "backward_train": lambda: fastbn.backward(x, x, weight, fastbn.forward(x, weight, weight, axis=axis)[1],
                                                  axis=axis),
        "moments": lambda: fastbn.moments(x, axis=axis),
    }
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        start = time.perf_counter()
        call()
        out[f"{name} ({label})"] = [first, time.perf_counter() - start]
print(json.dumps(out))
"""


def measure_compile_time():
    """First and second call of each operation, float32, in a fresh interpreter with an empty kernel cache."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=1800
        )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ CLI ---
def add_parser(commands):
    """Add the ``bench`` subcommand to ``python -m fastbn``'s subparsers."""
    parser = commands.add_parser(
        "bench",
        help="benchmark against NumPy, PyTorch and the memory roofline; write a report",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--ops",
        type=cases.comma_list(cases.parse_operation),
        default=list(cases.OPERATIONS),
        metavar="OP[,OP...]",
        help=f"operations to time, from {', '.join(cases.OPERATIONS)} (default: all)",
    )
    parser.add_argument(
        "--shapes",
        type=cases.comma_list(cases.parse_shape),
        default=[cases.parse_shape(s) for s in cases.DEFAULT_SHAPES],
        metavar="SHAPE[,SHAPE...]",
        help="shapes as sizes joined by 'x', '@axis' for a channel axis other than 1 "
        f"(default: {','.join(cases.DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--dtypes",
        type=cases.comma_list(cases.parse_dtype),
        default=list(cases.DTYPES),
        metavar="DTYPE[,DTYPE...]",
        help="float32 for every operation, float16 for training forward (default: both)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round (default 5)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds in which the libraries take turns (default 3); the median is over repeats x rounds calls",
    )
    parser.add_argument(
        "--out",
        default=os.path.join("bench", "results"),
        help="directory for report.md, README_snippet.md, results.json and the charts (default bench/results)",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if it is installed")
    parser.add_argument("--no-numpy", action="store_true", help="leave the NumPy implementation out")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the size (1-400 MB) and thread-count sweeps")
    parser.add_argument(
        "--no-compile-time", action="store_true", help="skip measuring compile time in a fresh interpreter"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--from-json",
        metavar="RESULTS_JSON",
        help="time nothing: re-render report.md, README_snippet.md and the charts into --out from "
        "a results.json an earlier run wrote (its own command, date and machine are kept)",
    )
    return parser


def run(args):
    """Run the benchmark the parsed ``args`` describe; return a process exit code."""
    if args.rounds < 1:
        print("python -m fastbn bench: error: --rounds: expected a positive integer", file=sys.stderr)
        return 2
    if args.from_json:
        return rerender(args.from_json, args.out)
    import fastbn

    fastbn.threading_layer()  # before PyTorch or anything else starts threads (see report.machine_info)
    libraries = ["fastbn"]
    if not args.no_numpy:
        libraries.append("numpy")
    with_torch = not args.no_torch and cases.torch_available()
    if with_torch:
        libraries.append("torch")
    elif not args.no_torch:
        print(
            "python -m fastbn bench: PyTorch is not installed; its columns are left out (pip install 'fastbn[torch]')",
            file=sys.stderr,
        )
    matrix = cases.build_cases(args.ops, args.shapes, args.dtypes)
    if not matrix:
        print(
            "python -m fastbn bench: error: nothing to run (float16 is timed for forward_train only)", file=sys.stderr
        )
        return 2
    command = _command_line(args)
    info = report.machine_info()
    sweep_shapes = list(args.shapes)
    steps = len(matrix) + (0 if args.no_sweeps else len(SWEEP_CHANNELS) + 2 * len(sweep_shapes))
    progress = _Progress(steps, not args.no_progress)
    try:
        results = run_matrix(matrix, libraries, args.repeats, args.rounds, progress)
        sizes = threads = None
        if not args.no_sweeps:
            sizes = run_size_sweep(args.repeats, progress, with_torch)
            threads = run_thread_sweep(sweep_shapes, args.repeats, args.rounds, progress, with_torch)
    finally:
        progress.close()
    compile_times = None if args.no_compile_time else measure_compile_time()
    if hasattr(os, "getloadavg"):
        info["load_after"] = round(os.getloadavg()[0], 2)
    os.makedirs(args.out, exist_ok=True)
    charts = chart_files.write_charts(args.out, results, libraries, sizes, threads, info)
    report_path, snippet, json_path = report.write_report(
        args.out, info, results, libraries, sizes, threads, compile_times, command, charts
    )
    print(report.results_table(results, libraries))
    print()
    print(report.bar_summary(results))
    print()
    print(f"Wrote {report_path}, {snippet}, {json_path}" + "".join(f", {path}" for _, path in charts))
    return 0


def rerender(json_path, out_dir):
    """Write report.md, README_snippet.md and the charts into ``out_dir`` from a results.json; return an exit code.

    Nothing is timed: the rows, the sweeps, the machine and the command are the
    JSON's, so the report still says which command measured them, and when.
    """
    try:
        with open(json_path) as f:
            saved = json.load(f)
        results, info, command = saved["results"], saved["machine"], saved["command"]
    except (OSError, ValueError, KeyError) as exc:
        print(
            f"python -m fastbn bench: error: --from-json {json_path}: cannot read a results.json ({exc})",
            file=sys.stderr,
        )
        return 2
    libraries = report.libraries_of(results)
    sizes, threads = saved.get("sizes"), saved.get("threads")
    os.makedirs(out_dir, exist_ok=True)
    charts = chart_files.write_charts(out_dir, results, libraries, sizes, threads, info)
    report_path, snippet, _ = report.write_report(
        out_dir, info, results, libraries, sizes, threads, saved.get("compile"), command, charts, write_json=False
    )
    print(f"Wrote {report_path}, {snippet}" + "".join(f", {path}" for _, path in charts))
    return 0


def _command_line(args):
    """The ``python -m fastbn bench`` command that reproduces ``args`` (defaults left out)."""
    words = ["python -m fastbn bench"]
    if list(args.ops) != list(cases.OPERATIONS):
        words.append("--ops " + ",".join(args.ops))
    if [s.label for s in args.shapes] != list(cases.DEFAULT_SHAPES):
        words.append("--shapes " + ",".join(s.label for s in args.shapes))
    if list(args.dtypes) != list(cases.DTYPES):
        words.append("--dtypes " + ",".join(args.dtypes))
    for name, default in (("repeats", 5), ("rounds", 3)):
        if getattr(args, name) != default:
            words.append(f"--{name} {getattr(args, name)}")
    if os.path.normpath(args.out) != os.path.join("bench", "results"):
        words.append(f"--out {args.out}")
    for flag in ("no_torch", "no_numpy", "no_sweeps", "no_compile_time"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    return " ".join(words)
