"""``python -m fastbn bench``: fastbn against its peers and the machine's memory roofline.

Batch norm is memory-bound, so its floor is the time its bytes take through
DRAM.  This module times every (operation, shape, dtype) of a matrix in one
run, side by side with

* its peers, wherever installed (absent ones are listed as absent): a
  straightforward NumPy implementation, PyTorch on the CPU, JAX (``jax.jit``
  of the textbook formula), Flax's ``BatchNorm`` and TensorFlow's fused batch
  norm (see :mod:`fastbn.tools.peers`); the report's headline is fastbn's
  speed-up over the fastest of them on each row;
* the memory roofline: the fewest bytes the operation must move (see
  :func:`fastbn.tools.cases.minimal_passes`) at the best copy bandwidth this
  machine reaches in the same run (:mod:`fastbn.tools.roofline`: the fastest
  of a one-thread ``np.copyto``, an all-core copy with ordinary stores and
  one with non-temporal stores, beyond the last-level cache and at the
  tensor's own size), so that no figure can exceed 100% of it;

and writes a Markdown report, a README-ready snippet, the raw numbers as JSON
and PNG charts (matplotlib, optional; see :mod:`fastbn.tools.report`).  It
also sweeps tensor size (2 KB to beyond the last-level cache: fastbn's and
each peer's training forward, and forward plus backward) and thread count
(1 and 2).  The default shapes include one per layout of four last-level
caches or more (:func:`fastbn.tools.cases.default_shapes`).

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

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fastbn.tools import cases, report
from fastbn.tools import charts as chart_files
from fastbn.tools.cases import Row, SweepRow

# The bar the report checks each row against (issue 17; medians, 2-core machine): fastbn's speed-up over
# the fastest peer on the row, by dtype, and its fraction of the roofline on tensors beyond the cache.
BAR_PEER = {"float32": 3.0, "float16": 2.0, "bfloat16": 2.0}
BAR_ROOFLINE = 0.80

# Size sweep: (N, 64) float32 from 2 KB, N growing 4x a step until the tensor is 4 LLCs or more.
SWEEP_CHANNELS = 64
SWEEP_FIRST_ROWS = 8


# ------------------------------------------------------------- the run ---
class _Progress:
    """tqdm when installed, else a plain counter on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None  # a tqdm bar
        self._done = 0
        self._total = total
        self._enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str = "") -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(label[:40])
            self._bar.update(1)
        elif self._enabled:
            print(f"[{self._done}/{self._total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def measure_roofline(repeats: int, rounds: int, nbytes: int | None = None) -> dict[str, Any]:
    """The beyond-cache copies and read of :mod:`fastbn.tools.roofline`: ``{"bytes", "gb_s", "best", "best_gb_s"}``.

    ``nbytes`` overrides :func:`fastbn.tools.roofline.copy_bytes` (8 LLCs,
    at least 256 MiB), e.g. to keep a smoke test short.
    """
    from fastbn.backends.cpu.machine import machine, memory_bytes
    from fastbn.tools import roofline

    nbytes, bandwidths = roofline.measure_beyond_cache(
        machine(), memory_bytes(), repeats, rounds, cases.time_interleaved, nbytes=nbytes
    )
    best, best_bw = roofline.best_copy(bandwidths)
    gc.collect()
    return {
        "bytes": nbytes,
        "gb_s": {name: value / 1e9 for name, value in bandwidths.items()},
        "best": best,
        "best_gb_s": best_bw / 1e9,
    }


def _peer_error(case: cases.Case, data: cases.Inputs, value: Any) -> float | None:
    """A peer's main output against the float64 oracle (forward outputs only; None otherwise)."""
    from fastbn.tools import peers

    if case.operation not in ("forward_train", "forward_eval"):
        return None
    oracle = types.SimpleNamespace(
        shape=data.shape,
        **{
            name: getattr(data, name).astype(np.float64)
            for name in ("x", "dy", "weight", "bias", "running_mean", "running_var")
        },
    )
    expected = _every_operation("numpy", case.operation, oracle)()
    if isinstance(value, (tuple, list)):
        value = value[0]
    if hasattr(value, "detach"):  # a torch tensor, its channels moved to dim 1 (cases._torch_callable)
        import torch

        value = torch.movedim(value.detach(), 1, case.shape.channel_axis).contiguous().numpy()
    return peers.check(np.asarray(value), expected, case.shape.dims)


def run_matrix(
    matrix: Iterable[cases.Case],
    libraries: Sequence[str],
    repeats: int,
    rounds: int,
    progress: _Progress,
    roof: dict[str, Any],
) -> list[Row]:
    """Time every case; returns a list of result dicts (one per case).

    The roofline's copies and read (:func:`fastbn.tools.roofline.functions`)
    are timed in the same interleaved rounds as each case's implementations,
    on the case's tensor, so that they see the same machine load.  Once every
    case is timed, each row is bounded by the best copy of the whole run
    beyond the cache (``roof``'s measurement and every case whose tensor does
    not fit in cache), or by its own copies when faster (:func:`finish_rows`).
    """
    from fastbn.backends.cpu.machine import machine
    from fastbn.tools import roofline

    facts = machine()
    results: list[Row] = []
    by_input: dict[tuple[cases.Shape, str], list[cases.Case]] = {}
    for case in matrix:
        by_input.setdefault((case.shape, case.dtype), []).append(case)
    cache_bytes = facts.core_cache_bytes
    for (shape, dtype), group in by_input.items():
        data = cases.Inputs(shape, dtype)

        # data bound as a default: the loop deletes it after its last use
        def copy_existing(data: cases.Inputs = data) -> None:
            np.copyto(data.copy_target, data.x)

        def copy_fresh(data: cases.Inputs = data) -> npt.NDArray[Any]:
            # Like every batch-norm call, writes (and returns) a newly
            # allocated array: the OS zeroes each page on its first touch.
            target = np.empty_like(data.x)
            np.copyto(target, data.x)
            return target

        copies, _ = cases.time_interleaved({"copy": copy_existing, "copy_fresh": copy_fresh}, repeats, rounds)
        page_in = max(0.0, copies["copy_fresh"] - copies["copy"])
        roofline.verify(data.x, data.copy_target)
        copy_calls = {f"copy: {name}": call for name, call in roofline.functions(data.x, data.copy_target).items()}
        in_cache = roofline.fits_in_cache(data.nbytes, facts)
        for case in group:
            functions: dict[str, cases.Timed] = {}
            for name in libraries:
                made = cases.LIBRARIES[name](case.operation, data)
                if made is not None:
                    functions[name] = made
            error = cases.check_case(case, data, functions["fastbn"]())
            peer_errors: dict[str, float] = {}
            for name in functions:
                if name != "fastbn":
                    found = _peer_error(case, data, functions[name]())
                    if found is not None:
                        peer_errors[name] = found
            reused = cases.reused_output_callable(case.operation, data)
            if reused is not None:
                functions["reused"] = reused
            functions.update(copy_calls)
            times, samples = cases.time_interleaved(functions, repeats, rounds)
            own = roofline.bandwidths(
                {name[len("copy: ") :]: t for name, t in times.items() if name.startswith("copy: ")},
                data.nbytes // 4 * 4,
            )
            row: Row = {
                "operation": case.operation,
                "shape": case.shape.label,
                "dims": list(case.shape.dims),
                "axis": case.shape.axis,
                "dtype": case.dtype,
                "bytes": data.nbytes,
                "layout": "channels-last" if case.shape.channels_last else "channel slab",
                "passes": cases.minimal_passes(case, cache_bytes),
                "in_cache": in_cache,
                "copy_ms": 1e3 * copies["copy"],
                "copy_fresh_ms": 1e3 * copies["copy_fresh"],
                "page_in_ms": 1e3 * page_in,
                "own_gb_s": {name: value / 1e9 for name, value in own.items()},
                "error": error,
                "error_ok": error <= cases.tolerance(case.dtype),
                "peer_errors": peer_errors,
                "samples": len(samples["fastbn"]),
            }
            for name in functions:
                if not name.startswith("copy: "):
                    row[f"{name}_ms"] = 1e3 * times[name]
            results.append(row)
            progress.step(case.label)
            del functions
            gc.collect()
        del data, copy_calls
        gc.collect()
    return finish_rows(results, roof, facts.l3_bytes)


def finish_rows(results: Iterable[Row], roof: dict[str, Any], l3_bytes: int) -> list[Row]:
    """Bound every row by the run's best bandwidth and evaluate the bar; records the run's best in ``roof``.

    The run's best well beyond the cache is, for each kernel, the fastest of
    ``roof``'s beyond-cache measurement and of the copies timed with every
    row whose tensor is at least 4 times the last-level cache (``l3_bytes``:
    smaller tensors may be partly served from cache, which is no limit for a
    larger one).  Every row is bounded by that, or by the copies timed with it
    on its own tensor where those were faster, so that no row can beat its
    bound by what its tensor's size allows.  ``python -m fastbn bench
    --from-json`` applies this again to a saved run's raw figures.
    """
    from fastbn.tools import roofline

    beyond: list[tuple[str, dict[str, float]]] = [
        (f"{roof['bytes'] / 2**20:.0f} MiB beyond the LLC", {k: v * 1e9 for k, v in roof["gb_s"].items()})
    ]
    for row in results:
        if row["bytes"] >= 4 * l3_bytes:
            beyond.append((f"{describe(row)}, with its row", {k: v * 1e9 for k, v in row["own_gb_s"].items()}))
    best, where = roofline.run_best(beyond)
    name, value = roofline.best_copy(best)
    roof["run_best"] = {"kernel": name, "gb_s": value / 1e9, "where": where[name]}
    roof["run_best_gb_s"] = {k: v / 1e9 for k, v in best.items()}
    finished: list[Row] = []
    for row in results:
        own = {k: v * 1e9 for k, v in row["own_gb_s"].items()}
        bandwidth, bandwidth_from = roofline.row_bandwidth(row["operation"], best, own, where="the run's best")
        kernel = bandwidth_from.split(", the run's best")[0]
        if bandwidth_from.endswith("the run's best"):
            bandwidth_from = f"{kernel}, {where[kernel]}"
        roofline_s = row["passes"] * row["bytes"] / bandwidth
        row["roofline_gb_s"] = bandwidth / 1e9
        row["roofline_from"] = bandwidth_from
        row["roofline_ms"] = 1e3 * roofline_s
        row["roofline_alloc_ms"] = row["roofline_ms"] + cases.fresh_outputs(row["operation"]) * row["page_in_ms"]
        finished.append(evaluate_bar(row))
    return finished


def describe(row: Row) -> str:
    """``168x64x56x56 NCHW float32``: a row's tensor, for the report."""
    return f"{cases.describe_shape(row['dims'], row['axis'])} {row['dtype']}"


def evaluate_bar(row: Row) -> Row:
    """Add the issue's bar to a result row: the fastest peer, which checks apply, and whether each passes.

    The peers are every library of :data:`fastbn.tools.cases.PEERS` timed on
    the row.  ``over_roofline`` lists each implementation faster than the
    row's roofline: the roofline is then not a limit, and the report says so.
    """
    fastbn_ms: float = row["fastbn_ms"]
    row["gb_s"] = row["passes"] * row["bytes"] / (fastbn_ms / 1e3) / 1e9
    row["roofline_pct"] = 100 * row["roofline_ms"] / fastbn_ms
    row["roofline_alloc_pct"] = 100 * row["roofline_alloc_ms"] / fastbn_ms
    if "numpy_ms" in row:
        row["vs_numpy"] = row["numpy_ms"] / fastbn_ms
    if "torch_ms" in row:
        row["vs_torch"] = row["torch_ms"] / fastbn_ms
    reused_ms = row.get("reused_ms", fastbn_ms)  # moments allocate no output
    row["reused_roofline_pct"] = 100 * row["roofline_ms"] / reused_ms
    peers: dict[str, float] = {name: row[f"{name}_ms"] for name in cases.PEERS if row.get(f"{name}_ms")}
    checks: dict[str, dict[str, Any]] = {}
    if peers:
        fastest = min(peers, key=peers.__getitem__)
        row["fastest_peer"] = fastest
        row["fastest_peer_ms"] = peers[fastest]
        row["vs_fastest_peer"] = peers[fastest] / fastbn_ms
        need = BAR_PEER.get(row["dtype"], BAR_PEER["float32"])
        checks["peer"] = {
            "need": need,
            "ok": row["vs_fastest_peer"] >= need,
            "ok_reused": peers[fastest] / reused_ms >= need,
        }
    if not row.get("in_cache", False):
        checks["roofline"] = {
            "need": 100 * BAR_ROOFLINE,
            "ok": row["roofline_pct"] >= 100 * BAR_ROOFLINE,
            "ok_with_page_in": row["roofline_alloc_pct"] >= 100 * BAR_ROOFLINE,
            "ok_reused": row["reused_roofline_pct"] >= 100 * BAR_ROOFLINE,
        }
    row["over_roofline"] = {
        name: 100 * row["roofline_ms"] / row[f"{name}_ms"]
        for name in ("fastbn", "reused", *cases.PEERS)
        if row.get(f"{name}_ms") and row[f"{name}_ms"] < row["roofline_ms"]
    }
    row["checks"] = checks
    return row


def sweep_sizes(l3_bytes: int, memory: int | None = None) -> list[int]:
    """The size sweep's row counts: (N, 64) float32 from N = 8 (2 KB), 4x a step, to 4 LLCs or more."""
    sizes: list[int] = []
    rows = SWEEP_FIRST_ROWS
    limit = 4 * l3_bytes if memory is None else min(4 * l3_bytes, memory // 48)
    while True:
        sizes.append(rows)
        if rows * SWEEP_CHANNELS * 4 >= limit:
            return sizes
        rows *= 4


def _every_operation(library: str, operation: str, data: cases.Arrays) -> cases.Timed:
    """``cases.LIBRARIES[library](operation, data)`` for fastbn, NumPy or PyTorch, which have every operation."""
    made = cases.LIBRARIES[library](operation, data)
    if made is None:  # never: only a peer's factory returns None
        raise ValueError(f"{library} has no {operation}")
    return made


def run_size_sweep(libraries: Sequence[str], progress: _Progress, sizes: Iterable[int]) -> list[SweepRow]:
    """Per-call time of a training forward, and of forward plus backward, against size, for fastbn and each peer.

    fastbn's forward is ``fastbn.forward``; its forward plus backward goes
    through ``fastbn.torch.batch_norm`` and torch's autograd, as a PyTorch
    user would call it (skipped without torch).  Small calls are timed many
    times, since they are short and their medians noisier.
    """
    from fastbn.tools import peers

    points: list[SweepRow] = []
    for rows in sizes:
        shape = cases.Shape((rows, SWEEP_CHANNELS), 1)
        data = cases.Inputs(shape, "float32", seed=rows)
        functions: dict[str, cases.Timed] = {}
        for name in libraries:
            if name == "fastbn" and "torch" not in libraries:
                functions["fastbn forward"] = _every_operation("fastbn", "forward_train", data)
                continue
            forward = cases.LIBRARIES[name]("forward_train", data)
            for kind, call in peers.sweep_callables(name, data, forward).items():
                if call is not None:
                    functions[f"{name} {kind}"] = call
        if "torch" in libraries:
            functions["no-op autograd.Function forward+backward"] = peers.autograd_floor(data)
        nbytes = data.nbytes
        repeats, rounds = (30, 3) if nbytes < 1 << 20 else (10, 3) if nbytes < 32 << 20 else (3, 2)
        times, _ = cases.time_interleaved(functions, repeats, rounds, warmup=2)
        points.append({"rows": rows, "bytes": nbytes, **{k: 1e3 * v for k, v in times.items()}})
        progress.step(f"size {nbytes / 1e3:.0f} KB")
        del functions, data
        gc.collect()
    return points


def run_thread_sweep(
    shapes: Iterable[cases.Shape], repeats: int, rounds: int, progress: _Progress, with_torch: bool
) -> list[SweepRow]:
    """fastbn and PyTorch training forward and backward on 1 and 2 threads (float32)."""
    import numba

    default_numba = numba.get_num_threads()
    torch: Any = None  # the torch module, when timed
    if with_torch:
        import torch

        default_torch = torch.get_num_threads()
    rows: list[SweepRow] = []
    try:
        for shape in shapes:
            data = cases.Inputs(shape, "float32")
            row: SweepRow = {"shape": shape.label}
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                if torch is not None:
                    torch.set_num_threads(threads)
                functions: dict[str, cases.Timed] = {}
                for operation in ("forward_train", "backward_train"):
                    functions[f"fastbn {operation}"] = _every_operation("fastbn", operation, data)
                    if torch is not None:
                        functions[f"torch {operation}"] = _every_operation("torch", operation, data)
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


def measure_compile_time() -> dict[str, Any]:
    """First and second call of each operation, float32, in a fresh interpreter with an empty kernel cache."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=1800
        )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    times: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return times


# ------------------------------------------------------------------ CLI ---
def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``python -m fastbn``'s subparsers."""
    parser = commands.add_parser(
        "bench",
        help="benchmark against NumPy, PyTorch, JAX, Flax, TensorFlow and the memory roofline; write a report",
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
        default=None,
        metavar="SHAPE[,SHAPE...]",
        help="shapes as sizes joined by 'x', '@axis' for a channel axis other than 1 "
        f"(default: {','.join(cases.DEFAULT_SHAPES)}, and an NCHW and an NHWC shape of 4 last-level caches or more "
        "where none is that large)",
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
    parser.add_argument(
        "--peers",
        type=cases.comma_list(_parse_peer),
        default=list(cases.PEERS),
        metavar="PEER[,PEER...]",
        help=f"peers to time where installed, from {', '.join(cases.PEERS)} (default: all)",
    )
    parser.add_argument(
        "--copy-mib",
        type=int,
        default=None,
        metavar="MIB",
        help="size of the copies the roofline is measured with beyond the cache (default: 8 last-level caches, "
        "at least 256 MiB)",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if it is installed")
    parser.add_argument("--no-numpy", action="store_true", help="leave the NumPy implementation out")
    parser.add_argument(
        "--no-sweeps", action="store_true", help="skip the size (2 KB to 4 LLCs) and thread-count sweeps"
    )
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


def _libraries(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """``(libraries, peers)``: fastbn and the peers to time; ``peers`` maps every peer to its status text."""
    from fastbn.tools import peers

    wanted = list(args.peers)
    if args.no_torch and "torch" in wanted:
        wanted.remove("torch")
    if args.no_numpy and "numpy" in wanted:
        wanted.remove("numpy")
    libraries = ["fastbn"]
    found: dict[str, str] = {}
    for name in cases.PEERS:
        installed, text = peers.status(name)
        if name not in wanted:
            found[name] = "left out (--peers, --no-torch, --no-numpy)"
        elif not installed:
            found[name] = "absent: " + text
        else:
            found[name] = text
            libraries.append(name)
    return libraries, found


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed ``args`` describe; return a process exit code."""
    if args.rounds < 1:
        print("python -m fastbn bench: error: --rounds: expected a positive integer", file=sys.stderr)
        return 2
    if args.copy_mib is not None and args.copy_mib < 1:
        print("python -m fastbn bench: error: --copy-mib: expected a positive integer", file=sys.stderr)
        return 2
    if args.from_json:
        return rerender(args.from_json, args.out)
    import fastbn
    from fastbn.backends.cpu.machine import machine, memory_bytes

    fastbn.threading_layer()  # before PyTorch or anything else starts threads (see report.machine_info)
    libraries, peer_status = _libraries(args)
    for name, text in peer_status.items():
        if text.startswith("absent"):
            print(f"python -m fastbn bench: {cases.LIBRARY_NAMES[name]} is {text}; listed as absent", file=sys.stderr)
    facts = machine()
    shapes = args.shapes if args.shapes is not None else cases.default_shapes(facts.l3_bytes, memory_bytes())
    matrix = cases.build_cases(args.ops, shapes, args.dtypes)
    if not matrix:
        print(
            "python -m fastbn bench: error: nothing to run (float16 is timed for forward_train only)", file=sys.stderr
        )
        return 2
    command = _command_line(args)
    info = report.machine_info()
    info["peers"] = peer_status
    sizes_rows = sweep_sizes(facts.l3_bytes, memory_bytes())
    steps = 1 + len(matrix) + (0 if args.no_sweeps else len(sizes_rows) + 2 * len(shapes))
    progress = _Progress(steps, not args.no_progress)
    try:
        roof = measure_roofline(args.repeats, args.rounds, None if args.copy_mib is None else args.copy_mib << 20)
        info["roofline"] = roof
        progress.step("roofline copies")
        results = run_matrix(matrix, libraries, args.repeats, args.rounds, progress, roof)
        sizes: list[SweepRow] | None
        threads: list[SweepRow] | None
        sizes = threads = None
        if not args.no_sweeps:
            sizes = run_size_sweep(libraries, progress, sizes_rows)
            threads = run_thread_sweep(shapes, args.repeats, args.rounds, progress, "torch" in libraries)
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


def rerender(json_path: str, out_dir: str) -> int:
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
    # bound the rows by this bench's rule, from the saved raw figures; a results.json of an older bench (no
    # copies timed with its rows) is judged against this bar
    if "roofline" in info and results and all("own_gb_s" in row for row in results):
        results = finish_rows(results, info["roofline"], info.get("l3_bytes", 0) or 1 << 62)
    else:
        results = [evaluate_bar(row) for row in results]
    libraries = report.libraries_of(results)
    sizes, threads = saved.get("sizes"), saved.get("threads")
    os.makedirs(out_dir, exist_ok=True)
    charts = chart_files.write_charts(out_dir, results, libraries, sizes, threads, info)
    report_path, snippet, _ = report.write_report(
        out_dir, info, results, libraries, sizes, threads, saved.get("compile"), command, charts, write_json=False
    )
    print(f"Wrote {report_path}, {snippet}" + "".join(f", {path}" for _, path in charts))
    return 0


def _parse_peer(text: str) -> str:
    """``text`` if it names one of :data:`fastbn.tools.cases.PEERS`; raise ValueError with the choices otherwise."""
    if text not in cases.PEERS:
        raise ValueError(f"unknown peer {text!r}; expected one of {', '.join(cases.PEERS)}")
    return text


def _command_line(args: argparse.Namespace) -> str:
    """The ``python -m fastbn bench`` command that reproduces ``args`` (defaults left out)."""
    words = ["python -m fastbn bench"]
    if list(args.ops) != list(cases.OPERATIONS):
        words.append("--ops " + ",".join(args.ops))
    if args.shapes is not None:
        words.append("--shapes " + ",".join(s.label for s in args.shapes))
    if list(args.peers) != list(cases.PEERS):
        words.append("--peers " + ",".join(args.peers))
    if list(args.dtypes) != list(cases.DTYPES):
        words.append("--dtypes " + ",".join(args.dtypes))
    for name, default in (("repeats", 5), ("rounds", 3)):
        if getattr(args, name) != default:
            words.append(f"--{name} {getattr(args, name)}")
    if args.copy_mib is not None:
        words.append(f"--copy-mib {args.copy_mib}")
    if os.path.normpath(args.out) != os.path.join("bench", "results"):
        words.append(f"--out {args.out}")
    for flag in ("no_torch", "no_numpy", "no_sweeps", "no_compile_time"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    return " ".join(words)
