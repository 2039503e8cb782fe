"""Compile the CUDA kernel table with this process's NVVM, and read what ptxas reports.

Both drivers of ``python -m fastbn ptx`` use this module: :mod:`fastbn.tools.ptx`
with CUDA 13's NVVM in its own processes, and the child interpreter of
:mod:`fastbn.tools.cuda12` with CUDA 12's.  Keeping it apart from both is
what lets the two import it without importing each other.

Nothing here imports numba-cuda at module level: :func:`compile_kernels`
reaches it through :mod:`fastbn.backends.cuda.target` when called, which in
the CUDA 12 child must come after that child has loaded its own libNVVM.

Beside ptxas's report, every result carries the instruction counts of the
kernel's innermost loops, from its PTX and (where ``nvdisasm`` is installed)
its SASS: :func:`fastbn.tools.loops.summarize`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from fastbn._validate import FLOAT_DTYPES
from fastbn.tools import loops

_LOG_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "shared": re.compile(r"(\d+) bytes smem"),
}

#: ``(kernel, dtype name, status, detail, seconds, toolkit)``: one kernel on one compute capability (see
#: :func:`compile_kernels`).  The detail is a dict for ``ok`` and a one-line reason (str) otherwise, and
#: crosses a JSON line from the CUDA 12 child process.
Result: TypeAlias = tuple[str, str, str, Any, float, str]
#: ``assembler(ptx, cc)``: the resource report of the assembled PTX (or None) and the cubin (or None).
Assembler: TypeAlias = Callable[[str, Sequence[int]], tuple[dict[str, int] | None, bytes | None]]


def parse_cc(text: str) -> tuple[int, int]:
    """Parse a compute capability.

    Parameters
    ----------
    text : str
        Such as ``"8.0"``.

    Returns
    -------
    tuple of int
        ``(major, minor)``.

    Raises
    ------
    ValueError
        If ``text`` is not two integers joined by a dot.
    """
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if not match:
        raise ValueError(f"--cc: expected a compute capability like 8.0, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def resource_report(log: str) -> dict[str, int]:
    """Registers, spills and static shared memory from a ptxas ``-v`` log of one kernel.

    Parameters
    ----------
    log : str
        What ptxas printed (nvJitLink's info log, or ``ptxas -v``'s output).

    Returns
    -------
    dict
        ``registers``, ``spill_stores``, ``spill_loads`` and ``shared``
        (bytes of static shared memory); 0 for what the log does not mention.
    """
    report: dict[str, int] = {}
    for key, pattern in _LOG_PATTERNS.items():
        found = pattern.search(log)
        report[key] = int(found.group(1)) if found else 0
    return report


def kernel_names() -> list[tuple[str, str]]:
    """``(kernel, dtype name)`` of every kernel and dtype that :func:`compile_kernels` compiles, in its order."""
    from fastbn.backends.cuda import plan

    return [(kernel, dtype.name) for dtype in FLOAT_DTYPES for kernel, _, _ in plan.signatures(dtype)]


def compile_kernels(cc: Sequence[int], assembler: Assembler, toolkit: str, sass: bool = True) -> list[Result]:
    """Compile every kernel for every dtype on ``cc`` with the NVVM of this process.

    Parameters
    ----------
    cc : tuple of int
        ``(major, minor)``.
    assembler : callable
        ``assembler(ptx, cc)`` returns ``(report, cubin)``: the resource
        report of the assembled PTX (or None) and the machine code (bytes, or
        None), and raises on failure.
    toolkit : str
        Names the compiler on every result, such as ``"CUDA 13.5"``.
    sass : bool, default True
        Also count the loops in the SASS (nvdisasm takes about half a
        second a kernel); False leaves the PTX count only.

    Returns
    -------
    list of tuple
        ``(kernel, dtype name, status, detail, seconds, toolkit)`` with status
        ``ok``, ``unsupported`` (NVVM does not target ``cc``) or ``FAILED``
        (the detail is a one-line reason).  For ``ok`` the detail is a dict:
        the resource report's keys where ptxas gave one, and ``loops``, the
        loop figures of :func:`fastbn.tools.loops.summarize`.
    """
    from fastbn.backends.cuda import plan, target

    results: list[Result] = []
    for dtype in FLOAT_DTYPES:
        for kernel, dispatcher, argtypes in plan.signatures(dtype):
            start = time.perf_counter()
            try:
                ptx = target.compile_ptx(dispatcher.py_func, argtypes, cc)
                report, cubin = assembler(ptx, cc)
                detail = dict(report or {}, loops=loops.summarize(ptx, cubin, sass=sass))
            except Exception as exc:
                first_line = (str(exc).strip().splitlines() or [""])[0]
                status = "unsupported" if type(exc).__name__ == "CCSupportError" else "FAILED"
                results.append(
                    (
                        kernel,
                        dtype.name,
                        status,
                        f"{type(exc).__name__}: {first_line}",
                        time.perf_counter() - start,
                        toolkit,
                    )
                )
                continue
            results.append((kernel, dtype.name, "ok", detail, time.perf_counter() - start, toolkit))
    return results
