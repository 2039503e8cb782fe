"""``python -m fastbn ptx``: compile every GPU kernel with the real NVVM compiler, no GPU needed.

For each compute capability asked for, each input dtype the dispatcher can
launch (float16, float32, float64) and each kernel of the CUDA backend, the
kernel is compiled to PTX with exactly the argument types the backend launches
it with (:func:`fastbn.backends.cuda.plan.signatures`), then assembled to machine code by
ptxas, which reports registers, spills and shared memory.  One line is
printed per kernel, dtype and compute capability, naming the toolkit that
compiled it, and ending with the instructions per element of the kernel's
innermost loops, counted in its PTX and, where ``nvdisasm`` is installed, in
its SASS (:mod:`fastbn.tools.loops` says how).  ``--table FILE`` also writes
these figures as a Markdown table: docs/ptx_baseline.md is one, the baseline
that changes to the kernels are measured against.

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
import datetime
import functools
import importlib.util
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from fastbn.tools import cuda12, loops
from fastbn.tools.nvvm import compile_kernels, kernel_names, parse_cc, resource_report

if TYPE_CHECKING:
    import argparse

    from fastbn.tools.nvvm import Result

#: What to install for this command, as its error messages say.
INSTALL = "pip install 'fastbn[cuda]'"


def assemble(ptx: str, cc: Sequence[int]) -> tuple[dict[str, int] | None, bytes | None]:
    """Assemble ``ptx`` for ``sm_XY`` with nvJitLink's ptxas; return its resource report and the cubin.

    Returns
    -------
    (dict or None, bytes or None)
        :func:`fastbn.tools.nvvm.resource_report`'s, and the machine code
        (for the SASS loop count); both None when nvJitLink is not installed.

    Raises
    ------
    RuntimeError
        If ptxas rejects the PTX, with its error log.
    """
    try:  # cuda-bindings has no annotations: its module is read as Any
        nvjitlink: Any = importlib.import_module("cuda.bindings.nvjitlink")
    except ImportError:
        return None, None
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
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
    finally:
        nvjitlink.destroy(handle)
    return resource_report(log.decode(errors="replace")), bytes(cubin)


def _span(ccs: Sequence[Sequence[int]]) -> str:
    """``"cc 7.5 to 12.1"`` for an ascending list of compute capabilities."""
    return f"cc {ccs[0][0]}.{ccs[0][1]} to {ccs[-1][0]}.{ccs[-1][1]}"


def compile_cc(cc: Sequence[int], sass: bool = True) -> list[Result]:
    """Compile every kernel for every dtype on compute capability ``cc``, with the toolkit that targets it.

    The CUDA 13 toolkit of numba-cuda compiles in this process; a compute
    capability it does not target goes to CUDA 12's compiler in a process
    of its own (:mod:`fastbn.tools.cuda12`), when that is installed and
    targets it.  ``sass=False`` skips the SASS loop count.

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
        return compile_kernels(cc, assemble, primary, sass=sass)
    kernels = kernel_names()
    fallback, missing = cuda12.locate()
    if fallback is not None and cc in fallback.ccs:
        start = time.perf_counter()
        try:
            return cuda12.compile_in_subprocess(cc, sass=sass)
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


def _loops_text(detail: Mapping[str, Any] | None) -> str:
    """``PTX loop ... SASS ...``: the loop figures of one result's detail (:func:`fastbn.tools.loops.describe`)."""
    figures = (detail or {}).get("loops")
    if figures is None:
        return "PTX loop n/a"
    return f"PTX loop {loops.describe(figures['ptx'])}  SASS {loops.describe(figures['sass'])}"


def format_line(
    cc: Sequence[int], kernel: str, dtype: str, status: str, detail: Any, seconds: float, toolkit: str
) -> str:
    """One output line: kernel, dtype, compute capability, status, toolkit, then resources and loops, or the reason."""
    head = f"{kernel:<24} {dtype:<8} cc {cc[0]}.{cc[1]:<3} {status:<11} {toolkit:<9}"
    if status != "ok":
        return f"{head} {detail}"
    if detail is None or "registers" not in detail:
        return f"{head} registers n/a (nvJitLink not installed)  {seconds:5.2f} s  {_loops_text(detail)}"
    return (
        f"{head} registers {detail['registers']:3d}  spills {detail['spill_stores']}/{detail['spill_loads']} B "
        f"(stores/loads)  smem {detail['shared']:5d} B  {seconds:5.2f} s  {_loops_text(detail)}"
    )


def _figure(part: Mapping[str, Any] | None) -> str:
    """The hot loop's instructions per element of one half of a loop summary, for the table."""
    if part is None or "error" in part:
        return "n/a"
    value = loops.per_element(part)
    if value is not None:
        return f"{value:.1f}"
    return "no data loop" if part.get("loops") else "no loop"


def _loops_cell(part: Mapping[str, Any] | None) -> str:
    """Every data loop of one half of a loop summary as ``instructions/elements``, for the table."""
    if part is None or "error" in part:
        return ""
    return ", ".join(f"{lp.instructions}/{lp.elements or '?'}" for lp in loops.data_loops(part))


def write_table(path: str, ccs: Sequence[Sequence[int]], per_cc: Sequence[Sequence[Result]], command: str) -> None:
    """Write the results as a Markdown table: kernel, dtype, registers, spills, PTX and SASS instructions per element.

    Parameters
    ----------
    path : str
        The file to write.
    ccs : list of tuple of int
        The compute capabilities, in the order of ``per_cc``.
    per_cc : list of list of tuple
        :func:`compile_cc`'s results for each.
    command : str
        The command line that made them, for the header.
    """
    from fastbn.backends.cuda import target

    sass_notes = sorted(
        {
            result[3]["loops"]["sass"]["error"]
            for results in per_cc
            for result in results
            if result[2] == "ok" and "error" in result[3].get("loops", {}).get("sass", {})
        }
    )
    fallback, _ = cuda12.locate()
    older = f"{fallback.name}'s ({cuda12.DISTRIBUTION})" if fallback is not None else "CUDA 12's (not installed)"
    lines = [
        "# PTX and SASS figures of the CUDA kernels",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}, no GPU used: "
        f"CUDA {target.toolkit_version()} NVVM and ptxas (nvJitLink) for cc 7.5 and up, "
        f"{older} for those CUDA 13 dropped; disassembler for SASS: {loops.disassembler_version()}.",
        "",
        "Instructions per element are static counts of the kernel's innermost loop that loads its first array "
        "argument (its per-element input), divided by the elements that loop loads per iteration; of several such "
        "loops, the one with the most elements per iteration (NVVM's unrolled body) gives the figure and every "
        "loop is listed as instructions/elements.  `fastbn/tools/loops.py` says how loops and elements are found.",
        "",
    ]
    if sass_notes:
        lines += [f"SASS: {'; '.join(sass_notes)}.", ""]
    for cc, results in zip(ccs, per_cc):
        toolkits = sorted({result[5] for result in results})
        lines += [
            f"## cc {cc[0]}.{cc[1]} ({', '.join(toolkits)})",
            "",
            "| kernel | dtype | registers | spills (B, st/ld) "
            "| PTX instr/elem | PTX loops | SASS instr/elem | SASS loops |",
            "|---|---|---:|---:|---:|---|---:|---|",
        ]
        for kernel, dtype, status, detail, _seconds, _toolkit in results:
            if status != "ok":
                lines.append(f"| {kernel} | {dtype} | {status} | | | | | |")
                continue
            figures = detail.get("loops", {})
            registers = detail.get("registers", "n/a")
            spills = f"{detail['spill_stores']}/{detail['spill_loads']}" if "spill_stores" in detail else "n/a"
            ptx_part, sass_part = figures.get("ptx"), figures.get("sass")
            lines.append(
                f"| {kernel} | {dtype} | {registers} | {spills} | {_figure(ptx_part)} | {_loops_cell(ptx_part)} "
                f"| {_figure(sass_part)} | {_loops_cell(sass_part)} |"
            )
        lines.append("")
    with open(path, "w") as file:
        file.write("\n".join(lines))


def _toolkits_line(ccs: Sequence[Sequence[int]]) -> str:
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


def main(
    ccs: Sequence[str],
    *,
    strict: bool = False,
    jobs: int | None = None,
    out: TextIO | None = None,
    table: str | None = None,
    sass: bool = True,
) -> int:
    """Compile for each compute capability in ``ccs`` (strings like "8.0"); return the exit status.

    With ``table`` (a path), also write the results there as a Markdown table (:func:`write_table`);
    ``sass=False`` skips the SASS loop count (nvdisasm's half second a kernel).
    """
    out = out or sys.stdout
    try:
        labels = list(ccs)
        parsed = [parse_cc(cc) for cc in ccs]
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
    print(_toolkits_line(parsed), file=out)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(parsed)))
    start = time.perf_counter()
    if jobs == 1:
        per_cc = [compile_cc(cc, sass=sass) for cc in parsed]
    else:
        # One process per compute capability: compilation is single-threaded
        # Python and NVVM.  "spawn" keeps the workers free of the parent's state.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            per_cc = list(pool.map(functools.partial(compile_cc, sass=sass), parsed))
    counts = {"ok": 0, "unsupported": 0, "FAILED": 0}
    for cc, results in zip(parsed, per_cc):
        for result in results:
            counts[result[2]] += 1
            print(format_line(cc, *result), file=out)
    if table is not None:
        command = f"python -m fastbn ptx --cc {' '.join(labels)} --table {table}" + ("" if sass else " --no-sass")
        write_table(table, parsed, per_cc, command)
        print(f"wrote {table}", file=out)
    total = sum(counts.values())
    print(
        f"{total} kernel x dtype x cc: {counts['ok']} compiled, {counts['unsupported']} unsupported by the "
        f"installed toolkits, {counts['FAILED']} failed ({time.perf_counter() - start:.1f} s)",
        file=out,
    )
    if counts["FAILED"] or counts["ok"] == 0 or (strict and counts["unsupported"]):
        return 1
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--table", default=None, metavar="FILE", help="also write the results as a Markdown table to FILE"
    )
    parser.add_argument(
        "--no-sass",
        dest="sass",
        action="store_false",
        help="skip the SASS loop count (nvdisasm, where installed, takes about half a second a kernel)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Entry point for ``python -m fastbn ptx``'s parsed arguments."""
    return main(args.cc, strict=args.strict, jobs=args.jobs, table=args.table, sass=args.sass)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
