"""What the benchmarks time, and how: the cases, their inputs, the implementations compared.

``python -m fastbn bench`` (:mod:`fastbn.tools.bench`), ``python -m fastbn
bench-fused`` (:mod:`fastbn.tools.bench_fused`) and the pytest-benchmark
suites in ``bench/`` all read this module, so they never disagree about what
is measured:

* the matrix: :class:`Shape` (a shape and its channel axis, parsed from the
  command line by :func:`parse_shape`), :class:`Case` (operation, shape,
  dtype) and :func:`build_cases`;
* :class:`Inputs`, the arrays one shape and dtype are timed on;
* :data:`LIBRARIES`, one table mapping each operation to its counterpart in
  fastbn, NumPy and PyTorch;
* the roofline's pass counts (:func:`minimal_passes`): the fewest
  tensor-sized transfers through DRAM an operation cannot avoid;
* the timer (:func:`time_interleaved`) and the float64 check of fastbn's
  results (:func:`check_case`).

NumPy is the only import at module level; fastbn's kernels and PyTorch are
imported when a callable is built.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

OPERATIONS = ("forward_train", "forward_eval", "backward_train", "moments")
DTYPES = ("float32", "float16")
# The matrix of the performance issue.  Shapes are "dims@axis" (axis 1 when
# omitted); float16 is timed for training forward only.
DEFAULT_SHAPES = ("64x64x56x56", "64x56x56x64@-1", "256x256x14x14", "8192x1024", "32x128x4096")
FLOAT16_OPERATIONS = ("forward_train",)
EPS = 1e-5
MOMENTUM = 0.1
MB = 1e6

_T = TypeVar("_T")
#: A zero-argument callable that performs one operation once and returns its main outputs (arrays, tensors).
Timed: TypeAlias = Callable[[], Any]
#: One result row of ``python -m fastbn bench`` (a case and its figures), as results.json stores it.
Row: TypeAlias = dict[str, Any]
#: A point of the bench's size sweep or a row of its thread sweep: column name to value, as results.json stores it.
SweepRow: TypeAlias = dict[str, Any]


# ------------------------------------------------------------ the matrix ---
@dataclass(frozen=True)
class Shape:
    """A tensor shape and its channel axis, as given on the command line."""

    dims: tuple[int, ...]
    axis: int = 1

    @property
    def channel_axis(self) -> int:
        """The channel axis, non-negative."""
        return self.axis % len(self.dims)

    @property
    def channels(self) -> int:
        return self.dims[self.channel_axis]

    @property
    def channels_last(self) -> bool:
        return self.channel_axis == len(self.dims) - 1

    @property
    def label(self) -> str:
        """The command-line spelling, ``64x56x56x64@-1`` (what ``--shapes`` takes and results.json stores)."""
        text = "x".join(map(str, self.dims))
        return text if self.axis == 1 else f"{text}@{self.axis}"

    @property
    def text(self) -> str:
        """The spelling for people, ``64x56x56x64 NHWC`` (see :func:`describe_shape`)."""
        return describe_shape(self.dims, self.axis)

    def reduce_axes(self) -> tuple[int, ...]:
        """Every axis but the channel axis."""
        return tuple(i for i in range(len(self.dims)) if i != self.channel_axis)

    def per_channel(self) -> tuple[int, ...]:
        """Shape that broadcasts a (C,) vector along the channel axis."""
        shape = [1] * len(self.dims)
        shape[self.channel_axis] = self.channels
        return tuple(shape)


@dataclass(frozen=True)
class Case:
    """One row of the matrix."""

    operation: str
    shape: Shape
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape.dims) * np.dtype(self.dtype).itemsize

    @property
    def label(self) -> str:
        return f"{self.operation} {self.shape.label} {self.dtype}"


# The usual names of the layouts with channels first or last: (dimensions, channel axis) -> name.
_LAYOUT_NAMES = {
    (2, 1): "NC",
    (3, 1): "NCL",
    (3, 2): "NLC",
    (4, 1): "NCHW",
    (4, 3): "NHWC",
    (5, 1): "NCDHW",
    (5, 4): "NDHWC",
}


def beyond_cache_shapes(l3_bytes: int, memory: int | None = None, factor: int = 4) -> list[Shape]:
    """One NCHW and one NHWC shape whose float32 tensor is ``factor`` times the last-level cache, or more.

    ``(N, 64, 56, 56)`` and ``(N, 56, 56, 64)`` with N a multiple of 8, so
    that the fastest any call can be is set by DRAM, not by cache, on this
    machine; at most a 48th of ``memory`` (bytes, when known) per tensor,
    since the benchmark holds a dozen tensor-sized arrays at once (inputs,
    outputs, the peers' copies) and other processes share the machine.
    """
    per_image = 64 * 56 * 56 * 4
    target = factor * int(l3_bytes)
    if memory:
        target = min(target, int(memory) // 48)
    images = -(-target // per_image)  # rounded up
    batch = max(8, -(-images // 8) * 8)
    return [Shape((batch, 64, 56, 56), 1), Shape((batch, 56, 56, 64), -1)]


def default_shapes(l3_bytes: int, memory: int | None = None) -> list[Shape]:
    """:data:`DEFAULT_SHAPES`, and each shape of :func:`beyond_cache_shapes` whose layout has none as large."""
    shapes = [parse_shape(spec) for spec in DEFAULT_SHAPES]
    for extra in beyond_cache_shapes(l3_bytes, memory):
        big = math.prod(extra.dims) * 4
        if not any(s.channels_last == extra.channels_last and math.prod(s.dims) * 4 >= big for s in shapes):
            shapes.append(extra)
    return shapes


def describe_shape(dims: Iterable[int], axis: int = 1) -> str:
    """A shape as a report writes it: ``64x56x56x64 NHWC``, or ``8x4x6, channels on axis 0``.

    The layout is named where it has a usual name (channels first or last),
    else the channel axis is spelled out.
    """
    dims = tuple(dims)
    sizes = "x".join(map(str, dims))
    name = _LAYOUT_NAMES.get((len(dims), axis % len(dims)))
    return f"{sizes} {name}" if name else f"{sizes}, channels on axis {axis}"


def describe_label(label: str) -> str:
    """:func:`describe_shape` of a shape's command-line label (``"64x56x56x64@-1"``); the label if unparsable."""
    try:
        return parse_shape(label).text
    except ValueError:
        return label


def parse_shape(text: str) -> Shape:
    """Parse ``"64x56x56x64@-1"`` into a :class:`Shape`; raise ValueError with the reason."""
    spec = text.strip()
    dims_text, _, axis_text = spec.partition("@")
    try:
        dims = tuple(int(part) for part in dims_text.split("x"))
        axis = int(axis_text) if axis_text else 1
    except ValueError:
        raise ValueError(
            f"{text!r} is not a shape: expected positive sizes joined by 'x', optionally followed by "
            "'@axis' for the channel axis (default 1), e.g. 64x64x56x56 or 64x56x56x64@-1"
        ) from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(f"{text!r}: expected at least two sizes, each at least 1")
    if not -len(dims) <= axis < len(dims):
        raise ValueError(f"{text!r}: channel axis {axis} is out of range for {len(dims)} dimensions")
    if math.prod(dims) // dims[axis % len(dims)] < 2:
        raise ValueError(f"{text!r}: training needs more than one value per channel")
    return Shape(dims, axis)


def comma_list(parse: Callable[[str], _T]) -> Callable[[str], list[_T]]:
    """An argparse ``type=`` that splits on commas and reports errors argparse's way."""

    def convert(text: str) -> list[_T]:
        items = [item for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected at least one item")
        try:
            return [parse(item.strip()) for item in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def parse_operation(text: str) -> str:
    """``text`` if it names one of :data:`OPERATIONS`; raise ValueError with the choices otherwise."""
    if text not in OPERATIONS:
        raise ValueError(f"unknown operation {text!r}; expected one of {', '.join(OPERATIONS)}")
    return text


def parse_dtype(text: str) -> str:
    """``text`` if it names one of :data:`DTYPES`; raise ValueError with the choices otherwise."""
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; expected one of {', '.join(DTYPES)}")
    return text


def build_cases(operations: Iterable[str], shapes: Iterable[Shape], dtypes: Iterable[str]) -> list[Case]:
    """The rows to time: every operation in float32, float16 for training forward only."""
    cases: list[Case] = []
    for operation in operations:
        for shape in shapes:
            for dtype in dtypes:
                if dtype == "float16" and operation not in FLOAT16_OPERATIONS:
                    continue
                cases.append(Case(operation, shape, dtype))
    return cases


# --------------------------------------------------------------- inputs ---
class Inputs:
    """The arrays a case's callables work on (PyTorch tensors share their memory)."""

    def __init__(self, shape: Shape, dtype: npt.DTypeLike, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        stats_dtype = np.float64 if dtype == "float64" else np.float32
        self.shape = shape
        # A mean away from zero, so cancellation-prone formulas would show.
        self.x: npt.NDArray[Any] = (rng.standard_normal(shape.dims, dtype=np.float32) * 2.0 + 0.5).astype(dtype)
        self.dy: npt.NDArray[Any] = rng.standard_normal(shape.dims, dtype=np.float32).astype(dtype)
        channels = shape.channels
        self.weight: npt.NDArray[np.floating[Any]] = rng.uniform(0.5, 1.5, channels).astype(stats_dtype)
        self.bias: npt.NDArray[np.floating[Any]] = rng.standard_normal(channels).astype(stats_dtype)
        self.running_mean: npt.NDArray[np.floating[Any]] = rng.standard_normal(channels).astype(stats_dtype) * 0.1 + 0.5
        self.running_var: npt.NDArray[np.floating[Any]] = rng.uniform(3.0, 5.0, channels).astype(stats_dtype)
        self.copy_target = np.empty_like(self.x)
        self.copy_target.fill(0)  # touched, so the copy measures DRAM, not page faults

    @property
    def nbytes(self) -> int:
        return self.x.nbytes


class Arrays(Protocol):
    """What the implementations read: :class:`Inputs`, or the float64 copy of them that the oracle works on."""

    shape: Shape
    x: npt.NDArray[Any]
    dy: npt.NDArray[Any]
    weight: npt.NDArray[np.floating[Any]]
    bias: npt.NDArray[np.floating[Any]]
    running_mean: npt.NDArray[np.floating[Any]]
    running_var: npt.NDArray[np.floating[Any]]


#: A library's factory: the callable for an operation on some inputs, or None where it has no counterpart.
Factory: TypeAlias = Callable[[str, Arrays], Timed | None]


# --------------------------------------------------- the implementations ---
# One table maps each operation to its counterpart in every library compared;
# the report and bench/bench_cpu.py both read it.  Each factory returns a
# zero-argument callable that performs the operation once and returns its
# main outputs.


def _fastbn_callable(operation: str, data: Arrays) -> Timed:
    import fastbn

    axis = data.shape.axis
    x, dy, weight, bias = data.x, data.dy, data.weight, data.bias
    if operation == "forward_train":
        running_mean, running_var = data.running_mean.copy(), data.running_var.copy()
        return lambda: fastbn.forward(
            x,
            weight,
            bias,
            running_mean=running_mean,
            running_var=running_var,
            training=True,
            momentum=MOMENTUM,
            eps=EPS,
            axis=axis,
        )[0]
    if operation == "forward_eval":
        return lambda: fastbn.forward(
            x,
            weight,
            bias,
            running_mean=data.running_mean,
            running_var=data.running_var,
            training=False,
            eps=EPS,
            axis=axis,
        )[0]
    if operation == "backward_train":
        _, saved = fastbn.forward(x, weight, bias, eps=EPS, axis=axis)
        return lambda: fastbn.backward(dy, x, weight, saved, axis=axis)
    if operation == "moments":
        return lambda: fastbn.moments(x, axis=axis)
    raise ValueError(operation)


def _numpy_callable(operation: str, data: Arrays) -> Timed:
    axes = data.shape.reduce_axes()
    channel = data.shape.per_channel()
    x, dy = data.x, data.dy
    weight, bias = data.weight.reshape(channel), data.bias.reshape(channel)
    count = x.size // data.shape.channels
    # float16 reductions in float16 overflow (NumPy's var sums squares in the
    # input dtype), so reduce half input in float32, as anyone would.
    acc = np.float32 if x.dtype == np.float16 else None
    if operation == "forward_train":

        def forward_train() -> npt.NDArray[Any]:
            mean = x.mean(axis=axes, keepdims=True, dtype=acc)
            var = x.var(axis=axes, keepdims=True, dtype=acc)
            y: npt.NDArray[Any] = (x - mean) / np.sqrt(var + EPS) * weight + bias
            return y

        return forward_train
    if operation == "forward_eval":
        mean = data.running_mean.reshape(channel)
        var = data.running_var.reshape(channel)
        return lambda: (x - mean) / np.sqrt(var + EPS) * weight + bias
    if operation == "backward_train":

        def backward_train() -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
            mean = x.mean(axis=axes, keepdims=True)
            invstd = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + EPS)
            centred = x - mean
            sum_dy = dy.sum(axis=axes, keepdims=True)
            dotp = (centred * dy).sum(axis=axes, keepdims=True)
            dx = (dy - sum_dy / count - centred * (dotp * invstd * invstd / count)) * (invstd * weight)
            return dx, (dotp * invstd).ravel(), sum_dy.ravel()

        return backward_train
    if operation == "moments":
        return lambda: (x.mean(axis=axes), x.var(axis=axes))
    raise ValueError(operation)


def _torch_callable(operation: str, data: Arrays) -> Timed:
    import torch
    import torch.nn.functional as F

    axis = data.shape.channel_axis
    # torch wants channels at dim 1; for channels-last data this is a view
    # with channels_last strides, the layout PyTorch calls channels_last.
    x = torch.movedim(torch.from_numpy(data.x), axis, 1)
    dy = torch.movedim(torch.from_numpy(data.dy), axis, 1)
    weight, bias = torch.from_numpy(data.weight), torch.from_numpy(data.bias)
    dims = [d for d in range(x.dim()) if d != 1]
    if operation == "forward_train":
        running_mean = torch.from_numpy(data.running_mean.copy())
        running_var = torch.from_numpy(data.running_var.copy())
        return lambda: F.batch_norm(
            x, running_mean, running_var, weight, bias, training=True, momentum=MOMENTUM, eps=EPS
        )
    if operation == "forward_eval":
        running_mean = torch.from_numpy(data.running_mean)
        running_var = torch.from_numpy(data.running_var)
        return lambda: F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=EPS)
    if operation == "backward_train":
        leaf_x = x.detach().requires_grad_(True)
        leaf_weight = weight.clone().requires_grad_(True)
        leaf_bias = bias.clone().requires_grad_(True)
        y = F.batch_norm(leaf_x, None, None, leaf_weight, leaf_bias, training=True, eps=EPS)
        return lambda: torch.autograd.grad(y, (leaf_x, leaf_weight, leaf_bias), dy, retain_graph=True)
    if operation == "moments":
        return lambda: torch.var_mean(x, dim=dims, correction=0)
    raise ValueError(operation)


def _peer(name: str) -> Factory:
    """The factory of a peer of :mod:`fastbn.tools.peers`, imported when first called."""

    def factory(operation: str, data: Arrays) -> Timed | None:
        from fastbn.tools import peers

        return peers.FACTORIES[name](operation, data)

    return factory


LIBRARIES: dict[str, Factory] = {
    "fastbn": _fastbn_callable,
    "numpy": _numpy_callable,
    "torch": _torch_callable,
    "jax": _peer("jax"),
    "flax": _peer("flax"),
    "tensorflow": _peer("tensorflow"),
}

#: fastbn's peers, in the order the report lists them; a factory may return None (no counterpart).
PEERS = ("numpy", "torch", "jax", "flax", "tensorflow")

#: The names people read.
LIBRARY_NAMES = {
    "fastbn": "fastbn",
    "numpy": "NumPy",
    "torch": "PyTorch",
    "jax": "JAX",
    "flax": "Flax",
    "tensorflow": "TensorFlow",
}


def reused_output_callable(operation: str, data: Inputs) -> Timed | None:
    """fastbn's kernels writing into one output allocated and touched beforehand, or None for moments.

    A diagnostic, not a public call: it is what an ``out=`` argument would
    give, with the output's page-in (the OS zeroing fresh pages) taken out.
    It runs the CPU backend's plan and kernels for the same input, with the
    plan told that the output is not fresh memory.

    Parameters
    ----------
    operation : str
        One of :data:`OPERATIONS`.
    data : Inputs
        The arrays to work on.

    Returns
    -------
    callable or None
        A zero-argument callable doing the operation once; None for
        ``moments``, which returns no tensor-sized output.
    """
    from fastbn.backends.cpu import passes as cpu_ops
    from fastbn.backends.cpu import plan as cpu_plan
    from fastbn.backends.cpu import views

    if operation == "moments":
        return None
    axis = data.shape.channel_axis
    layout, x_view = views.channel_view(data.x, axis)
    out, out_view, _ = views.empty_like_layout(layout, data.x, axis)
    out[...] = 0  # paged in here, so that the timed calls write memory already in use
    weight, bias = data.weight, data.bias

    def plan_for(step: str) -> cpu_plan.Plan:
        return cpu_plan.choose(step, layout, x_view.shape, x_view.itemsize, out_fresh=False)

    if operation == "forward_eval":
        plan = plan_for("normalize")
        invstd = (1.0 / np.sqrt(data.running_var.astype(np.float64) + EPS)).astype(weight.dtype)
        scale = (invstd.astype(np.float64) * weight.astype(np.float64)).astype(weight.dtype)
        mean = data.running_mean.copy()
        # the plan's views (its layout may differ from the input's), taken once outside the timed call
        x_in, out_in = plan.view(x_view), plan.view(out_view)
        return lambda: cpu_ops.normalize_into(plan, x_in, mean, scale, bias, out_in)
    forward = plan_for("forward_train")
    x_in, out_in = forward.view(x_view), forward.view(out_view)
    if operation == "forward_train":
        return lambda: cpu_ops.forward_train_into(forward, x_in, weight, bias, EPS, out_in)
    mean, _, invstd, _, _ = cpu_ops.forward_train_into(forward, x_in, weight, bias, EPS, out_in)
    mean, invstd = mean.astype(weight.dtype), invstd.astype(weight.dtype)
    dy_view = views.readonly(views.same_view(layout, data.dy, axis))
    backward = plan_for("backward_train")
    dy_in, x_in, dx_in = backward.view(dy_view), backward.view(x_view), backward.view(out_view)
    return lambda: cpu_ops.backward_train_into(backward, dy_in, x_in, mean, invstd, weight, dx_in)


def torch_available() -> bool:
    """True if PyTorch can be imported (it is an optional dependency)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# -------------------------------------------------------------- roofline ---
def channel_bytes(shape: Shape, itemsize: int) -> int:
    """Bytes of cache one channel occupies: its contiguous runs, each at least a 64-byte line.

    NCHW: N runs of H*W elements, so about the channel's own size.  Channels
    last: one element per row, but each sits in a cache line shared with its
    neighbours, so a line per row.
    """
    outer = math.prod(shape.dims[: shape.channel_axis])
    inner = math.prod(shape.dims[shape.channel_axis + 1 :])
    return outer * max(inner * itemsize, 64)


def minimal_passes(case: Case, cache_bytes: int) -> int:
    """Tensor-sized transfers through DRAM an operation cannot avoid.

    Forward eval reads x and writes y (2); moments reads x (1).  When one
    channel's data (x, and dy for backward) fits in a core's share of cache,
    training forward can compute the statistics and normalise from cache (2:
    read x, write y), and backward likewise (3: read x and dy, write dx);
    otherwise the statistics need a pass of their own (3 and 5).
    ``cache_bytes`` is that share: the machine's
    :attr:`~fastbn.backends.cpu.machine.Machine.core_cache_bytes`.
    """
    if case.operation == "forward_eval":
        return 2
    if case.operation == "moments":
        return 1
    itemsize = np.dtype(case.dtype).itemsize
    if case.operation == "forward_train":
        return 2 if channel_bytes(case.shape, itemsize) <= cache_bytes else 3
    return 3 if 2 * channel_bytes(case.shape, itemsize) <= cache_bytes else 5


def fresh_outputs(operation: str) -> int:
    """Tensor-sized arrays an operation returns newly allocated (page faults on first touch)."""
    return 0 if operation == "moments" else 1


# ---------------------------------------------------------------- timing ---
def _median(samples: Sequence[float]) -> float:
    return float(np.median(samples))


def _time_calls(function: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls, with the garbage collector off."""
    samples: list[float] = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return samples


def time_interleaved(
    functions: Mapping[str, Callable[[], object]], repeats: int, rounds: int, warmup: int = 2
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per call of each function.

    Each function is warmed up (compilation, first-touch of its inputs), then
    timed in ``rounds`` rounds of ``repeats`` calls, the functions taking
    turns round by round, so that a change in machine load hits them all.
    Before each turn a short pause and one untimed call let another library's
    idle worker threads go to sleep.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            time.sleep(0.02)
            function()
            samples[name] += _time_calls(function, repeats)
    return {name: _median(values) for name, values in samples.items()}, samples


# ----------------------------------------------------------- the checks ---
def check_case(case: Case, data: Inputs, fastbn_result: Any) -> float:
    """Max error of fastbn's outputs against a float64 NumPy oracle, relative to each output's largest value."""
    oracle = types.SimpleNamespace(
        shape=data.shape,
        **{
            name: getattr(data, name).astype(np.float64)
            for name in ("x", "dy", "weight", "bias", "running_mean", "running_var")
        },
    )
    expected = _numpy_callable(case.operation, oracle)()
    if case.operation in ("backward_train", "moments"):
        pairs = list(zip(fastbn_result, expected))
    else:
        pairs = [(fastbn_result, expected)]
    worst = 0.0
    for value, reference in pairs:
        reference = np.asarray(reference, dtype=np.float64)
        value = np.asarray(value, dtype=np.float64)
        scale = max(float(np.max(np.abs(reference))), 1e-30)
        worst = max(worst, float(np.max(np.abs(value - reference))) / scale)
    return worst


def tolerance(dtype: str) -> float:
    """The core test suite's relative tolerance for outputs of ``dtype`` (tests/strategies.py)."""
    return {"float16": 1e-3, "float32": 1e-5}.get(dtype, 1e-10)
