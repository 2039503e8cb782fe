"""``python -m fastbn bench``: fastbn against NumPy, PyTorch and the memory roofline.

Batch norm is memory-bound, so its floor is the time its bytes take through
DRAM.  This module times every (operation, shape, dtype) of a matrix in one
run, side by side with

* a straightforward NumPy implementation (whole-array reductions);
* PyTorch on the CPU: ``torch.nn.functional.batch_norm`` and its autograd
  backward, ``torch.var_mean`` for the moments (optional: skipped when torch
  is not installed);
* the memory roofline: the fewest bytes the operation must move (see
  :func:`minimal_passes`) at the bandwidth of ``np.copyto`` on the same
  tensor, measured in the same run;

and writes a Markdown report, a README-ready snippet, the raw numbers as JSON
and PNG charts (matplotlib, optional).  It also sweeps tensor size (1 MB to
400 MB) and thread count (1 and 2).

Every figure is a median over several timed calls made after warm-up calls,
so compilation never counts; compile time is measured on its own, in a fresh
interpreter with an empty kernel cache.  The same table of implementations
(:data:`LIBRARIES`) feeds the pytest-benchmark suite in ``bench/``.

Nothing here is imported by ``import fastbn``; NumPy is the only import at
module level, so ``python -m fastbn --help`` stays instant.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass

import numpy as np

OPERATIONS = ("forward_train", "forward_eval", "backward_train", "moments")
DTYPES = ("float32", "float16")
# The matrix of the performance issue.  Shapes are "dims@axis" (axis 1 when
# omitted); float16 is timed for training forward only.
DEFAULT_SHAPES = ("64x64x56x56", "64x56x56x64@-1", "256x256x14x14", "8192x1024", "32x128x4096")
FLOAT16_OPERATIONS = ("forward_train",)
EPS = 1e-5
MOMENTUM = 0.1
MB = 1e6

# The bar the report checks each row against (medians, 2-core machine).
BAR_TORCH = 2.0
BAR_SLAB_FORWARD = 3.5
BAR_SLAB_BACKWARD = 2.5
BAR_ROOFLINE = 0.60
BAR_ROOFLINE_MIN_BYTES = 48 * MB

# Size sweep: (80, C, 56, 56) float32 is 1.0 MB per channel, so C is the size in MB.
SWEEP_CHANNELS = (1, 2, 5, 10, 25, 50, 100, 200, 400)
SWEEP_OPERATIONS = ("forward_train", "backward_train", "moments")


# ------------------------------------------------------------ the matrix ---
@dataclass(frozen=True)
class Shape:
    """A tensor shape and its channel axis, as given on the command line."""

    dims: tuple
    axis: int = 1

    @property
    def channel_axis(self):
        """The channel axis, non-negative."""
        return self.axis % len(self.dims)

    @property
    def channels(self):
        return self.dims[self.channel_axis]

    @property
    def channels_last(self):
        return self.channel_axis == len(self.dims) - 1

    @property
    def label(self):
        text = "x".join(map(str, self.dims))
        return text if self.axis == 1 else f"{text}@{self.axis}"

    def reduce_axes(self):
        """Every axis but the channel axis."""
        return tuple(i for i in range(len(self.dims)) if i != self.channel_axis)

    def per_channel(self):
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
    def nbytes(self):
        return math.prod(self.shape.dims) * np.dtype(self.dtype).itemsize

    @property
    def label(self):
        return f"{self.operation} {self.shape.label} {self.dtype}"


def parse_shape(text):
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


def _comma_list(parse):
    """An argparse ``type=`` that splits on commas and reports errors argparse's way."""

    def convert(text):
        items = [item for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected at least one item")
        try:
            return [parse(item.strip()) for item in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _operation(text):
    if text not in OPERATIONS:
        raise ValueError(f"unknown operation {text!r}; expected one of {', '.join(OPERATIONS)}")
    return text


def _dtype(text):
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; expected one of {', '.join(DTYPES)}")
    return text


def build_cases(operations, shapes, dtypes):
    """The rows to time: every operation in float32, float16 for training forward only."""
    cases = []
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

    def __init__(self, shape, dtype, seed=0):
        rng = np.random.default_rng(seed)
        stats_dtype = np.float64 if dtype == "float64" else np.float32
        self.shape = shape
        # A mean away from zero, so cancellation-prone formulas would show.
        self.x = (rng.standard_normal(shape.dims, dtype=np.float32) * 2.0 + 0.5).astype(dtype)
        self.dy = rng.standard_normal(shape.dims, dtype=np.float32).astype(dtype)
        channels = shape.channels
        self.weight = rng.uniform(0.5, 1.5, channels).astype(stats_dtype)
        self.bias = rng.standard_normal(channels).astype(stats_dtype)
        self.running_mean = rng.standard_normal(channels).astype(stats_dtype) * 0.1 + 0.5
        self.running_var = rng.uniform(3.0, 5.0, channels).astype(stats_dtype)
        self.copy_target = np.empty_like(self.x)
        self.copy_target.fill(0)  # touched, so the copy measures DRAM, not page faults

    @property
    def nbytes(self):
        return self.x.nbytes


# --------------------------------------------------- the implementations ---
# One table maps each operation to its counterpart in every library compared;
# the report and bench/bench_cpu.py both read it.  Each factory returns a
# zero-argument callable that performs the operation once and returns its
# main outputs.


def _fastbn_callable(operation, data):
    import fastbn

    axis = data.shape.axis
    x, dy, weight, bias = data.x, data.dy, data.weight, data.bias
    if operation == "forward_train":
        running_mean, running_var = data.running_mean.copy(), data.running_var.copy()
        return lambda: fastbn.forward(x, weight, bias, running_mean=running_mean, running_var=running_var,
                                      training=True, momentum=MOMENTUM, eps=EPS, axis=axis)[0]
    if operation == "forward_eval":
        return lambda: fastbn.forward(x, weight, bias, running_mean=data.running_mean,
                                      running_var=data.running_var, training=False, eps=EPS, axis=axis)[0]
    if operation == "backward_train":
        _, saved = fastbn.forward(x, weight, bias, eps=EPS, axis=axis)
        return lambda: fastbn.backward(dy, x, weight, saved, axis=axis)
    if operation == "moments":
        return lambda: fastbn.moments(x, axis=axis)
    raise ValueError(operation)


def _numpy_callable(operation, data):
    axes = data.shape.reduce_axes()
    channel = data.shape.per_channel()
    x, dy = data.x, data.dy
    weight, bias = data.weight.reshape(channel), data.bias.reshape(channel)
    count = x.size // data.shape.channels
    # float16 reductions in float16 overflow (NumPy's var sums squares in the
    # input dtype), so reduce half input in float32, as anyone would.
    acc = np.float32 if x.dtype == np.float16 else None
    if operation == "forward_train":
        def forward_train():
            mean = x.mean(axis=axes, keepdims=True, dtype=acc)
            var = x.var(axis=axes, keepdims=True, dtype=acc)
            return (x - mean) / np.sqrt(var + EPS) * weight + bias
        return forward_train
    if operation == "forward_eval":
        mean = data.running_mean.reshape(channel)
        var = data.running_var.reshape(channel)
        return lambda: (x - mean) / np.sqrt(var + EPS) * weight + bias
    if operation == "backward_train":
        def backward_train():
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


def _torch_callable(operation, data):
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
        return lambda: F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                                    momentum=MOMENTUM, eps=EPS)
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


LIBRARIES = {"fastbn": _fastbn_callable, "numpy": _numpy_callable, "torch": _torch_callable}


def _fastbn_reused_callable(operation, data):
    """fastbn's kernels writing into one output allocated and touched beforehand, or None for moments.

    A diagnostic, not a public call: it is what an ``out=`` argument would
    give, with the output's page-in (the OS zeroing fresh pages) taken out.
    The kernels and plans are those of the public call with a reused buffer.
    """
    from fastbn import _cpu, _layout

    if operation == "moments":
        return None
    axis = data.shape.channel_axis
    layout, x_view = _layout.channel_view(data.x, axis)
    out, out_view = _layout.empty_like_layout(layout, data.x, axis)
    out.fill(0)
    weight, bias = data.weight, data.bias
    if operation == "forward_train":
        return lambda: _cpu.forward_train(layout, x_view, weight, bias, EPS, out_view)
    if operation == "forward_eval":
        invstd = (1.0 / np.sqrt(data.running_var.astype(np.float64) + EPS)).astype(weight.dtype)
        scale = (invstd.astype(np.float64) * weight.astype(np.float64)).astype(weight.dtype)
        mean = data.running_mean.copy()
        return lambda: _cpu.normalize(layout, x_view, mean, scale, bias, out_view)
    mean, _, invstd, _, _ = _cpu.forward_train(layout, x_view, weight, bias, EPS, out_view)
    mean, invstd = mean.astype(weight.dtype), invstd.astype(weight.dtype)
    dy_view = _layout.same_view(layout, data.dy, axis)
    return lambda: _cpu.backward_train(layout, dy_view, x_view, mean, invstd, weight, out_view)


def torch_available():
    """True if PyTorch can be imported (it is an optional dependency)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# -------------------------------------------------------------- roofline ---
def core_cache_bytes():
    """A core's share of cache: its L2 plus its share of L3 (Linux sysfs; 1 MiB if unknown)."""
    total = 0
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(root)):
            path = os.path.join(root, index)
            if not index.startswith("index"):
                continue
            with open(os.path.join(path, "level")) as f:
                level = int(f.read())
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if level < 2 or kind == "Instruction":
                continue
            with open(os.path.join(path, "size")) as f:
                size = _parse_size(f.read().strip())
            with open(os.path.join(path, "shared_cpu_list")) as f:
                sharers = _count_cpus(f.read().strip())
            total += size // max(1, sharers)
    except (OSError, ValueError):
        return 1 << 20
    return total or (1 << 20)


def _parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _count_cpus(text):
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def channel_bytes(shape, itemsize):
    """Bytes of cache one channel occupies: its contiguous runs, each at least a 64-byte line.

    NCHW: N runs of H*W elements, so about the channel's own size.  Channels
    last: one element per row, but each sits in a cache line shared with its
    neighbours, so a line per row.
    """
    outer = math.prod(shape.dims[: shape.channel_axis])
    inner = math.prod(shape.dims[shape.channel_axis + 1:])
    return outer * max(inner * itemsize, 64)


def minimal_passes(case, cache_bytes):
    """Tensor-sized transfers through DRAM an operation cannot avoid.

    Forward eval reads x and writes y (2); moments reads x (1).  When one
    channel's data (x, and dy for backward) fits in a core's share of cache,
    training forward can compute the statistics and normalise from cache (2:
    read x, write y), and backward likewise (3: read x and dy, write dx);
    otherwise the statistics need a pass of their own (3 and 5).
    """
    if case.operation == "forward_eval":
        return 2
    if case.operation == "moments":
        return 1
    itemsize = np.dtype(case.dtype).itemsize
    if case.operation == "forward_train":
        return 2 if channel_bytes(case.shape, itemsize) <= cache_bytes else 3
    return 3 if 2 * channel_bytes(case.shape, itemsize) <= cache_bytes else 5


def fresh_outputs(operation):
    """Tensor-sized arrays an operation returns newly allocated (page faults on first touch)."""
    return 0 if operation == "moments" else 1


# ---------------------------------------------------------------- timing ---
def _median(samples):
    return float(np.median(samples))


def _time_calls(function, repeats):
    """Seconds of ``repeats`` calls, with the garbage collector off."""
    samples = []
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


def time_interleaved(functions, repeats, rounds, warmup=2):
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
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            time.sleep(0.02)
            function()
            samples[name] += _time_calls(function, repeats)
    return {name: _median(values) for name, values in samples.items()}, samples


# ----------------------------------------------------------- the checks ---
def _as_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().numpy()
    return np.asarray(value)


def check_case(case, data, fastbn_result):
    """Max error of fastbn's outputs against a float64 NumPy oracle, relative to each output's largest value."""
    oracle = types.SimpleNamespace(
        shape=data.shape,
        **{name: getattr(data, name).astype(np.float64)
           for name in ("x", "dy", "weight", "bias", "running_mean", "running_var")},
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


def tolerance(dtype):
    """The core test suite's relative tolerance for outputs of ``dtype`` (tests/strategies.py)."""
    return {"float16": 1e-3, "float32": 1e-5}.get(dtype, 1e-10)


# ------------------------------------------------------------ machine info ---
def machine_info():
    """A dict describing the machine and the libraries' thread counts."""
    import numba

    import fastbn

    # Start fastbn's threading layer before anything asks Numba for threads:
    # numba.get_num_threads() would otherwise start Numba's default layer.
    layer = fastbn.threading_layer()
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "fastbn": fastbn.__version__,
        "fastbn_threads": numba.get_num_threads(),
        "threading_layer": layer,
        "core_cache_bytes": core_cache_bytes(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) * 1024 / 1e9, 1)
    except OSError:
        pass
    caches = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(root):
        for index in sorted(os.listdir(root)):
            try:
                with open(os.path.join(root, index, "level")) as f:
                    level = f.read().strip()
                with open(os.path.join(root, index, "type")) as f:
                    kind = f.read().strip()
                with open(os.path.join(root, index, "size")) as f:
                    size = f.read().strip()
                with open(os.path.join(root, index, "shared_cpu_list")) as f:
                    shared = f.read().strip()
            except OSError:
                continue
            if kind != "Instruction":
                caches.append(f"L{level} {size} (CPUs {shared})")
    info["caches"] = ", ".join(caches)
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        info["load_before"] = round(os.getloadavg()[0], 2)
    return info


# ------------------------------------------------------------- the run ---
class _Progress:
    """tqdm when installed, else a plain counter on stderr."""

    def __init__(self, total, enabled):
        self._bar = None
        self._done = 0
        self._total = total
        self._enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label=""):
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(label[:40])
            self._bar.update(1)
        elif self._enabled:
            print(f"[{self._done}/{self._total}] {label}", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def run_matrix(cases, libraries, repeats, rounds, progress):
    """Time every case; returns a list of result dicts (one per case)."""
    results = []
    by_input = {}
    for case in cases:
        by_input.setdefault((case.shape, case.dtype), []).append(case)
    cache_bytes = core_cache_bytes()
    for (shape, dtype), group in by_input.items():
        data = Inputs(shape, dtype)

        def copy_existing():
            np.copyto(data.copy_target, data.x)

        def copy_fresh():
            # Like every batch-norm call, writes (and returns) a newly
            # allocated array: the OS zeroes each page on its first touch.
            target = np.empty_like(data.x)
            np.copyto(target, data.x)
            return target

        copies, _ = time_interleaved({"copy": copy_existing, "copy_fresh": copy_fresh}, repeats, rounds)
        page_in = max(0.0, copies["copy_fresh"] - copies["copy"])
        bandwidth = 2 * data.nbytes / copies["copy"]
        for case in group:
            functions = {name: LIBRARIES[name](case.operation, data) for name in libraries}
            error = check_case(case, data, functions["fastbn"]())
            reused = _fastbn_reused_callable(case.operation, data)
            if reused is not None:
                functions["reused"] = reused
            times, samples = time_interleaved(functions, repeats, rounds)
            passes = minimal_passes(case, cache_bytes)
            roofline = passes * data.nbytes / bandwidth
            roofline_alloc = roofline + fresh_outputs(case.operation) * page_in
            row = {
                "operation": case.operation,
                "shape": case.shape.label,
                "dims": list(case.shape.dims),
                "axis": case.shape.axis,
                "dtype": case.dtype,
                "bytes": data.nbytes,
                "layout": "channels-last" if case.shape.channels_last else "channel slab",
                "passes": passes,
                "copy_ms": 1e3 * copies["copy"],
                "copy_fresh_ms": 1e3 * copies["copy_fresh"],
                "page_in_ms": 1e3 * page_in,
                "roofline_ms": 1e3 * roofline,
                "roofline_alloc_ms": 1e3 * roofline_alloc,
                "error": error,
                "error_ok": error <= tolerance(case.dtype),
                "samples": len(samples["fastbn"]),
            }
            for name in functions:
                row[f"{name}_ms"] = 1e3 * times[name]
            results.append(evaluate_bar(row))
            progress.step(case.label)
            del functions
            gc.collect()
        del data
        gc.collect()
    return results


def evaluate_bar(row):
    """Add the issue's bar to a result row: which checks apply, and whether each passes."""
    fastbn_ms = row["fastbn_ms"]
    row["gb_s"] = row["passes"] * row["bytes"] / (fastbn_ms / 1e3) / 1e9
    row["roofline_pct"] = 100 * row["roofline_ms"] / fastbn_ms
    row["roofline_alloc_pct"] = 100 * row["roofline_alloc_ms"] / fastbn_ms
    if "numpy_ms" in row:
        row["vs_numpy"] = row["numpy_ms"] / fastbn_ms
    reused_ms = row.get("reused_ms", fastbn_ms)  # moments allocate no output
    row["reused_roofline_pct"] = 100 * row["roofline_ms"] / reused_ms
    checks = {}
    if "torch_ms" in row:
        row["vs_torch"] = row["torch_ms"] / fastbn_ms
        row["vs_torch_reused"] = row["torch_ms"] / reused_ms
        need = BAR_TORCH
        if row["layout"] == "channel slab" and row["operation"] == "forward_train":
            need = BAR_SLAB_FORWARD
        elif row["layout"] == "channel slab" and row["operation"] == "backward_train":
            need = BAR_SLAB_BACKWARD
        checks["torch"] = {"need": need, "ok": row["vs_torch"] >= need, "ok_reused": row["vs_torch_reused"] >= need}
    if row["bytes"] >= BAR_ROOFLINE_MIN_BYTES:
        checks["roofline"] = {"need": 100 * BAR_ROOFLINE, "ok": row["roofline_pct"] >= 100 * BAR_ROOFLINE,
                              "ok_with_page_in": row["roofline_alloc_pct"] >= 100 * BAR_ROOFLINE,
                              "ok_reused": row["reused_roofline_pct"] >= 100 * BAR_ROOFLINE}
    row["checks"] = checks
    return row


def run_size_sweep(repeats, progress, with_torch):
    """fastbn (and PyTorch training forward) against tensor size, float32 (80, C, 56, 56)."""
    points = []
    for channels in SWEEP_CHANNELS:
        shape = Shape((80, channels, 56, 56), 1)
        data = Inputs(shape, "float32", seed=channels)
        functions = {op: _fastbn_callable(op, data) for op in SWEEP_OPERATIONS}
        functions["copy"] = lambda data=data: np.copyto(data.copy_target, data.x)
        if with_torch:
            functions["torch forward_train"] = _torch_callable("forward_train", data)
        # Fewer calls for the big ones: a 400 MB forward is 0.1 s.
        big = data.nbytes > 100 * MB
        times, _ = time_interleaved(functions, max(2, repeats // 2) if big else repeats, 2 if big else 3,
                                    warmup=1)
        points.append({"channels": channels, "bytes": data.nbytes, **{k: 1e3 * v for k, v in times.items()}})
        progress.step(f"size {data.nbytes / MB:.0f} MB")
        del functions, data
        gc.collect()
    return points


def run_thread_sweep(shapes, repeats, rounds, progress, with_torch):
    """fastbn and PyTorch training forward and backward on 1 and 2 threads (float32)."""
    import numba

    default_numba = numba.get_num_threads()
    torch = None
    if with_torch:
        import torch
        default_torch = torch.get_num_threads()
    rows = []
    try:
        for shape in shapes:
            data = Inputs(shape, "float32")
            row = {"shape": shape.label}
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                if torch is not None:
                    torch.set_num_threads(threads)
                functions = {}
                for operation in ("forward_train", "backward_train"):
                    functions[f"fastbn {operation}"] = _fastbn_callable(operation, data)
                    if torch is not None:
                        functions[f"torch {operation}"] = _torch_callable(operation, data)
                times, _ = time_interleaved(functions, repeats, rounds)
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


def measure_compile_time():
    """First and second call of each operation, float32, in a fresh interpreter with an empty kernel cache."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True,
                              env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------- report ---
_NAMES = {"forward_train": "forward, training", "forward_eval": "forward, eval",
          "backward_train": "backward, training", "moments": "moments"}


def _fmt_ms(value):
    return "n/a" if value is None else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def _fmt_x(value):
    return "n/a" if value is None else f"{value:.1f}x"


def _shape_cell(row):
    dims = "x".join(map(str, row["dims"]))
    return f"({dims}), axis {row['axis']}"


def _bar_cell(row):
    parts = []
    torch_check = row["checks"].get("torch")
    if torch_check:
        mark = "pass" if torch_check["ok"] else "**miss**"
        parts.append(f"PyTorch >= {torch_check['need']:.1f}x: {mark}")
    roof = row["checks"].get("roofline")
    if roof:
        mark = "pass" if roof["ok"] else "**miss**"
        alloc = "pass" if roof["ok_with_page_in"] else "**miss**"
        parts.append(f"roofline >= 60%: {mark} ({alloc} with page-in)")
    return "; ".join(parts) if parts else "-"


def results_table(results, libraries, with_bar=True):
    """The main Markdown table, one row per case."""
    header = ["operation", "shape", "dtype", "MB", "fastbn ms", "GB/s", "% roofline", "% roofline + page-in",
              "reused output ms (% roofline)"]
    if "numpy" in libraries:
        header += ["NumPy ms", "vs NumPy"]
    if "torch" in libraries:
        header += ["PyTorch ms", "vs PyTorch"]
    if with_bar:
        header.append("bar")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        cells = [_NAMES[row["operation"]], _shape_cell(row), row["dtype"], f"{row['bytes'] / MB:.1f}",
                 _fmt_ms(row["fastbn_ms"]), f"{row['gb_s']:.1f}", f"{row['roofline_pct']:.0f}%",
                 f"{row['roofline_alloc_pct']:.0f}%",
                 "-" if "reused_ms" not in row else
                 f"{_fmt_ms(row['reused_ms'])} ({row['reused_roofline_pct']:.0f}%)"]
        if "numpy" in libraries:
            cells += [_fmt_ms(row.get("numpy_ms")), _fmt_x(row.get("vs_numpy"))]
        if "torch" in libraries:
            cells += [_fmt_ms(row.get("torch_ms")), _fmt_x(row.get("vs_torch"))]
        if with_bar:
            cells.append(_bar_cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_summary(results):
    """Lines saying, for each part of the bar, how many rows pass and which miss."""
    lines = []
    torch_rows = [r for r in results if "torch" in r["checks"]]
    if torch_rows:
        misses = [r for r in torch_rows if not r["checks"]["torch"]["ok"]]
        lines.append(f"- Speed-up against PyTorch (2x everywhere; 3.5x training forward and 2.5x training backward "
                     f"on channel-slab shapes): {len(torch_rows) - len(misses)} of {len(torch_rows)} rows pass."
                     + ("" if not misses else " Missed: " + "; ".join(
                         f"{_NAMES[r['operation']]} {r['shape']} {r['dtype']} ({r['vs_torch']:.2f}x, "
                         f"needs {r['checks']['torch']['need']:.1f}x)" for r in misses) + "."))
    else:
        lines.append("- Speed-up against PyTorch: not measured (PyTorch is not installed).")
    roof_rows = [r for r in results if "roofline" in r["checks"]]
    if roof_rows:
        misses = [r for r in roof_rows if not r["checks"]["roofline"]["ok"]]
        misses_alloc = [r for r in roof_rows if not r["checks"]["roofline"]["ok_with_page_in"]]
        line = (f"- At least 60% of the minimal-traffic roofline on tensors of 48 MB or more: "
                f"{len(roof_rows) - len(misses)} of {len(roof_rows)} rows pass against the DRAM-only roofline")
        if misses:
            line += " (missed: " + "; ".join(
                f"{_NAMES[r['operation']]} {r['shape']} {r['roofline_pct']:.0f}%" for r in misses) + ")"
        line += (f"; {len(roof_rows) - len(misses_alloc)} of {len(roof_rows)} when the roofline includes paging "
                 "in the freshly allocated output")
        if misses_alloc:
            line += " (missed: " + "; ".join(
                f"{_NAMES[r['operation']]} {r['shape']} {r['roofline_alloc_pct']:.0f}%" for r in misses_alloc) + ")"
        lines.append(line + ".")
    if torch_rows or roof_rows:
        reused_torch = sum(r["checks"]["torch"]["ok_reused"] for r in torch_rows)
        reused_roof = sum(r["checks"]["roofline"]["ok_reused"] for r in roof_rows)
        lines.append(f"- With a reused output buffer instead of a fresh one (the reused-output column: fastbn's kernels "
                     f"without the page-in, i.e. what an `out=` argument would give; not a public call today): "
                     f"{reused_torch} of {len(torch_rows)} rows would pass the PyTorch bar and {reused_roof} of "
                     f"{len(roof_rows)} the roofline bar.")
    bad = [r for r in results if not r["error_ok"]]
    lines.append("- Results against a float64 NumPy oracle: "
                 + ("all within tolerance." if not bad else "**outside tolerance**: " + "; ".join(
                     f"{r['operation']} {r['shape']} {r['dtype']} ({r['error']:.1e})" for r in bad) + "."))
    return "\n".join(lines)


def machine_line(info):
    parts = [f"{info['cpu']}, {info['cpus']} CPUs"]
    if info.get("caches"):
        parts.append(info["caches"])
    if info.get("memory_gb"):
        parts.append(f"{info['memory_gb']} GB RAM")
    threads = f"fastbn {info['fastbn']} on {info['fastbn_threads']} threads (Numba {info['numba']}, " \
              f"{info['threading_layer']} layer)"
    if "torch" in info:
        threads += f", PyTorch {info['torch']} on {info['torch_threads']} threads (its default)"
    return "; ".join(parts) + ". " + threads + f", NumPy {info['numpy']}, Python {info['python']}."


_DEFINITIONS = """\
How to read it:

- **ms**: median wall time of one call through the public API (`fastbn.forward`, `fastbn.backward`,
  `fastbn.moments`), after warm-up calls, so compilation never counts. Like PyTorch and NumPy, every call
  returns a newly allocated output. fastbn takes outputs of 1 MiB or more from its output pool
  (`fastbn/_alloc.py`, off with `FASTBN_POOL_BYTES=0`), so in this loop each reuses the already paged-in memory
  of the previous call's output.
- **GB/s**: the operation's minimal DRAM traffic divided by its time.
- **% roofline**: the minimal-traffic time divided by fastbn's time. The minimal traffic is, in tensor-sized
  passes: forward eval 2 (read x, write y), moments 1; training forward 2 and backward 3 when one channel's data
  fits in a core's share of cache (L2 + L3 / cores), else 3 and 5. It is converted to time at the bandwidth of
  `np.copyto` into an existing array of the same size, measured in the same run.
- **% roofline + page-in**: the same, with the cost of paging in one freshly allocated output added to the
  roofline (measured as `np.copyto` into a new array minus `np.copyto` into an existing one). A new array's pages
  are zeroed by the operating system on first touch; every allocating library pays this.
- **reused output ms**: a diagnostic, not a public call: fastbn's kernels writing into an output allocated and
  touched once beforehand (what an `out=` argument would give), with its fraction of the DRAM roofline.
- **vs NumPy / vs PyTorch**: their median time divided by fastbn's. NumPy is the straightforward whole-array
  formula (`x.mean`, `x.var`, broadcasting); PyTorch is `torch.nn.functional.batch_norm` (with running
  statistics in training), its autograd backward (dx, dweight, dbias), and `torch.var_mean` for the moments.
"""


def findings(results):
    """A paragraph on what bounds the figures, with this run's numbers."""
    from fastbn import _alloc

    big = [r for r in results if r["dtype"] == "float32" and r["page_in_ms"] > 0.2 * r["copy_ms"]]
    lines = []
    if big:
        row = max(big, key=lambda r: r["bytes"])
        lines.append(
            f"Every call returns a newly allocated output, and paging in a fresh {row['bytes'] / MB:.0f} MB array "
            f"(the OS zeroes each page on first touch) took {row['page_in_ms']:.1f} ms here, against "
            f"{row['copy_ms']:.1f} ms to copy the whole tensor into memory already in use. An allocator that "
            "recycles memory avoids it"
            + (": fastbn's output pool does (each call reuses the paged-in memory of the previous, dead output)"
               if _alloc.POOL.cap else "; fastbn's output pool is off here (FASTBN_POOL_BYTES=0), so fastbn pays it")
            + ". Whether a PyTorch call pays it depends on whether its allocator (glibc's malloc) hands back "
            "recycled memory, which this benchmark does not control; a PyTorch time below the DRAM roofline plus "
            "page-in means it did not. It is what separates the DRAM-only roofline column from the one with "
            "page-in, and the reused-output column shows fastbn's kernels without it."
        )
    if any(r.get("torch_ms") for r in results):
        fast = [r for r in results if r.get("torch_ms") and r["torch_ms"] < 2 * r["roofline_ms"]]
        if fast:
            names = "; ".join(f"{_NAMES.get(r['operation'], r['operation'])} {r['shape']} "
                              f"{r['dtype']} ({r['torch_ms']:.2f} ms against a roofline of "
                              f"{r['roofline_ms']:.2f} ms)" for r in fast)
            lines.append(
                "Where PyTorch itself runs in less than twice the minimal-traffic roofline time, running twice as "
                "fast as PyTorch would take more than the memory bandwidth this machine has: in this run, "
                f"{names}."
            )
    half = [r for r in results if r["dtype"] == "float16"]
    if half:
        lines.append(
            "float16 statistics accumulate in float64 like every other dtype (fastbn's numerics policy): "
            "widening each half value to double and the double-precision arithmetic cost more CPU time on "
            "this machine than moving its 2 bytes, so float16 runs at the speed of the arithmetic rather than "
            "of memory. PyTorch accumulates half input in float32."
        )
    return "\n\n".join(lines)


def write_report(out_dir, info, results, libraries, sizes, threads, compile_times, command, charts):
    """Write report.md, README_snippet.md and results.json into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    table = results_table(results, libraries)
    summary = bar_summary(results)
    chart_lines = [f"![{title}]({os.path.basename(path)})" for title, path in charts]
    sections = [
        "# fastbn CPU benchmark", "",
        f"Generated by `{command}` on {info['date']}.", "",
        "Machine: " + machine_line(info),
        f"Load average before the run {info.get('load_before', 'n/a')}, after {info.get('load_after', 'n/a')}.", "",
        table, "", _DEFINITIONS, findings(results), "", "## The bar", "", summary, "",
    ]
    sections += _copy_section(results)
    if compile_times:
        sections += _compile_section(compile_times)
    if threads:
        sections += _thread_section(threads)
    if sizes:
        sections += _size_section(sizes)
    sections += ["## Charts", ""] + chart_lines
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(sections) + "\n")

    snippet_dir = _display_path(out_dir)
    snippet = [
        "## Performance", "",
        f"<!-- Generated by `{command}` ({info['date']}); regenerate rather than edit. -->", "",
        "Measured on " + machine_line(info), "",
        results_table(results, libraries, with_bar=False), "",
        _DEFINITIONS,
        findings(results), "",
        "Against the bar set for this release (at least 2x PyTorch everywhere; 3.5x training forward and 2.5x "
        "training backward on channel-slab shapes; 60% of the roofline on tensors of 48 MB or more):", "",
        summary, "",
    ]
    snippet += [f"![{title}]({snippet_dir}/{os.path.basename(path)})" for title, path in charts]
    snippet += ["", f"Full report, thread and size sweeps and compile times: `{snippet_dir}/report.md`. "
                    f"Reproduce with `{command}`."]
    snippet_path = os.path.join(out_dir, "README_snippet.md")
    with open(snippet_path, "w") as f:
        f.write("\n".join(snippet) + "\n")

    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump({"command": command, "machine": info, "results": results, "sizes": sizes, "threads": threads,
                   "compile": compile_times}, f, indent=1)
    return report, snippet_path, json_path


def _display_path(path):
    relative = os.path.relpath(os.path.abspath(path), os.getcwd())
    return path if relative.startswith("..") else relative


def _copy_section(results):
    seen = {}
    for row in results:
        seen.setdefault((row["shape"], row["dtype"]), row)
    lines = ["## The copy the roofline is measured with", "",
             "| shape | dtype | MB | `np.copyto` into an existing array, ms | GB/s (read + write) | "
             "into a new array, ms | page-in of one output, ms |", "|---|---|---|---|---|---|---|"]
    for row in seen.values():
        lines.append(f"| {_shape_cell(row)} | {row['dtype']} | {row['bytes'] / MB:.1f} | {_fmt_ms(row['copy_ms'])} | "
                     f"{2 * row['bytes'] / row['copy_ms'] / 1e6:.1f} | {_fmt_ms(row['copy_fresh_ms'])} | "
                     f"{_fmt_ms(row['page_in_ms'])} |")
    return lines + [""]


def _compile_section(compile_times):
    lines = ["## Compile time", ""]
    if "error" in compile_times:
        return lines + [f"Not measured: {compile_times['error']}", ""]
    lines += ["First call of each operation in a fresh interpreter with an empty Numba cache (float32, "
              f"small input; it compiles the kernels that call needs), then a second call. `import fastbn`: "
              f"{1e3 * compile_times['import']:.0f} ms.", "",
              "| operation | first call (compiles) | second call |", "|---|---|---|"]
    for name, value in compile_times.items():
        if name == "import":
            continue
        first, second = value
        lines.append(f"| {name} | {first:.2f} s | {1e3 * second:.2f} ms |")
    return lines + [""]


def _thread_section(threads):
    names = [k for k in threads[0] if k != "shape"]
    lines = ["## Thread count", "", "Median ms, float32, each library limited to 1 and to 2 threads.", "",
             "| shape | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in threads:
        lines.append(f"| {row['shape']} | " + " | ".join(_fmt_ms(row.get(n)) for n in names) + " |")
    return lines + [""]


def _size_section(sizes):
    names = [k for k in sizes[0] if k not in ("channels", "bytes")]
    lines = ["## Tensor size", "", "Median ms, float32 (80, C, 56, 56), fastbn on its default threads.", "",
             "| MB | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in sizes:
        lines.append(f"| {row['bytes'] / MB:.0f} | " + " | ".join(_fmt_ms(row.get(n)) for n in names) + " |")
    return lines + [""]


# ---------------------------------------------------------------- charts ---
def write_charts(out_dir, results, libraries, sizes, threads):
    """Write bench.png (and scaling.png with the sweeps); returns [(title, path)], [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("python -m fastbn bench: matplotlib is not installed, so no chart was drawn "
              "(pip install matplotlib)", file=sys.stderr)
        return []
    charts = []
    labels = [f"{_NAMES[r['operation']]}\n{r['shape']} {r['dtype']}" for r in results]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(results) + 1.5))
    positions = np.arange(len(results))
    series = [("fastbn", "fastbn_ms", "#1f77b4")]
    if "torch" in libraries:
        series.append(("PyTorch", "torch_ms", "#d62728"))
    if "numpy" in libraries:
        series.append(("NumPy", "numpy_ms", "#7f7f7f"))
    height = 0.8 / len(series)
    for k, (name, key, color) in enumerate(series):
        values = [r.get(key, np.nan) for r in results]
        ax.barh(positions + (k - (len(series) - 1) / 2) * height, values, height, label=name, color=color)
    ax.scatter([r["roofline_ms"] for r in results], positions, marker="|", s=300, color="black", zorder=3,
               label="roofline (minimal DRAM traffic)")
    ax.scatter([r["roofline_alloc_ms"] for r in results], positions, marker="|", s=300, color="#999999",
               zorder=3, label="roofline + paging in a fresh output")
    ax.set_yticks(positions, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per call (median, log scale)")
    ax.set_title("Batch norm on the CPU: fastbn, PyTorch, NumPy and the memory roofline", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.6 / len(results) - 0.02), ncol=3)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    path = os.path.join(out_dir, "bench.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    charts.append(("fastbn, PyTorch and NumPy against the roofline", path))

    if sizes or threads:
        panels = [p for p in (sizes, threads) if p]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        axes = axes[0]
        panel = 0
        if sizes:
            ax = axes[panel]
            panel += 1
            megabytes = np.array([p["bytes"] / MB for p in sizes])
            for name in [k for k in sizes[0] if k not in ("channels", "bytes")]:
                style = "--" if name.startswith("torch") or name == "copy" else "-"
                ax.plot(megabytes, [p[name] for p in sizes], style, marker="o", markersize=3,
                        label=name if name != "copy" else "np.copyto (roofline pace)")
            reference = np.array([megabytes[0], megabytes[-1]])
            ref_time = sizes[-1]["forward_train"] * reference / megabytes[-1]
            ax.plot(reference, ref_time, ":", color="black", label="linear growth")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tensor size, MB (float32 (80, C, 56, 56))")
            ax.set_ylabel("ms per call (median)")
            ax.set_title("Time against tensor size", fontsize=10)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both")
        if threads:
            ax = axes[panel]
            names = [k[: -len(" @1")] for k in threads[0] if k.endswith(" @1")]
            width = 0.8 / (2 * len(names))
            positions = np.arange(len(threads))
            k = 0
            for name in names:
                for count in (1, 2):
                    values = [row.get(f"{name} @{count}", np.nan) for row in threads]
                    ax.bar(positions + (k - (2 * len(names) - 1) / 2) * width, values, width,
                           label=f"{name}, {count} thread{'s' if count > 1 else ''}",
                           alpha=0.55 if count == 1 else 1.0,
                           color=f"C{names.index(name)}")
                    k += 1
            ax.set_xticks(positions, [row["shape"] for row in threads], fontsize=7, rotation=15)
            ax.set_ylabel("ms per call (median)")
            ax.set_title("Time against thread count (1 and 2)", fontsize=10)
            ax.legend(fontsize=6, ncol=2)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        charts.append(("time against tensor size and thread count", path))
    return charts


# ------------------------------------------------------------------ CLI ---
def add_parser(commands):
    """Add the ``bench`` subcommand to ``python -m fastbn``'s subparsers."""
    parser = commands.add_parser(
        "bench", help="benchmark against NumPy, PyTorch and the memory roofline; write a report",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--ops", type=_comma_list(_operation), default=list(OPERATIONS), metavar="OP[,OP...]",
                        help=f"operations to time, from {', '.join(OPERATIONS)} (default: all)")
    parser.add_argument("--shapes", type=_comma_list(parse_shape), default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="SHAPE[,SHAPE...]",
                        help="shapes as sizes joined by 'x', '@axis' for a channel axis other than 1 "
                             f"(default: {','.join(DEFAULT_SHAPES)})")
    parser.add_argument("--dtypes", type=_comma_list(_dtype), default=list(DTYPES), metavar="DTYPE[,DTYPE...]",
                        help="float32 for every operation, float16 for training forward (default: both)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds in which the libraries take turns (default 3); the median is over "
                             "repeats x rounds calls")
    parser.add_argument("--out", default=os.path.join("bench", "results"),
                        help="directory for report.md, README_snippet.md, results.json and the charts "
                             "(default bench/results)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if it is installed")
    parser.add_argument("--no-numpy", action="store_true", help="leave the NumPy implementation out")
    parser.add_argument("--no-sweeps", action="store_true",
                        help="skip the size (1-400 MB) and thread-count sweeps")
    parser.add_argument("--no-compile-time", action="store_true",
                        help="skip measuring compile time in a fresh interpreter")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args):
    """Run the benchmark the parsed ``args`` describe; return a process exit code."""
    if args.rounds < 1:
        print("python -m fastbn bench: error: --rounds: expected a positive integer", file=sys.stderr)
        return 2
    import fastbn

    fastbn.threading_layer()  # before PyTorch or anything else starts threads (see machine_info)
    libraries = ["fastbn"]
    if not args.no_numpy:
        libraries.append("numpy")
    with_torch = not args.no_torch and torch_available()
    if with_torch:
        libraries.append("torch")
    elif not args.no_torch:
        print("python -m fastbn bench: PyTorch is not installed; its columns are left out "
              "(pip install 'fastbn[torch]')", file=sys.stderr)
    cases = build_cases(args.ops, args.shapes, args.dtypes)
    if not cases:
        print("python -m fastbn bench: error: nothing to run (float16 is timed for forward_train only)",
              file=sys.stderr)
        return 2
    command = _command_line(args)
    info = machine_info()
    sweep_shapes = [s for s in args.shapes]
    steps = len(cases) + (0 if args.no_sweeps else len(SWEEP_CHANNELS) + 2 * len(sweep_shapes))
    progress = _Progress(steps, not args.no_progress)
    try:
        results = run_matrix(cases, libraries, args.repeats, args.rounds, progress)
        sizes = threads = None
        if not args.no_sweeps:
            sizes = run_size_sweep(args.repeats, progress, with_torch)
            threads = run_thread_sweep(sweep_shapes, args.repeats, args.rounds, progress, with_torch)
    finally:
        progress.close()
    compile_times = None if args.no_compile_time else measure_compile_time()
    if hasattr(os, "getloadavg"):
        info["load_after"] = round(os.getloadavg()[0], 2)
    os.makedirs(args.out, exist_ok=True)
    charts = write_charts(args.out, results, libraries, sizes, threads)
    report, snippet, json_path = write_report(args.out, info, results, libraries, sizes, threads, compile_times,
                                              command, charts)
    print(results_table(results, libraries))
    print()
    print(bar_summary(results))
    print()
    print(f"Wrote {report}, {snippet}, {json_path}" + "".join(f", {path}" for _, path in charts))
    return 0


def _command_line(args):
    """The ``python -m fastbn bench`` command that reproduces ``args`` (defaults left out)."""
    words = ["python -m fastbn bench"]
    if list(args.ops) != list(OPERATIONS):
        words.append("--ops " + ",".join(args.ops))
    if [s.label for s in args.shapes] != list(DEFAULT_SHAPES):
        words.append("--shapes " + ",".join(s.label for s in args.shapes))
    if list(args.dtypes) != list(DTYPES):
        words.append("--dtypes " + ",".join(args.dtypes))
    for name, default in (("repeats", 5), ("rounds", 3)):
        if getattr(args, name) != default:
            words.append(f"--{name} {getattr(args, name)}")
    if os.path.normpath(args.out) != os.path.join("bench", "results"):
        words.append(f"--out {args.out}")
    for flag in ("no_torch", "no_numpy", "no_sweeps", "no_compile_time"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    return " ".join(words)
