"""``python -m fastbn precompile``: fill the CPU kernels' disk cache ahead of the first call.

A kernel is compiled on its first call for each signature (dtype, layout,
which optional inputs are given, ordinary or non-temporal stores), a few
seconds each, and cached on disk (Numba's cache: ``NUMBA_CACHE_DIR``, else
``__pycache__`` beside fastbn's sources, else ``~/.cache/numba``).  This
command makes those calls ahead of time: the public functions on tiny
inputs, for every chosen combination of dtype, layout, operation and fused
form, each under every plan a real call can take (fused and streamed, with
ordinary and non-temporal stores; ``_plan`` forces them), so exactly the
kernels that real calls use are compiled.  The work is split into units that
share no kernel (per dtype and kernel layout: statistics and forward with
the fused plan, with the streamed plan, backward with each), run in
``--jobs`` processes.  A second run loads everything from the cache.

What was compiled and loaded is counted from the ``fastbn.compile`` log
(:mod:`fastbn.backends.cpu.jit`).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

DTYPES = ("float32", "float16", "bfloat16", "float64")
#: Layout name: (shape, channel axis, kernel layout).  Layouts of one kernel layout share every kernel.
LAYOUTS = {
    "nchw": ((2, 3, 4, 4), 1, "slab"),
    "ncl": ((2, 3, 16), 1, "slab"),
    "ncdhw": ((2, 3, 2, 2, 4), 1, "slab"),
    "nhwc": ((2, 4, 4, 3), 3, "rows"),
    "ndhwc": ((2, 2, 2, 4, 3), 4, "rows"),
    "nc": ((32, 3), 1, "rows"),
}
#: ``forward`` and ``backward`` are training mode; ``eval`` is forward in eval mode, ``backward-eval`` its gradient.
OPS = ("forward", "eval", "backward", "backward-eval", "moments", "normalize")
#: The fused forms of forward/eval (residual add, ReLU) and of backward (the ReLU's mask, the residual's gradient).
FUSED = ("none", "relu", "add", "add_relu")
DEFAULTS = {"dtypes": ("float32",), "layouts": ("nchw", "nhwc"), "ops": OPS, "fused": ("none",)}
# The units of work: each compiles kernels that no other unit of the same dtype and kernel layout uses.
# "small": the one-thread kernels that plain calls on inputs below a core's share of cache take
# (fastbn.backends.cpu.small): forward with and without the running statistics' update, eval, backward.
UNITS = ("forward-fused", "forward-streamed", "backward-fused", "backward-streamed", "small")


class _Running(TypedDict, total=False):
    """The running statistics, as keyword arguments of :func:`fastbn.forward`."""

    running_mean: npt.NDArray[Any]
    running_var: npt.NDArray[Any]


def _choice(value: str, allowed: Sequence[str], option: str) -> tuple[str, ...]:
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if names == ["all"]:
        return tuple(allowed)
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"{option}: expected a comma-separated list of {', '.join(allowed)} (or 'all'), got {value!r}")
    return tuple(dict.fromkeys(names))


def units(
    dtypes: Collection[str], layouts: Collection[str], ops: Collection[str], fused: Collection[str]
) -> list[tuple[str, str, str]]:
    """The work units ``(dtype, layout, unit)``: one layout per kernel layout, units that the ops need."""
    chosen: dict[str, str] = {}
    for layout in layouts:
        chosen.setdefault(LAYOUTS[layout][2], layout)  # nchw, ncl and ncdhw compile the same kernels
    needs = {
        "forward-fused": {"forward", "moments"},
        "forward-streamed": {"forward", "eval", "moments", "normalize"},
        "backward-fused": {"backward"},
        "backward-streamed": {"backward", "backward-eval"},
        "small": {"forward", "eval", "backward"},
    }
    work: list[tuple[str, str, str]] = []
    for kernel_layout, layout in sorted(chosen.items(), key=lambda item: item[0] == "rows"):  # SLAB's are longer
        for unit in UNITS:
            for dtype in dtypes:
                if needs[unit] & set(ops) and not (kernel_layout == "rows" and unit.endswith("-fused")):
                    work.append((dtype, layout, unit))
    return work


def _dtype(name: str) -> np.dtype[Any]:
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    return np.dtype(name)


def _calls(dtype_name: str, layout: str, unit: str, ops: Collection[str], fused: Collection[str]) -> None:
    """Make the public calls of one unit (compiling what they need)."""
    import numpy as np

    import fastbn

    shape, axis, kernel_layout = LAYOUTS[layout]
    dtype = _dtype(dtype_name)
    stats: type[np.floating[Any]] = np.float64 if dtype_name == "float64" else np.float32
    channels = shape[axis]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    weight, bias = np.ones(channels, stats), np.zeros(channels, stats)
    if unit == "small":  # no plan: the unit's name carries no strategy
        _small_calls(x, weight, bias, axis, stats, ops)
        return
    strategy: dict[str, str] = {} if kernel_layout == "rows" else {"strategy": unit.split("-")[1]}
    # Forward's forms differ in kernels only by the residual (an input; the ReLU is a constant), backward's by
    # the ReLU (forward's output, the mask, is an input) and the residual (its gradient is an output).
    forward_forms = {"add" in form: "relu" in form for form in fused}.items()
    backward_forms = sorted({("relu" in form, "add" in form) for form in fused})
    for nontemporal in (False, True):
        plan = dict(strategy, nontemporal=nontemporal)
        if unit.startswith("forward"):
            for residual, relu in forward_forms:
                z = x if residual else None
                activation: Literal["relu"] | None = "relu" if relu else None
                if "forward" in ops:
                    running: _Running = {}
                    if unit == "forward-streamed":  # the running statistics' update: this unit's
                        running = {"running_mean": np.zeros(channels, stats), "running_var": np.ones(channels, stats)}
                    fastbn.forward(x, weight, bias, axis=axis, residual=z, activation=activation, _plan=plan, **running)
                if "eval" in ops and unit == "forward-streamed":
                    fastbn.forward(
                        x,
                        weight,
                        bias,
                        running_mean=np.zeros(channels, stats),
                        running_var=np.ones(channels, stats),
                        training=False,
                        axis=axis,
                        residual=z,
                        activation=activation,
                        _plan=plan,
                    )
            if "normalize" in ops and unit == "forward-streamed":
                fastbn.normalize(
                    x, np.zeros(channels, stats), np.ones(channels, stats), weight, bias, axis=axis, _plan=plan
                )
        else:
            modes = (
                [True]
                if unit == "backward-fused"
                else [mode for mode, op in ((True, "backward"), (False, "backward-eval")) if op in ops]
            )
            for batch_stats in modes:
                for relu, residual in backward_forms:
                    saved = fastbn.Saved(
                        np.zeros(channels, stats),
                        np.ones(channels, stats),
                        batch_stats,
                        x.size // channels,
                        shape,
                        axis,
                        activation="relu" if relu else None,
                        residual=residual,
                    )
                    fastbn.backward(x, x, weight, saved, axis=axis, y=x if relu else None, _plan=plan)
    if "moments" in ops and unit.startswith("forward"):
        fastbn.moments(x, axis, _plan=strategy or None)


def _small_calls(
    x: npt.NDArray[Any],
    weight: npt.NDArray[Any],
    bias: npt.NDArray[Any],
    axis: int,
    stats: type[np.floating[Any]],
    ops: Collection[str],
) -> None:
    """The plain calls that take the one-thread kernels (no plan, no fused form)."""
    import numpy as np

    import fastbn

    channels = x.shape[axis]
    running: _Running = {"running_mean": np.zeros(channels, stats), "running_var": np.ones(channels, stats)}
    if "forward" in ops or "backward" in ops:
        fastbn.forward(x, weight, bias, axis=axis)
        _y, saved = fastbn.forward(x, weight, bias, axis=axis, **running)
        if "backward" in ops:
            fastbn.backward(x, x, weight, saved, axis=axis)
    if "eval" in ops:
        fastbn.forward(x, weight, bias, axis=axis, training=False, **running)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "fastbn_event", None)
        if event is not None:
            fields = vars(record)  # the log call's extra= fields (fastbn.backends.cpu.jit)
            self.records.append(
                {
                    "event": event,
                    "kernel": fields["fastbn_kernel"],
                    "signature": fields["fastbn_signature"],
                    "seconds": getattr(record, "fastbn_seconds", 0.0),
                    "cache": getattr(record, "fastbn_cache", None),
                }
            )


def _work(
    unit: tuple[str, str, str], ops: Collection[str], fused: Collection[str], verbose: bool
) -> tuple[list[dict[str, Any]], str | None]:
    """Run one unit in this (worker) process; return its compile and load records, or an error."""
    log = logging.getLogger("fastbn.compile")
    if not any(isinstance(handler, _Collect) for handler in log.handlers):
        log.addHandler(_Collect())
        log.setLevel(logging.DEBUG)
        if verbose:
            echo = logging.StreamHandler(sys.stderr)
            echo.setLevel(logging.INFO)
            echo.setFormatter(logging.Formatter(f"[{os.getpid()}] %(message)s"))
            log.addHandler(echo)
    collect = next(handler for handler in log.handlers if isinstance(handler, _Collect))
    collect.records = []
    try:
        _calls(*unit, ops, fused)
    except Exception as exc:
        return collect.records, f"{type(exc).__name__}: {exc}"
    return collect.records, None


def _default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def precompile(
    dtypes: Collection[str] = DEFAULTS["dtypes"],
    layouts: Collection[str] = DEFAULTS["layouts"],
    ops: Collection[str] = DEFAULTS["ops"],
    fused: Collection[str] = DEFAULTS["fused"],
    jobs: int | None = None,
    verbose: bool = False,
    out: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Compile (or load) every kernel of the chosen combinations; return a summary dict.

    The summary has ``compiled`` and ``loaded`` (sorted lists of ``kernel signature`` strings, each
    once), ``compile_seconds`` (summed over processes), ``seconds`` (wall), ``units``, ``jobs``,
    ``cache`` (the cache directories written) and ``errors``.
    """
    work = units(dtypes, layouts, ops, fused)
    jobs = max(1, min(jobs or _default_jobs(), len(work) or 1))
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no threads, no compiled kernels
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [(unit, pool.submit(_work, unit, ops, fused, verbose)) for unit in work]
        for unit, future in futures:
            records, error = future.result()
            results += records
            if error:
                errors.append(f"{' '.join(unit)}: {error}")
            if verbose:
                out(f"done: {' '.join(unit)}")
    compiled = {f"{r['kernel']} {r['signature']}" for r in results if r["event"] == "compiled"}
    loaded = {f"{r['kernel']} {r['signature']}" for r in results if r["event"] == "load"} - compiled
    return {
        "compiled": sorted(compiled),
        "loaded": sorted(loaded),
        "compile_seconds": sum(r["seconds"] for r in results if r["event"] == "compiled"),
        "seconds": time.perf_counter() - start,
        "units": len(work),
        "jobs": jobs,
        "cache": sorted({r["cache"] for r in results if r["cache"]}),
        "uncached": sorted({r["kernel"] for r in results if r["event"] == "compiled" and not r["cache"]}),
        "errors": errors,
    }


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``precompile`` subcommand to ``python -m fastbn``'s subparsers."""
    parser = commands.add_parser(
        "precompile",
        help="fill the CPU kernel cache on disk ahead of the first call",
        description=__doc__.split("\n\n")[0]
        + " The defaults (float32; NCHW and NHWC, which also cover NCL, NCDHW, NDHWC and (N, C); every "
        "operation; no fused form) compile the kernels that plain float32 training and inference use, the "
        "one-thread ones of small calls included: 36 compilations, about 1 minute in all, 31 s with 2 processes "
        "on a 2-core Xeon. A second run loads them from the cache in about a second.",
    )
    parser.add_argument(
        "--dtypes",
        default=",".join(DEFAULTS["dtypes"]),
        help=f"comma-separated, of {', '.join(DTYPES)} or 'all' (default %(default)s)",
    )
    parser.add_argument(
        "--layouts",
        default=",".join(DEFAULTS["layouts"]),
        help=f"comma-separated, of {', '.join(LAYOUTS)} or 'all' (default %(default)s; "
        "nchw, ncl and ncdhw compile the same kernels, as do nhwc, ndhwc and nc)",
    )
    parser.add_argument(
        "--ops",
        default=",".join(DEFAULTS["ops"]),
        help=f"comma-separated, of {', '.join(OPS)} or 'all' (default: all; forward and backward "
        "are training mode, eval is forward in eval mode)",
    )
    parser.add_argument(
        "--fused",
        default=",".join(DEFAULTS["fused"]),
        help=f"forward's fused forms, comma-separated, of {', '.join(FUSED)} or 'all' (default "
        "%(default)s: plain batch norm; relu is activation='relu', add a residual)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help=f"worker processes (default: the CPUs available, {_default_jobs()} here)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each kernel as it is compiled")
    return parser


def run(args: argparse.Namespace) -> int:
    """Precompile the chosen kernels and print a summary; return a process exit code."""
    try:
        dtypes = _choice(args.dtypes, DTYPES, "--dtypes")
        layouts = _choice(args.layouts, tuple(LAYOUTS), "--layouts")
        ops = _choice(args.ops, OPS, "--ops")
        fused = _choice(args.fused, FUSED, "--fused")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError("--jobs: expected a positive integer")
    except ValueError as exc:
        print(f"python -m fastbn precompile: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"precompiling {', '.join(dtypes)} x {', '.join(layouts)} x {', '.join(ops)} x fused {', '.join(fused)}",
        flush=True,
    )
    summary = precompile(dtypes, layouts, ops, fused, args.jobs, args.verbose)
    print(
        f"{len(summary['compiled'])} kernels compiled ({summary['compile_seconds']:.1f} s of compilation), "
        f"{len(summary['loaded'])} loaded from the cache, in {summary['seconds']:.1f} s "
        f"({summary['units']} units of work on {summary['jobs']} processes)"
    )
    for path in summary["cache"]:
        print(f"cache: {path}")
    if summary["uncached"]:
        print(
            f"warning: {len(summary['uncached'])} kernels could not be cached (no writable cache directory; "
            "set NUMBA_CACHE_DIR): precompiling does not help later processes"
        )
    for error in summary["errors"]:
        print(f"error: {error}", file=sys.stderr)
    return 1 if summary["errors"] or summary["uncached"] else 0
