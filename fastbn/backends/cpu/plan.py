"""The CPU plan: how one call's work is split, chosen once per call, in plain Python.

A :class:`Plan` is a value: which layout the kernels see, whether a SLAB
operation is **fused** (each task computes its channels' statistics or
gradient sums, then their output, while the channels sit in cache) or
**streamed** (statistics over fixed pieces in memory order, then the
elementwise pass in memory order), how many channels a task takes, and
whether outputs are written with non-temporal stores; with the reasons, in
words.  :func:`choose` computes it without Numba, so ``python -m fastbn plan``
can print what a call would do; :mod:`fastbn.backends.cpu.ops` runs it.

Both SLAB strategies reduce the same pieces in the same order and compute
every element with the same compiled helpers, so a plan changes speed,
never a result (tested bit for bit).

Three kinds of constant set the plan:

* **numerical**: the piece and block sizes fix which elements are summed and
  merged in which order, so they are part of the result; they are the same
  on every machine, so that a result is too;
* **measured**: thresholds found by timing both strategies, independent of
  cache sizes (each with its reason below);
* **from the machine**: the fused working-set budget, the non-temporal
  threshold and the non-temporal scratch chunk, derived from the cache sizes
  that :mod:`fastbn.backends.cpu.machine` reads (``python -m fastbn plan``
  prints what they resolved to, and from where).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastbn._layout import ROWS, SLAB
from fastbn.backends.cpu.machine import Machine, machine

__all__ = [
    "OPERATIONS",
    "Plan",
    "choose",
    "fuse_bytes",
    "nontemporal_bytes",
    "serial_bytes",
    "slab_pieces",
    "stream_chunk",
]

# ------------------------------------------------------------- numerical ---
# SLAB pieces: whole runs grouped until a piece has MIN_PIECE elements, or a
# long run split into parts of at most MAX_PIECE.  At least MIN_PIECE keeps
# the per-piece summaries small (16 bytes per 1 KiB of float32 x); at most
# MAX_PIECE (16 KiB of float32) keeps a piece in L1/L2 between the two passes
# of its statistics.
MIN_PIECE = 256
MAX_PIECE = 4096
# ROWS blocks of about this many elements (64 KiB of float32) stay in L2
# between the two passes of their statistics.
BLOCK_ELEMENTS = 16384
# The ROWS reductions' blocks (statistics, gradient sums) have at least this many rows, however wide
# the rows: each block's per-channel passes (pivots, centres, merges, partial sums) are then a
# sixteenth of its rows' work at most.
# (16 rows of 8192 float32 channels are 512 KiB; a wider block may spill from L2 between its passes.)
MIN_STATS_ROWS = 16
# At most this many chunks of ROWS partial sums: a fixed number keeps the
# reduction order independent of the thread count.
MAX_CHUNKS = 64
# float16 and bfloat16 statistics sum in float32 over blocks of at most this
# many elements per channel (SLAB: consecutive elements of a run; ROWS: rows),
# and add the blocks in float64: the bound derived in
# fastbn.backends.cpu.reductions ("error bound") grows with it.
LANE_BLOCK = 256

# -------------------------------------------------------------- measured ---
# A fused task reads each outer row of its channels as one run; runs shorter
# than this starve the hardware prefetchers, so neighbouring channels are
# grouped until a run is about this long.
RUN_BYTES = 4096
# SLAB fuses only when a channel's runs are at least this long: timed, the
# fused plan beat the streamed one on 8 KiB runs and lost on 4 KiB runs
# (forward and backward alike), since it reads and writes pieces of a few
# KiB scattered across the tensor.
FUSE_RUN_BYTES = 8192
# Fused tasks are at least this many when the channels allow, so every core
# gets several and the last to finish does not leave the others idle.
MIN_TASKS = 8
# A streamed SLAB elementwise task is one outer row of enough channels for a
# contiguous block of about this many bytes of input.
TASK_BYTES = 64 << 10

#: What :func:`choose` plans, and the kernels each runs (see :meth:`Plan.kernels`).
OPERATIONS = (
    "moments",
    "normalize",
    "forward_train",
    "backward_train",
    "backward_eval",
    "backward_sums",
    "backward_dx",
)

_OVERRIDES = {"strategy": ("fused", "streamed"), "nontemporal": (True, False)}


# ------------------------------------------------------- from the machine ---
def fuse_bytes(facts: Machine) -> int:
    """Largest input working set of one fused task: two thirds of a core's share of cache.

    A fused task re-reads its channels from cache, so they must fit in the
    core's L2 plus its share of the L3, with room left for the output lines
    and the other core's traffic (4.5 MiB share, 3 MiB budget on an 8 MiB-L3
    machine with 512 KiB L2 per core).
    """
    return facts.core_cache_bytes * 2 // 3


def nontemporal_bytes(facts: Machine) -> int:
    """Outputs of at least this many bytes are written around the cache: the last-level cache's size.

    An output larger than the last-level cache cannot stay there for its
    next reader, and writing it with ordinary stores first reads every output
    line from DRAM.  Smaller outputs are left in cache: on a 32 MiB-L3 machine
    a warm eval loop ran 30-40% faster with ordinary stores on 12-40 MiB
    outputs, and 5-10% slower on 49 and 200 MiB ones.
    """
    return facts.l3_bytes


def serial_bytes(facts: Machine) -> int:
    """Kernel views smaller than this many bytes run on one thread: one core's L2.

    A parallel launch costs tens of microseconds whatever the size (waking
    the pool's threads, scheduling, joining): 70 us of a 120 us forward on
    (32, 64) float32 on the 2-core EPYC, which took 53 us on one thread.  An
    input that fits in one core's L2 is read from there at tens of GB/s, so
    one core passes over it in about the time a launch costs: splitting it
    saves less than the launch takes.
    """
    return facts.l2_bytes


def stream_chunk(facts: Machine) -> int:
    """Elements of the L1 scratch buffer a task computes non-temporal output into before streaming it out.

    One float64 chunk fills half the L1d (a sixteenth of its bytes in
    elements), rounded down to a power of two and kept within 512..8192:
    2048 elements (8 KiB of float32, 16 KiB of float64) on a 32 KiB L1d.
    The value is compiled into the kernels (:data:`STREAM_CHUNK`), which take
    the chunk from the scratch buffer's length, so a kernel cached on disk
    under another reading of the L1d writes the same values, with chunks of
    that other size; the values never depend on it.
    """
    elements = max(1, facts.l1d_bytes // 16)
    return min(8192, max(512, 1 << (elements.bit_length() - 1)))


#: :func:`stream_chunk` of this machine, read when the kernels are compiled.
STREAM_CHUNK = stream_chunk(machine())


# ------------------------------------------------------------ arithmetic ---
def slab_pieces(N: int, L: int) -> tuple[int, int, int]:
    """Runs per piece, pieces per outer row and the number of pieces of an ``(N, C, L)`` SLAB.

    Plain arithmetic, also compiled into the kernels (they must cut the same
    pieces).
    """
    if L >= MIN_PIECE:
        runs = 1
        per_row = (L + MAX_PIECE - 1) // MAX_PIECE
    else:
        runs = (MIN_PIECE + L - 1) // max(1, L)
        per_row = 1
    return runs, per_row, (N + runs - 1) // runs * per_row


def slab_group(shape: Sequence[int], itemsize: int, tensors: int, budget: int) -> int:
    """Channels per fused task of an ``(N, C, L)`` view; 0 when one channel exceeds ``budget``.

    ``tensors`` is how many inputs a task reads (1 for statistics and
    forward, 2 for backward's x and dy, 3 with the ReLU's output).
    """
    outer, channels, inner = shape
    channel_bytes = max(1, outer * inner * itemsize * tensors)
    if channel_bytes > budget:
        return 0
    group = max(1, RUN_BYTES // max(1, inner * itemsize))
    return max(1, min(group, budget // channel_bytes, max(1, channels // MIN_TASKS)))


def run_group(shape: Sequence[int], itemsize: int) -> int:
    """Channels per task of the streamed SLAB elementwise passes: a run of about TASK_BYTES, or one channel."""
    _, channels, inner = shape
    return max(1, min(channels, TASK_BYTES // max(1, inner * itemsize)))


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:.1f} KiB" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):.1f} MiB"


# ------------------------------------------------------------------ plan ---
@dataclasses.dataclass(frozen=True)
class Plan:
    """How the CPU kernels run one operation of one call.

    Attributes
    ----------
    operation : str
        One of :data:`OPERATIONS`.
    layout : str
        ``SLAB`` or ``ROWS``: the kernels' view.  A one-channel ROWS input
        runs as the SLAB ``(1, 1, M)``: one contiguous run, which the SLAB
        kernels stream, where the ROWS kernels would loop once per element.
    shape : tuple of int
        The kernel view's shape in that layout.
    itemsize : int
        Bytes per element of the input.
    strategy : str
        ``"fused"`` or ``"streamed"`` (ROWS always streams).
    group : int
        Channels per fused task; 0 when streamed.
    run_group : int
        Channels per task of the streamed SLAB elementwise passes (1 for ROWS).
    nontemporal : bool
        Whether outputs are written with non-temporal stores.
    reasons : tuple of str
        Why, one sentence each.
    """

    operation: str
    layout: str
    shape: tuple[int, ...]
    itemsize: int
    strategy: str
    group: int
    run_group: int
    nontemporal: bool
    reasons: tuple[str, ...]

    def view(self, array: Any) -> Any:
        """``array`` (a kernel view of the call's layout, or None) as this plan's kernels take it."""
        if array is None or array.ndim == len(self.shape):
            return array
        return array.reshape(self.shape)

    def kernels(self) -> tuple[str, ...]:
        """The kernels this plan launches, in order (what ``python -m fastbn plan`` prints)."""
        rows = self.layout == ROWS
        fused = self.strategy == "fused"
        stats = "stats_rows" if rows else ("stats_slab" if fused else "stats_slab_streamed")
        normalize = "normalize_rows" if rows else "normalize_slab"
        reduce = "backward_reduce_rows" if rows else "backward_reduce_slab"
        elementwise = "backward_elementwise_rows" if rows else "backward_elementwise_slab"
        if self.operation == "moments":
            return (stats,)
        if self.operation == "normalize":
            return (normalize,)
        if self.operation == "forward_train":
            return ("forward_train_slab",) if fused else (stats, "forward_coefficients", normalize)
        if self.operation == "backward_train":
            return ("backward_train_slab",) if fused else (reduce, "backward_coefficients", elementwise)
        if self.operation == "backward_eval":
            return (reduce, elementwise)
        if self.operation == "backward_sums":
            return (reduce,)
        return (elementwise,)

    def describe(self) -> str:
        """The plan in a few lines: layout, strategy, kernels and reasons."""
        shape = "x".join(str(n) for n in self.shape)
        lines = [
            f"{self.operation}: {self.layout} ({shape}), {self.strategy}"
            + (f", {self.group} channel(s) per task" if self.group else "")
            + (", non-temporal stores" if self.nontemporal else ""),
            "  kernels: " + ", ".join(self.kernels()),
        ]
        lines += [f"  - {reason}" for reason in self.reasons]
        return "\n".join(lines)


def _check_override(override: Mapping[str, Any] | None) -> dict[str, Any]:
    if override is None:
        return {}
    if not isinstance(override, Mapping):
        raise TypeError(f"_plan: expected a mapping of plan fields to force, got {type(override).__name__}")
    for key, value in override.items():
        if key not in _OVERRIDES:
            raise ValueError(f"_plan: unknown plan field {key!r}; expected one of {sorted(_OVERRIDES)}")
        if value not in _OVERRIDES[key] or isinstance(value, bool) != isinstance(_OVERRIDES[key][0], bool):
            raise ValueError(f"_plan: {key} must be one of {_OVERRIDES[key]}, got {value!r}")
    return dict(override)


def _tensors(operation: str, masked: bool) -> int:
    """Inputs a fused task reads per element: x (forward, statistics), x and dy, and y behind a ReLU."""
    return 1 if operation != "backward_train" else (3 if masked else 2)


def _strategy(
    operation: str, shape: Sequence[int], itemsize: int, out_fresh: bool, masked: bool, budget: int
) -> tuple[str, int, list[str]]:
    """The SLAB strategy and fused group, with the reasons (see the module docstring)."""
    N, C, L = shape
    fusable = operation in ("moments", "forward_train", "backward_train")
    if not fusable:
        return "streamed", 0, ["one pass in memory order (nothing to fuse)"]
    tensors = _tensors(operation, masked)
    channel = N * L * itemsize * tensors
    group = slab_group(shape, itemsize, tensors, budget)
    if group == 0:
        return (
            "streamed",
            0,
            [
                f"a channel's working set ({_kib(channel)}) exceeds the fused budget "
                f"({_kib(budget)}: two thirds of a core's share of cache)"
            ],
        )
    fused_tasks = (C + group - 1) // group
    streamed_tasks = slab_pieces(N, L)[2]
    if min(fused_tasks, streamed_tasks) < MIN_TASKS:
        if fused_tasks >= streamed_tasks:
            return (
                "fused",
                group,
                [f"few pieces ({streamed_tasks}): the fused plan's {fused_tasks} tasks keep more cores busy"],
            )
        return "streamed", 0, [f"few channels ({C}): the streamed plan's {streamed_tasks} pieces keep more cores busy"]
    if operation == "moments":
        return "streamed", 0, ["statistics alone stream (measured as fast or faster than fused)"]
    if L * itemsize < FUSE_RUN_BYTES:
        return (
            "streamed",
            0,
            [
                f"runs of {_kib(L * itemsize)} are under {_kib(FUSE_RUN_BYTES)}: fused tasks "
                "would read and write scattered pieces of a few KiB"
            ],
        )
    if out_fresh:
        return (
            "streamed",
            0,
            [
                "the output is freshly mapped: the OS zeroes it page by page, so writing it "
                "in memory order saves DRAM traffic"
            ],
        )
    return (
        "fused",
        group,
        [
            f"a channel's working set ({_kib(channel)}) fits the fused budget ({_kib(budget)}), "
            f"its runs are {_kib(L * itemsize)} and the output is memory in use: one read of "
            "the input from DRAM"
        ],
    )


def choose(
    operation: str,
    layout: str,
    shape: Sequence[int],
    itemsize: int,
    *,
    out_fresh: bool = False,
    masked: bool = False,
    override: Mapping[str, Any] | None = None,
    facts: Machine | None = None,
) -> Plan:
    """The plan for one operation on a kernel view.

    Parameters
    ----------
    operation : str
        One of :data:`OPERATIONS`.
    layout : str
        ``SLAB`` or ``ROWS``, the input's kernel view (:mod:`fastbn._layout`).
    shape : sequence of int
        The kernel view's shape.
    itemsize : int
        Bytes per input element.
    out_fresh : bool
        Whether the output is freshly mapped memory (the allocator says so,
        :func:`fastbn.backends.cpu.alloc.allocate`).
    masked : bool
        Backward behind a ReLU: the fused task also reads forward's output.
    override : mapping, optional
        Private, for tests (the public functions' ``_plan`` argument):
        ``{"strategy": "fused" | "streamed", "nontemporal": bool}`` forces
        those fields; a forced fused plan is taken even when a channel
        exceeds the budget (one channel per task then).
    facts : Machine, optional
        The machine to plan for; this one by default.

    Returns
    -------
    Plan
    """
    if override is None and facts is None:
        # The plan is a pure function of these and of this machine's facts (read once per process), and
        # it is immutable: a training loop's calls share it instead of rebuilding it and its reasons.
        return _choose_here(operation, layout, tuple(map(int, shape)), int(itemsize), bool(out_fresh), bool(masked))
    return _choose(operation, layout, shape, itemsize, out_fresh, masked, override, facts)


@functools.lru_cache(maxsize=256)
def _choose_here(
    operation: str, layout: str, shape: tuple[int, ...], itemsize: int, out_fresh: bool, masked: bool
) -> Plan:
    """:func:`choose` for this machine and no override, memoised."""
    return _choose(operation, layout, shape, itemsize, out_fresh, masked, None, None)


def _choose(
    operation: str,
    layout: str,
    shape: Sequence[int],
    itemsize: int,
    out_fresh: bool,
    masked: bool,
    override: Mapping[str, Any] | None,
    facts: Machine | None,
) -> Plan:
    if operation not in OPERATIONS:
        raise ValueError(f"operation: expected one of {OPERATIONS}, got {operation!r}")
    forced = _check_override(override)
    facts = machine() if facts is None else facts
    shape = tuple(int(n) for n in shape)
    reasons = []
    if layout == ROWS and shape[1] == 1:
        layout, shape = SLAB, (1, 1, shape[0])
        reasons.append("one channel: its elements are one contiguous run, streamed as a SLAB")
    if layout == ROWS:
        strategy, group, why = (
            "streamed",
            0,
            ["channels are contiguous: blocks of rows, vectorised across channels, merged with Chan's formula"],
        )
    else:
        strategy, group, why = _strategy(operation, shape, itemsize, out_fresh, masked, fuse_bytes(facts))
    reasons += why
    if "strategy" in forced and forced["strategy"] != strategy:
        if forced["strategy"] == "fused" and (
            layout == ROWS or operation not in ("moments", "forward_train", "backward_train")
        ):
            raise ValueError(f"_plan: {operation} on a {layout} view has no fused plan")
        strategy = forced["strategy"]
        group = (
            (slab_group(shape, itemsize, _tensors(operation, masked), fuse_bytes(facts)) or 1)
            if strategy == "fused"
            else 0
        )
        reasons.append(f"strategy forced to {strategy} (_plan)")
    writes = operation not in ("moments", "backward_sums")
    out_bytes = math.prod(shape) * itemsize if writes else 0
    threshold = nontemporal_bytes(facts)
    nontemporal = writes and out_bytes >= threshold
    if writes:
        reasons.append(
            f"output {_kib(out_bytes)} {'>=' if nontemporal else '<'} {_kib(threshold)} (the L3): "
            f"{'non-temporal stores' if nontemporal else 'ordinary stores, left in cache'}"
        )
    if "nontemporal" in forced and forced["nontemporal"] != nontemporal:
        nontemporal = forced["nontemporal"]
        reasons.append(f"non-temporal stores forced {'on' if nontemporal else 'off'} (_plan)")
    return Plan(
        operation=operation,
        layout=layout,
        shape=shape,
        itemsize=int(itemsize),
        strategy=strategy,
        group=group,
        run_group=run_group(shape, itemsize) if layout == SLAB else 1,
        nontemporal=bool(nontemporal),
        reasons=tuple(reasons),
    )
