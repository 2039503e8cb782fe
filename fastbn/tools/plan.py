"""``python -m fastbn plan SHAPE DTYPE``: what a CPU call on that input would do, and why.

Prints the machine facts the plan rests on (:mod:`fastbn.backends.cpu.machine`),
the thresholds derived from them, and for each operation the plan
:func:`fastbn.backends.cpu.plan.choose` picks for a contiguous input of
``SHAPE`` (channel axis 1, or ``@axis``): the layout, fused or streamed, the
kernels it launches and the reasons.  A first call writes a freshly mapped
output, a call in a loop recycles the previous call's memory (the output
pool), and the plan can differ between the two, so both are shown where
they differ.  Nothing is compiled or run; Numba is not imported.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fastbn._layout import c_strides, kernel_shape, pattern
from fastbn.tools.cases import parse_shape

if TYPE_CHECKING:
    from fastbn.backends.cpu.machine import Machine
    from fastbn.backends.cpu.plan import Plan

#: The public operations, as (label, the plan's operation).
OPERATIONS = (
    ("forward, training", "forward_train"),
    ("forward, eval (and normalize)", "normalize"),
    ("backward, training", "backward_train"),
    ("backward, eval", "backward_eval"),
    ("moments", "moments"),
)


#: What the plan command says of an input small enough for fastbn.backends.cpu.small.
SMALL_PATH = (
    "Plain calls on this input take the small path: forward (training and eval) and training backward "
    "without fused options run one kernel on the calling thread (fastbn/backends/cpu/small.py)."
)


def plans(dims: Sequence[int], axis: int, dtype: npt.DTypeLike, *, relu: bool = False) -> list[tuple[str, Plan, Plan]]:
    """The plans of every public operation on a C-contiguous input: ``[(label, first, recycled)]``.

    ``first`` is the plan of a first call (fresh output memory), ``recycled``
    that of a call whose output reuses a dead output's memory.
    """
    from fastbn.backends.cpu import alloc
    from fastbn.backends.cpu import plan as cpu_plan

    dtype = np.dtype(dtype)
    dims = tuple(dims)
    axis = axis % len(dims)
    layout = pattern(dims, c_strides(dims, dtype.itemsize), dtype.itemsize, axis)
    assert layout is not None  # C-contiguous strides are always one of the kernel views
    shape = kernel_shape(layout, dims, axis)
    nbytes = math.prod(dims) * dtype.itemsize
    found: list[tuple[str, Plan, Plan]] = []
    for label, operation in OPERATIONS:
        chosen = [
            cpu_plan.choose(
                operation,
                layout,
                shape,
                dtype.itemsize,
                masked=relu and "backward" in operation,
                out_fresh=alloc.expected_fresh(nbytes, recycled),
            )
            for recycled in (False, True)
        ]
        found.append((label, chosen[0], chosen[1]))
    return found


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g} MiB" if nbytes >= 1 << 20 else f"{nbytes / 1024:.3g} KiB"


def constants(facts: Machine) -> list[str]:
    """Lines naming every machine constant of the CPU backend: its value, and where it came from.

    Three kinds (see :mod:`fastbn.backends.cpu.plan`): the machine's facts
    and what is derived from them, each with the file it was read from or
    ``fallback``; the numerical constants, the same on every machine because
    they fix which elements are summed in which order (each checked against
    this machine's caches); and the measured thresholds, which no cache size
    sets.
    """
    from fastbn.backends.cpu import alloc
    from fastbn.backends.cpu import plan as cpu_plan

    def where(*facts_used: str) -> str:
        return " + ".join(dict.fromkeys(facts.origin(name) for name in facts_used))

    share = facts.core_cache_bytes
    chunk = cpu_plan.stream_chunk(facts)
    extensions = ", ".join(facts.extensions) or "none of " + "/".join(("avx2", "avx512f", "avx512_bf16", "avx512_fp16"))
    lines = [
        "Machine constants (value, and where it came from):",
        f"  L1d {_size(facts.l1d_bytes)}: {where('l1d_bytes')}",
        f"  L2 {_size(facts.l2_bytes)} per core: {where('l2_bytes')}",
        f"  L3 {_size(facts.l3_bytes)} shared by {facts.l3_sharers} CPUs: {where('l3_bytes', 'l3_sharers')}",
        f"  vector extensions {extensions}: {where('extensions')}",
        f"  a core's share of cache {_size(share)}: L2 + L3 / sharers",
        f"  fused budget {_size(cpu_plan.fuse_bytes(facts))}: two thirds of a core's share of cache",
        f"  non-temporal stores from {_size(cpu_plan.nontemporal_bytes(facts))} of output: the L3",
        f"  one thread below {_size(cpu_plan.serial_bytes(facts))} of input: one core's L2",
        f"  non-temporal vector store {facts.vector_bytes} bytes: {where('vector_bytes')} "
        "(64 with avx512f, 32 with avx, else 16; fallback 32)",
        f"  non-temporal scratch chunk {chunk} elements: half the L1d in float64, a power of two in 512..8192"
        + ("" if chunk == cpu_plan.STREAM_CHUNK else f" (the kernels of this process have {cpu_plan.STREAM_CHUNK})"),
        "Fixed on every machine, since they fix the order of the sums (so results agree across machines):",
        f"  pieces of {cpu_plan.MIN_PIECE}..{cpu_plan.MAX_PIECE} elements ({_size(cpu_plan.MAX_PIECE * 4)} of float32"
        f"{', within the L1d' if facts.l1d_bytes >= cpu_plan.MAX_PIECE * 4 else ', larger than the L1d'})",
        f"  row blocks of {cpu_plan.BLOCK_ELEMENTS} elements ({_size(cpu_plan.BLOCK_ELEMENTS * 4)} of float32"
        f"{', within the L2' if facts.l2_bytes >= cpu_plan.BLOCK_ELEMENTS * 4 else ', larger than the L2'}), "
        f"at least {cpu_plan.MIN_STATS_ROWS} rows for the statistics; "
        f"at most {cpu_plan.MAX_CHUNKS} chunks of partial sums",
        "Measured, set by no cache size:",
        f"  runs of {_size(cpu_plan.RUN_BYTES)} for the prefetchers; fusing from runs of "
        f"{_size(cpu_plan.FUSE_RUN_BYTES)}; at least {cpu_plan.MIN_TASKS} fused tasks; streamed tasks of "
        f"{_size(cpu_plan.TASK_BYTES)}",
        f"  output pool from {_size(alloc.THRESHOLD)}, in blocks of {_size(alloc.GRANULE)} (the x86-64 huge page)",
    ]
    return lines


def report(dims: Sequence[int], axis: int, dtype: npt.DTypeLike, *, relu: bool = False) -> str:
    """The text ``python -m fastbn plan`` prints."""
    from fastbn.backends.cpu import plan as cpu_plan
    from fastbn.backends.cpu.machine import machine

    facts = machine()
    dtype = np.dtype(dtype)
    label = "x".join(map(str, dims)) + (f"@{axis}" if axis != 1 else "")
    lines = [
        f"Input {label} {dtype.name}, C-contiguous, channel axis {axis}{', ReLU before backward' if relu else ''}.",
        f"Machine: {facts.describe()}.",
        f"Fused budget {cpu_plan.fuse_bytes(facts) / 2**20:.1f} MiB per task (two thirds of a core's "
        f"share of cache); non-temporal stores from {cpu_plan.nontemporal_bytes(facts) / 2**20:.1f} MiB of "
        "output (the L3).",
        "",
        *constants(facts),
        "",
    ]
    if math.prod(dims) * dtype.itemsize < cpu_plan.serial_bytes(facts) and not relu:
        lines += [
            SMALL_PATH,
            "The plans below are those of its fused forms (and eval backward, moments, normalize).",
            "",
        ]
    for name, first, recycled in plans(dims, axis, dtype, relu=relu):
        if first == recycled:
            lines += [f"{name}:", first.describe(), ""]
        else:
            lines += [
                f"{name}, first call (fresh output memory):",
                first.describe(),
                f"{name}, in a loop (recycled output memory):",
                recycled.describe(),
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``python -m fastbn``'s subparsers."""
    parser = commands.add_parser(
        "plan", help="print the CPU plan for an input shape and dtype, and why", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "shape",
        help="sizes joined by 'x', optionally '@axis' for the channel axis "
        "(default 1), e.g. 64x64x56x56 or 64x56x56x64@-1",
    )
    parser.add_argument("dtype", nargs="?", default="float32", choices=("float16", "float32", "float64"))
    parser.add_argument("--relu", action="store_true", help="backward behind a fused ReLU (reads forward's output)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the plan report; return a process exit code."""
    try:
        shape = parse_shape(args.shape)
    except ValueError as exc:
        print(f"python -m fastbn plan: error: {exc}")
        return 2
    print(report(shape.dims, shape.axis, args.dtype, relu=args.relu), end="")
    return 0
