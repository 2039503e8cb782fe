"""The memory roofline of this machine, measured in the same run as the figures it bounds.

Batch norm is memory-bound, so the fastest any implementation can be is the
time its minimal bytes take at the best bandwidth this machine reaches.  That
bandwidth is measured here, not assumed, as the fastest of three copies of an
array well beyond the last-level cache (:func:`copy_bytes`), each a median
over repeats:

* ``np.copyto``: one thread (glibc's ``memcpy``, which itself switches to
  non-temporal stores on large copies);
* an all-core Numba ``prange`` copy with ordinary stores (each written line
  is first read for ownership, unless the CPU elides it);
* an all-core copy with non-temporal stores
  (:func:`fastbn.backends.cpu.nontemporal.stream_copy`, the kernels' own
  store path), which write whole lines around the cache.

A copy reads ``B`` bytes and writes ``B``; its bandwidth is ``2B / time``,
bytes read plus bytes written, the unit the pass counts of
:func:`fastbn.tools.cases.minimal_passes` use.  A row's roofline time is its
passes times the tensor's bytes over that bandwidth.  The same kernels are
also timed with every row, on its tensor, in the same interleaved rounds as
its implementations, so that a moment of heavy load on a shared machine hits
both; the bound of every row is the best copy of the whole run beyond the
cache (:func:`run_best`: the measurement here and the rows of four LLCs or
more), or its own copies where they were faster (a tensor partly or wholly
in cache copies faster than one from DRAM, and a limit must hold for every
row).

Moments only read: reading alone can be faster than copying (no write
traffic shares the memory bus), so the read-only rows are bounded by the
faster of the copy and an all-core read (a ``prange`` sum of the same array).
A figure above 100% of its roofline therefore means the measurement is wrong,
and the report says so in words rather than clipping it.

The machine's description (CPU model, vector extensions, caches) is
:func:`fastbn.backends.cpu.machine.machine`'s, the facts the plan reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import numba
import numpy as np
import numpy.typing as npt
from numba import prange

from fastbn.backends.cpu.nontemporal import stream_copy

if TYPE_CHECKING:
    from fastbn.backends.cpu.machine import Machine
    from fastbn.tools.cases import Row

#: Elements per task of the all-core copies: 256 KiB of float32, a multiple of
#: the 64-byte line for every itemsize, so each task's part of the output
#: starts on a line and the non-temporal copy streams whole lines.
BLOCK = 1 << 16

#: The copies, by the name the report gives them.
COPIES = ("np.copyto, 1 thread", "prange copy, ordinary stores", "prange copy, non-temporal stores")
READ = "prange read"

_F = TypeVar("_F", bound=Callable[..., Any])
_Floats: TypeAlias = npt.NDArray[np.float32]
#: :func:`fastbn.tools.cases.time_interleaved`: ``(median seconds by name, samples by name)``.
Timer: TypeAlias = Callable[..., tuple[dict[str, float], dict[str, list[float]]]]


# ---------------------------------------------------------------- kernels ---
# Each task works on a 1-D slice with an index from range(len), so that Numba
# drops the negative-index check and the loop vectorises (see
# fastbn/backends/cpu/loops.py).


def _njit(**options: Any) -> Callable[[_F], _F]:
    """``numba.njit(**options)``, typed: the dispatcher it makes is called as the function it compiles."""
    jit: Callable[[_F], _F] = numba.njit(**options)
    return jit


@_njit(inline="always", nogil=True)
def _copy_run(dst: _Floats, src: _Floats) -> None:  # pragma: no cover - compiled
    for i in range(src.shape[0]):
        dst[i] = src[i]


@_njit(inline="always", nogil=True, fastmath=True)
def _sum_run(src: _Floats) -> np.float32:  # pragma: no cover - compiled
    part: np.float32 = np.float32(0.0)
    for i in range(src.shape[0]):
        part += src[i]
    return part


@_njit(parallel=True, cache=True, nogil=True)
def parallel_copy(dst: _Floats, src: _Floats) -> None:  # pragma: no cover - compiled
    """``dst[:] = src`` for 1-D contiguous arrays, on every core, with ordinary stores."""
    n = src.shape[0]
    blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(blocks):
        start = b * BLOCK
        stop = min(n, start + BLOCK)
        _copy_run(dst[start:stop], src[start:stop])


@_njit(parallel=True, cache=True, nogil=True)
def parallel_stream_copy(dst: _Floats, src: _Floats) -> None:  # pragma: no cover - compiled
    """``dst[:] = src`` for 1-D contiguous arrays, on every core, whole lines with non-temporal stores."""
    n = src.shape[0]
    blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(blocks):
        start = b * BLOCK
        stop = min(n, start + BLOCK)
        stream_copy(dst[start:stop], src[start:stop])


@_njit(parallel=True, cache=True, nogil=True, fastmath=True)
def parallel_read(src: _Floats) -> float:  # pragma: no cover - compiled
    """The sum of a 1-D float32 array, on every core: a read of every byte and nothing written."""
    n = src.shape[0]
    blocks = (n + BLOCK - 1) // BLOCK
    total = 0.0
    for b in prange(blocks):
        start = b * BLOCK
        stop = min(n, start + BLOCK)
        total += _sum_run(src[start:stop])
    return total


# ------------------------------------------------------------ measurement ---
def copy_bytes(l3_bytes: int, memory: int | None = None) -> int:
    """Bytes of the array the beyond-cache bandwidth is measured on: 8 LLCs, at least 256 MiB.

    Well beyond the last-level cache (``l3_bytes``), so neither the source
    nor the destination is in cache when read again; at most a sixteenth of
    ``memory`` (bytes, when known) for the two arrays, since other processes
    share the machine.
    """
    size = max(8 * int(l3_bytes), 256 << 20)
    if memory:
        size = min(size, int(memory) // 16)
    return max(size, 1 << 20) // 64 * 64


def _words(src: npt.NDArray[Any], dst: npt.NDArray[Any]) -> tuple[_Floats, _Floats]:
    """``src`` and ``dst`` as flat float32 views of their whole 4-byte words (the read kernel sums floats)."""
    if src.dtype != np.float32:
        words = src.nbytes // 4 * 4
        src = src.reshape(-1).view(np.uint8)[:words].view(np.float32)
        dst = dst.reshape(-1).view(np.uint8)[:words].view(np.float32)
    return src.reshape(-1), dst.reshape(-1)


def functions(src: npt.NDArray[Any], dst: npt.NDArray[Any]) -> dict[str, Callable[[], object]]:
    """The three copies and the read, each a zero-argument callable on ``src`` and ``dst``, by name.

    Any dtype is copied as its bytes (its whole 4-byte words); time each
    with the row it bounds, so that both see the same machine load, and
    convert with :func:`bandwidths`.
    """
    flat_src, flat_dst = _words(src, dst)
    return {
        COPIES[0]: lambda: np.copyto(flat_dst, flat_src),
        COPIES[1]: lambda: parallel_copy(flat_dst, flat_src),
        COPIES[2]: lambda: parallel_stream_copy(flat_dst, flat_src),
        READ: lambda: parallel_read(flat_src),
    }


def measure(
    src: npt.NDArray[Any], dst: npt.NDArray[Any], repeats: int, rounds: int, time_interleaved: Timer
) -> dict[str, float]:
    """Bandwidth in bytes per second of each copy (2 bytes per byte copied) and of the read (1).

    ``src`` and ``dst`` are arrays of one shape and dtype, ``dst`` already
    touched; ``time_interleaved`` is :func:`fastbn.tools.cases.time_interleaved`.
    Returns ``{name: bytes per second}`` for every entry of :data:`COPIES`
    and :data:`READ`; raises AssertionError if an all-core copy did not copy
    its input exactly (its time would then mean nothing).
    """
    calls = functions(src, dst)
    times, _ = time_interleaved(calls, repeats, rounds, warmup=1)
    verify(src, dst)
    return bandwidths(times, _words(src, dst)[0].nbytes)


def verify(src: npt.NDArray[Any], dst: npt.NDArray[Any]) -> None:
    """Raise AssertionError unless each all-core copy copies ``src`` into ``dst`` exactly.

    A copy that copied nothing would be fast, and its time would mean nothing.
    """
    calls = functions(src, dst)
    flat_src, flat_dst = _words(src, dst)
    for name in COPIES[1:]:
        flat_dst.fill(0)
        calls[name]()
        if not np.array_equal(flat_dst.view(np.uint8), flat_src.view(np.uint8)):
            raise AssertionError(f"roofline: {name} did not copy its input")


def bandwidths(times: Mapping[str, float], nbytes: int) -> dict[str, float]:
    """Bytes per second of each kernel of :func:`functions` from its seconds on ``nbytes`` (2 per byte copied)."""
    return {name: (nbytes if name == READ else 2 * nbytes) / seconds for name, seconds in times.items()}


def measure_beyond_cache(
    facts: Machine, memory: int | None, repeats: int, rounds: int, time_interleaved: Timer, nbytes: int | None = None
) -> tuple[int, dict[str, float]]:
    """:func:`measure` on a float32 array of :func:`copy_bytes` (or ``nbytes``) bytes: ``(bytes, bandwidths)``."""
    nbytes = copy_bytes(facts.l3_bytes, memory) if nbytes is None else max(64, int(nbytes) // 64 * 64)
    src = np.ones(nbytes // 4, np.float32)
    src[::1024] = 2.0  # not all one value, so a copy that skipped work would show
    dst = np.zeros_like(src)
    return nbytes, measure(src, dst, max(3, repeats), rounds, time_interleaved)


def best_copy(bandwidths: Mapping[str, float]) -> tuple[str, float]:
    """The fastest copy's name and bandwidth (bytes per second) of a :func:`measure` result."""
    name = max(COPIES, key=lambda key: bandwidths[key])
    return name, bandwidths[name]


def row_bandwidth(
    operation: str, beyond: Mapping[str, float], own: Mapping[str, float] | None = None, where: str = "beyond the LLC"
) -> tuple[float, str]:
    """The bandwidth that bounds a row, and where it was measured.

    The best copy of ``beyond`` (the run's best beyond-cache figures, measured
    ``where``) and of ``own`` (the tensor's own size, timed with the row),
    and for ``moments``, which only reads, the all-core read of either as
    well.  Returns ``(bytes per second, what)`` with ``what`` naming the
    kernel and the size.
    """
    candidates = [(beyond, where)] + ([(own, "at the tensor's size, with the row")] if own else [])
    best = (0.0, "")
    for bandwidths, where in candidates:
        names = [*COPIES, READ] if operation == "moments" else list(COPIES)
        for name in names:
            if bandwidths[name] > best[0]:
                best = (bandwidths[name], f"{name}, {where}")
    return best


def run_best(measurements: Iterable[tuple[str, Mapping[str, float]]]) -> tuple[dict[str, float], dict[str, str]]:
    """Each kernel's best bandwidth over ``measurements`` (``[(where, {name: bytes per second})]``), and where.

    Returns ``({name: bytes per second}, {name: where})``: the best this
    machine reached in the run, for every kernel, so that the roofline is the
    fastest copy any moment of the run allowed.
    """
    best: dict[str, float] = {}
    where: dict[str, str] = {}
    for place, figures in measurements:
        for name, value in figures.items():
            if value > best.get(name, 0.0):
                best[name], where[name] = value, place
    return best, where


def fits_in_cache(nbytes: int, facts: Machine) -> bool:
    """Whether a tensor and its output could both sit in the last-level cache (so DRAM does not bound it)."""
    return 2 * nbytes <= facts.l3_bytes + facts.cores * facts.l2_bytes


# ------------------------------------------------------------------ text ---
def section(info: Mapping[str, Any], machine_line: str) -> list[str]:
    """The report's roofline section: the machine, the beyond-cache copies and which of them bounds the rows.

    ``info`` is :func:`fastbn.tools.report.machine_info`'s dict with the
    run's ``"roofline"`` (:func:`fastbn.tools.bench.measure_roofline`);
    ``machine_line`` the sentence naming the machine.
    """
    roof = info.get("roofline")
    if not roof:
        return []
    lines = [
        "## The roofline",
        "",
        "Machine: " + machine_line,
        "",
        f"The copies and the read, each a median over repeats on {roof['bytes'] / 2**20:.0f} MiB (the last-level "
        f"cache is {info.get('l3_bytes', 0) / 2**20:.0f} MiB), in GB/s of bytes read plus bytes written:",
        "",
        "| kernel | GB/s |",
        "|---|---|",
    ]
    for name, value in roof["gb_s"].items():
        mark = " **(the best copy: the roofline)**" if name == roof["best"] else ""
        what = " (read only; bounds moments too)" if name == READ else ""
        lines.append(f"| {name}{what} | {value:.1f}{mark} |")
    lines.append("")
    best = roof.get("run_best")
    if best:
        lines += [
            f"The same kernels are timed with every row, on its tensor, in the same interleaved rounds (the copies' "
            f"table below). The best copy of the whole run well beyond the cache (this measurement and the rows of "
            f"4 LLCs or more), which bounds every row, was **{best['kernel']}, {best['gb_s']:.1f} GB/s** "
            f"({best['where']}); a row is bounded by the copies timed with it where they were faster (a tensor "
            "partly or wholly in cache), and moments, which only read, by the read where it was faster (each row's "
            "diagnostics cell names its bound).",
            "",
        ]
    lines += [
        "Passes per operation (bytes read and written, in tensors): training forward 2 when a channel fits in a "
        "core's share of cache, else 3; training backward 3, else 5; eval forward 2; moments 1.",
        "",
    ]
    return lines


def copies_at_each_size(
    results: Iterable[Row], shape_cell: Callable[[Row], str], fmt_ms: Callable[[float | None], str]
) -> list[str]:
    """The report's table of the copies and the read at each tensor's own size, with the output's page-in."""
    seen: dict[tuple[str, str], Row] = {}
    for row in results:
        seen.setdefault((row["shape"], row["dtype"]), row)
    lines = [
        "## The copies at each tensor's size",
        "",
        "Timed with the first row of each tensor, in its interleaved rounds (GB/s of bytes read plus written; the "
        "read: bytes read).",
        "",
        "| shape | dtype | MB | "
        + " | ".join(f"{name}, GB/s" for name in (*COPIES, READ))
        + " | page-in of one output, ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in seen.values():
        own = row.get("own_gb_s") or {}
        values = [own.get(name) for name in (*COPIES, READ)]
        if values[0] is None:  # a results.json of an older run: np.copyto alone
            values[0] = 2 * row["bytes"] / row["copy_ms"] / 1e6
        lines.append(
            f"| {shape_cell(row)} | {row['dtype']} | {row['bytes'] / 1e6:.1f} | "
            + " | ".join("n/a" if v is None else f"{v:.1f}" for v in values)
            + f" | {fmt_ms(row['page_in_ms'])} |"
        )
    return [*lines, ""]
