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

import math

import numpy as np

from fastbn._layout import c_strides, kernel_shape, pattern
from fastbn.tools.cases import parse_shape

#: The public operations, as (label, the plan's operation).
OPERATIONS = (
    ("forward, training", "forward_train"),
    ("forward, eval (and normalize)", "normalize"),
    ("backward, training", "backward_train"),
    ("backward, eval", "backward_eval"),
    ("moments", "moments"),
)


def plans(dims, axis, dtype, *, relu=False):
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
    shape = kernel_shape(layout, dims, axis)
    nbytes = math.prod(dims) * dtype.itemsize
    found = []
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
        found.append((label, *chosen))
    return found


def report(dims, axis, dtype, *, relu=False):
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


def add_parser(commands):
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


def run(args):
    """Print the plan report; return a process exit code."""
    try:
        shape = parse_shape(args.shape)
    except ValueError as exc:
        print(f"python -m fastbn plan: error: {exc}")
        return 2
    print(report(shape.dims, shape.axis, args.dtype, relu=args.relu), end="")
    return 0
