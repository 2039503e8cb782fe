"""``python -m fastbn ptx``: compile every GPU kernel with the real NVVM compiler, no GPU needed.

For each compute capability asked for, each input dtype the dispatcher can
launch (float16, float32, float64) and each kernel of the CUDA backend, the
kernel is compiled to PTX with exactly the argument types the backend launches
it with (:func:`fastbn.backends.cuda.plan.signatures`), then assembled to machine code by
ptxas, which reports registers, spills and shared memory.  One line is
printed per kernel, dtype and compute capability, naming the toolkit that
compiled it.

Two toolkits share the work:

* **CUDA 13** (``numba-cuda[cu13]``) compiles every compute capability it
  targets (7.5 and up), in the worker processes of this command, and
  assembles with the ptxas inside nvJitLink.
* **CUDA 12** (the ``nvidia-cuda-nvcc-cu12`` wheel, which ``fastbn[ptx-cu12]``
  installs on Linux) compiles those that CUDA 13 dropped, Volta's cc 7.0 among them,
  one child interpreter per compute capability so that its libNVVM never
  meets CUDA 13's, and assembles with its own ``ptxas`` executable; see
  :mod:`fastbn.tools.cuda12`.

Compiling the kernel table and reading ptxas's report, which both do, live
in :mod:`fastbn.tools.nvvm`.

A compute capability that neither installed toolkit targets (any below 7.5
when the CUDA 12 wheel is missing) is reported as ``unsupported`` on every
line, with the reason and what to install; it is not a compilation failure
unless ``--strict`` is given.  The exit status is non-zero if any
compilation or assembly fails, or if nothing at all could be compiled.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import multiprocessing
import os
import sys
import time

from fastbn.tools import cuda12
from fastbn.tools.nvvm import compile_kernels, kernel_names, parse_cc, resource_report

#: What to install for this command, as its error messages say.
INSTALL = "pip install 'fastbn[cuda]'"


def assemble(ptx, cc):
    """Assemble ``ptx`` for ``sm_XY`` with nvJitLink's ptxas; return its resource report.

    Returns
    -------
    dict or None
        :func:`fastbn.tools.nvvm.resource_report`'s; None when nvJitLink is
        not installed.

    Raises
    ------
    RuntimeError
        If ptxas rejects the PTX, with its error log.
    """
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        return None
    options = [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"]
    handle = nvjitlink.create(len(options), options)
    try:
        data = ptx.encode()
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "fastbn")
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(f"ptxas: {exc}: {log.decode(errors='replace').strip()}") from None
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    return resource_report(log.decode(errors="replace"))


def _span(ccs):
    """``"cc 7.5 to 12.1"`` for an ascending list of compute capabilities."""
    return f"cc {ccs[0][0]}.{ccs[0][1]} to {ccs[-1][0]}.{ccs[-1][1]}"


def compile_cc(cc):
    """Compile every kernel for every dtype on compute capability ``cc``, with the toolkit that targets it.

    The CUDA 13 toolkit of numba-cuda compiles in this process; a compute
    capability it does not target goes to CUDA 12's compiler in a process
    of its own (:mod:`fastbn.tools.cuda12`), when that is installed and
    targets it.

    Returns
    -------
    list of tuple
        ``(kernel, dtype name, status, detail, seconds, toolkit)`` with status
        ``ok``, ``unsupported`` or ``FAILED``; for ``ok`` the detail is the
        resource report (or None), otherwise a one-line reason.
    """
    from fastbn.backends.cuda import target

    cc = tuple(cc)
    supported = target.supported_ccs()
    primary = f"CUDA {target.toolkit_version()}"
    if supported is None or cc in supported:
        return compile_kernels(cc, assemble, primary)
    kernels = kernel_names()
    fallback, missing = cuda12.locate()
    if fallback is not None and cc in fallback.ccs:
        start = time.perf_counter()
        try:
            return cuda12.compile_in_subprocess(cc)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            seconds = time.perf_counter() - start
            return [(kernel, dtype, "FAILED", reason, seconds, fallback.name) for kernel, dtype in kernels]
    reason = f"not a target of this toolkit ({primary}: {_span(supported)})"
    if fallback is None:
        reason += f"; {missing}"
    else:
        reason += f", nor of {fallback.name} ({_span(fallback.ccs)})"
    return [(kernel, dtype, "unsupported", reason, 0.0, primary) for kernel, dtype in kernels]


def format_line(cc, kernel, dtype, status, detail, seconds, toolkit):
    """One output line: kernel, dtype, compute capability, status, toolkit, then resources or reason."""
    head = f"{kernel:<24} {dtype:<8} cc {cc[0]}.{cc[1]:<3} {status:<11} {toolkit:<9}"
    if status != "ok":
        return f"{head} {detail}"
    if detail is None:
        return f"{head} registers n/a (nvJitLink not installed)  {seconds:5.2f} s"
    return (
        f"{head} registers {detail['registers']:3d}  spills {detail['spill_stores']}/{detail['spill_loads']} B "
        f"(stores/loads)  smem {detail['shared']:5d} B  {seconds:5.2f} s"
    )


def _toolkits_line(ccs):
    """The header line: which compiler takes which compute capabilities."""
    from fastbn.backends.cuda import target

    supported = target.supported_ccs()
    line = (
        f"fastbn GPU kernels on {target.NAME}, no GPU used: CUDA {target.toolkit_version()} NVVM and ptxas (nvJitLink)"
    )
    if supported is None:
        return line
    line += f" for {_span(supported)}"
    if all(cc in supported for cc in ccs):
        return line
    fallback, missing = cuda12.locate()
    if fallback is None:
        return f"{line}; no CUDA 12 compiler for the others: {missing}"
    return (
        f"{line}; {fallback.name} NVVM and ptxas ({cuda12.DISTRIBUTION}, in a process of their own) "
        f"for the others ({fallback.name} targets {_span(fallback.ccs)})"
    )


def main(ccs, *, strict=False, jobs=None, out=None):
    """Compile for each compute capability in ``ccs`` (strings like "8.0"); return the exit status."""
    out = out or sys.stdout
    try:
        ccs = [parse_cc(cc) for cc in ccs]
    except ValueError as exc:
        print(exc, file=out)
        return 2
    # Without numba-cuda, ``from numba import cuda`` still succeeds: it finds
    # the deprecated CUDA target that Numba itself ships, on which fastbn's
    # kernels do not compile.  So ask for numba-cuda by name first.
    if importlib.util.find_spec("numba_cuda") is None:
        print(f"ptx: numba-cuda is not installed, and this command compiles with its NVVM; {INSTALL}", file=out)
        return 2
    try:
        from fastbn.backends.cuda import target
    except ImportError as exc:
        print(f"ptx: no CUDA target could be imported ({exc}); {INSTALL}", file=out)
        return 2
    if target.SIMULATOR:
        print("ptx: NUMBA_ENABLE_CUDASIM=1 selects the CUDA simulator, which cannot compile PTX; unset it", file=out)
        return 2
    print(_toolkits_line(ccs), file=out)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(ccs)))
    start = time.perf_counter()
    if jobs == 1:
        per_cc = [compile_cc(cc) for cc in ccs]
    else:
        # One process per compute capability: compilation is single-threaded
        # Python and NVVM.  "spawn" keeps the workers free of the parent's state.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            per_cc = list(pool.map(compile_cc, ccs))
    counts = {"ok": 0, "unsupported": 0, "FAILED": 0}
    for cc, results in zip(ccs, per_cc):
        for result in results:
            counts[result[2]] += 1
            print(format_line(cc, *result), file=out)
    total = sum(counts.values())
    print(
        f"{total} kernel x dtype x cc: {counts['ok']} compiled, {counts['unsupported']} unsupported by the "
        f"installed toolkits, {counts['FAILED']} failed ({time.perf_counter() - start:.1f} s)",
        file=out,
    )
    if counts["FAILED"] or counts["ok"] == 0 or (strict and counts["unsupported"]):
        return 1
    return 0


def add_parser(commands):
    """Add the ``ptx`` subcommand to ``python -m fastbn``'s subparsers."""
    parser = commands.add_parser("ptx", help="compile every GPU kernel to PTX and SASS with NVVM (no GPU needed)")
    parser.add_argument(
        "--cc",
        nargs="+",
        default=["7.5", "8.0", "9.0"],
        metavar="X.Y",
        help="compute capabilities (default: 7.5 8.0 9.0)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="also fail on a compute capability that no installed toolkit targets"
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel processes (default: CPUs, at most one per cc)")
    return parser


def run(args):
    """Entry point for ``python -m fastbn ptx``'s parsed arguments."""
    return main(args.cc, strict=args.strict, jobs=args.jobs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
