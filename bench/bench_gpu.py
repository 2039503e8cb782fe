"""GPU benchmarks: fastbn's CUDA kernels against cuDNN (``torch.nn.functional.batch_norm`` on
CUDA) and against the device-memory roofline.

Run on a machine with an NVIDIA GPU::

    python -m pytest bench -k bench_gpu --benchmark-only -p no:cacheprovider

Name the directory, not this file: bench/conftest.py collects every ``bench_*.py`` module
itself (pyproject's ``testpaths`` is tests/ and pytest's own pattern is ``test_*.py``), and a
file named on the command line is collected by pytest as well, so ``python -m pytest
bench/bench_gpu.py`` would collect and run every benchmark here twice.  ``python -m fastbn
gpu-check`` runs this command (with ``--benchmark-json``) and turns the figures into a table.

Every module-level skip below is clean: without a usable GPU (or under the CUDA
simulator) nothing runs; without a CUDA build of PyTorch only the cuDNN
comparisons are skipped.  No figure from this file has been measured on hardware yet (nor
has the event timing below run on one): until someone runs it on a GPU, fastbn's GPU speed
is unknown.

How each figure is timed
------------------------
Every GPU figure is CUDA-event time, not host time: each benchmark is marked with a
custom pytest-benchmark *timer* (``@pytest.mark.benchmark(timer=...)``, an
:class:`EventClock`) that records a CUDA event and waits for it each time pytest-benchmark
reads the clock, so the duration it stores between two readings is
``event_elapsed_time(before, after)``: the device time of the call's kernels, and of any gap
between them in which the device waited for the host to launch the next one.  The harness
is ``benchmark.pedantic`` with ``iterations=1``: one call per round, a fixed number of
rounds after warm-up rounds (compilation and cuDNN's autotuning never count), and a setup
before each round, outside the timing, that evicts the L2 cache by copying a buffer twice
its size, so that no round reads its input from the previous round's L2 (several of the
shapes below fit in the 50-60 MB L2 of an H100 or H200).  The events are recorded on the
stream the work runs on: on Numba device arrays made on no stream, fastbn launches on Numba's
default stream, where numba-cuda's events (:func:`numba.cuda.event`) are recorded; on PyTorch
tensors (cuDNN's figures, and the fused forms', where fastbn too launches on PyTorch's current
stream) the clock records :class:`torch.cuda.Event` on ``torch.cuda.current_stream()``.

What each figure is
-------------------
* ``fastbn`` / ``cudnn``: one training forward, or one backward.  For float64 PyTorch does
  not call cuDNN (which has no double-precision batch norm) but its own CUDA kernels; the
  figure is still labelled ``cudnn``, PyTorch's batch norm on CUDA.
* ``roofline``: the best of several device-to-device copies of a buffer much larger than the
  L2 cache, timed with events: the bandwidth that a memory-bound kernel can reach at best.
  It is measured once per run (a module-scoped fixture) and every fastbn figure records in
  ``extra_info`` the bytes its kernels must move at least (``min_bytes_moved``), the copy's
  bandwidth (``roofline_bytes_per_s``) and the copy's time for those bytes
  (``roofline_ms``); the ``test_roofline_copy`` figure is the same copy under the harness.
* ``first call``: compilation of every kernel a forward and backward need, in a fresh
  process.  This one is host wall time (``time.perf_counter`` in the child process, and
  pytest-benchmark's default timer around it): compilation happens on the host.

Every figure's ``extra_info`` also names its operation (``op``), its shape (``case``) and
what ran (``impl``: ``fastbn``, ``cudnn``, ``fastbn-separate``, ...), which is what
``python -m fastbn gpu-check`` reads to build its table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the CUDA simulator is on: GPU timings would be meaningless", allow_module_level=True)
try:
    from fastbn.backends.cuda import target
except ImportError as exc:  # no CUDA target installed (pip install fastbn[cuda])
    pytest.skip(f"no CUDA target: {exc}", allow_module_level=True)
if not target.is_available():
    pytest.skip("no usable CUDA GPU", allow_module_level=True)

import fastbn

cuda = target.cuda

# (id, shape, channel axis, dtype): the CPU reference shape in both memory
# patterns, a wide (N, C) matrix, and half precision.
CASES = [
    ("nchw-64x64x56x56-f32", (64, 64, 56, 56), 1, np.float32),
    ("nhwc-64x56x56x64-f32", (64, 56, 56, 64), -1, np.float32),
    ("nc-4096x1024-f32", (4096, 1024), 1, np.float32),
    ("nchw-64x64x56x56-f16", (64, 64, 56, 56), 1, np.float16),
    ("nchw-32x256x28x28-f64", (32, 256, 28, 28), 1, np.float64),
]
IDS = [case[0] for case in CASES]

#: Timed rounds and warm-up rounds of every GPU figure (one call each).
ROUNDS = 30
WARMUP_ROUNDS = 3
#: Device-to-device copies of the roofline; the best one counts.
COPY_REPEATS = 10


class EventClock:
    """A pytest-benchmark timer that reads CUDA events instead of the host's clock.

    Each call records an event on the stream, waits for it, and returns the device time
    elapsed since the first call, as the sum of the event-to-event intervals in float64
    seconds.  pytest-benchmark reads the clock before and after the timed call and stores the
    difference, which is therefore exactly ``event_elapsed_time(before, after)`` (no float32
    rounding of a long-running total: each interval is taken between consecutive events).

    Parameters
    ----------
    kind : {"numba", "torch"}
        Whose events: numba-cuda's on Numba's default stream (where fastbn launches for Numba
        device arrays made on no stream), or PyTorch's on its current stream (where PyTorch's
        kernels, and fastbn's for PyTorch tensors, run).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._last = None
        self._seconds = 0.0

    def __repr__(self) -> str:  # the name pytest-benchmark writes as the timer in its JSON
        return f"cuda-events({self.kind})"

    def _record(self):
        if self.kind == "torch":
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream())
        else:
            event = cuda.event(timing=True)
            event.record(stream=0)
        event.synchronize()
        return event

    def _elapsed_ms(self, start, end) -> float:
        if self.kind == "torch":
            return float(start.elapsed_time(end))
        return float(cuda.event_elapsed_time(start, end))

    def __call__(self) -> float:
        event = self._record()
        if self._last is not None:
            self._seconds += 1e-3 * self._elapsed_ms(self._last, event)
        self._last = event
        return self._seconds


NUMBA_EVENTS = EventClock("numba")
TORCH_EVENTS = EventClock("torch")
on_numba_events = pytest.mark.benchmark(timer=NUMBA_EVENTS)
on_torch_events = pytest.mark.benchmark(timer=TORCH_EVENTS)


def _l2_bytes():
    try:
        return int(cuda.get_current_device().L2_CACHE_SIZE)
    except Exception:  # an attribute this driver binding lacks: assume a large L2 (H100: 50 MB)
        return 64 << 20


_FLUSH = {}


def _evict_l2():
    """Copy a buffer of twice the L2 cache's size: whatever a previous round left in L2 is evicted."""
    if not _FLUSH:
        nbytes = 2 * _l2_bytes()
        _FLUSH["source"] = cuda.device_array(nbytes, np.uint8)
        _FLUSH["destination"] = cuda.device_array(nbytes, np.uint8)
    _FLUSH["destination"].copy_to_device(_FLUSH["source"])


def _time(benchmark, run, group, op, case, impl):
    """Time ``run`` under the harness (see the module docstring) and label the figure."""
    benchmark.group = group
    benchmark.extra_info.update(op=op, case=case, impl=impl)
    benchmark.pedantic(run, setup=_evict_l2, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


@pytest.fixture(scope="module")
def roofline():
    """The copy roofline of this run: the best of COPY_REPEATS event-timed device-to-device copies.

    The buffer is at least 8 times the L2 cache and 512 MiB (less only where free memory is
    short), so that the copy streams from and to device memory, not L2.
    """
    free, _ = cuda.current_context().get_memory_info()
    nbytes = min(max(8 * _l2_bytes(), 512 << 20), free // 4)
    source = cuda.device_array(nbytes, np.uint8)
    destination = cuda.device_array(nbytes, np.uint8)
    destination.copy_to_device(source)  # first touch
    times = []
    for _ in range(COPY_REPEATS):
        start, end = cuda.event(timing=True), cuda.event(timing=True)
        start.record(stream=0)
        destination.copy_to_device(source)
        end.record(stream=0)
        end.synchronize()
        times.append(1e-3 * cuda.event_elapsed_time(start, end))
    best = min(times)
    return {
        "copy_bytes": nbytes,
        "bytes_moved": 2 * nbytes,  # read + write
        "bytes_per_s": 2 * nbytes / best,
        "best_s": best,
        "repeats": COPY_REPEATS,
        "l2_bytes": _l2_bytes(),
        "source": source,
        "destination": destination,
    }


def _record(benchmark, roofline, moved_bytes):
    """extra_info: the bytes the kernels must move at least, and the roofline's bandwidth and time for them."""
    benchmark.extra_info["min_bytes_moved"] = int(moved_bytes)
    benchmark.extra_info["roofline_bytes_per_s"] = roofline["bytes_per_s"]
    benchmark.extra_info["roofline_ms"] = 1e3 * moved_bytes / roofline["bytes_per_s"]


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _device(array):
    return cuda.to_device(np.ascontiguousarray(array))


def _inputs(shape, axis, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape, np.float32) * 2 + 3).astype(dtype)
    channels = shape[axis]
    stats = np.float64 if dtype == np.float64 else np.float32
    weight = rng.uniform(0.5, 1.5, channels).astype(stats)
    bias = rng.standard_normal(channels).astype(stats)
    dy = rng.standard_normal(shape, np.float32).astype(dtype)
    return x, weight, bias, dy


@on_numba_events
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fastbn_forward(benchmark, roofline, case):
    name, shape, axis, dtype = case
    x, weight, bias, _ = _inputs(shape, axis, dtype)
    x_d, w_d, b_d = _device(x), _device(weight), _device(bias)
    _time(benchmark, lambda: fastbn.forward(x_d, w_d, b_d, axis=axis), f"forward {name}", "forward", name, "fastbn")
    # statistics read x, normalize reads it again and writes y
    _record(benchmark, roofline, 3 * x.nbytes)


@on_numba_events
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fastbn_backward(benchmark, roofline, case):
    name, shape, axis, dtype = case
    x, weight, bias, dy = _inputs(shape, axis, dtype)
    x_d, w_d, b_d, dy_d = _device(x), _device(weight), _device(bias), _device(dy)
    _, saved = fastbn.forward(x_d, w_d, b_d, axis=axis)
    run = lambda: fastbn.backward(dy_d, x_d, w_d, saved, axis=axis)  # noqa: E731
    _time(benchmark, run, f"backward {name}", "backward", name, "fastbn")
    # the reduction reads dy and x, the elementwise kernel reads both again and writes dx
    _record(benchmark, roofline, 5 * x.nbytes)


def _torch_tensors(torch, case):
    _, shape, axis, dtype = case
    x, weight, bias, dy = _inputs(shape, axis, dtype)
    channels_last = axis == -1 and len(shape) == 4
    if channels_last:  # the same logical NCHW tensor, stored channels-last
        x, dy = np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1)
    device = torch.device("cuda")
    memory = torch.channels_last if channels_last else torch.contiguous_format

    def as_tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device).contiguous(memory_format=memory)

    return as_tensor(x), torch.from_numpy(weight).to(device), torch.from_numpy(bias).to(device), as_tensor(dy)


@on_torch_events
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cudnn_forward(benchmark, case):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("no CUDA build of PyTorch")
    # float16 input with float32 weight and bias, as for fastbn: cuDNN's mixed-precision mode
    x, weight, bias, _ = _torch_tensors(torch, case)
    functional = torch.nn.functional
    run = lambda: functional.batch_norm(x, None, None, weight, bias, training=True)  # noqa: E731
    _time(benchmark, run, f"forward {case[0]}", "forward", case[0], "cudnn")


@on_torch_events
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cudnn_backward(benchmark, case):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("no CUDA build of PyTorch")
    x, weight, bias, dy = _torch_tensors(torch, case)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)
    run = lambda: torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True)  # noqa: E731
    _time(benchmark, run, f"backward {case[0]}", "backward", case[0], "cudnn")


@on_numba_events
def test_roofline_copy(benchmark, roofline):
    """The roofline's copy under the harness: one device-to-device copy of the large buffer per round."""
    source, destination = roofline["source"], roofline["destination"]
    benchmark.group = "roofline"
    benchmark.extra_info.update(
        op="copy",
        case=f"{roofline['copy_bytes'] >> 20} MiB",
        impl="roofline",
        bytes_moved=roofline["bytes_moved"],
        best_bytes_per_s=roofline["bytes_per_s"],
        repeats=roofline["repeats"],
        l2_bytes=roofline["l2_bytes"],
    )
    run = lambda: destination.copy_to_device(source)  # noqa: E731
    benchmark.pedantic(run, rounds=COPY_REPEATS, warmup_rounds=1, iterations=1)


_FIRST_CALL = """
import json, time
import numpy as np
from fastbn.backends.cuda import target
import fastbn
cuda = target.cuda
x = cuda.to_device(np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.{dtype}))
cuda.synchronize()
t0 = time.perf_counter()
y, saved = fastbn.forward(x)
fastbn.backward(x, x, None, saved)
cuda.synchronize()
t1 = time.perf_counter()
y, saved = fastbn.forward(x)
fastbn.backward(x, x, None, saved)
cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({{"first": t1 - t0, "second": t2 - t1}}))
"""


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_first_call_compiles(benchmark, dtype):
    """Compilation of a forward's and a backward's kernels, in a fresh process (host wall time)."""

    def fresh_process():
        proc = subprocess.run(
            [sys.executable, "-c", _FIRST_CALL.format(dtype=dtype)], capture_output=True, text=True, check=True
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])

    benchmark.group = "first call (compilation)"
    result = benchmark.pedantic(fresh_process, rounds=1, iterations=1)
    benchmark.extra_info.update(
        op="first call", case=dtype, impl="fastbn", first_call_s=result["first"], second_call_s=result["second"]
    )


# --------------------------------------------------------- fused forms ---
# relu(BN(x) + z) and its backward, fused in fastbn's passes, against the same
# work as separate calls: fastbn's BN, then PyTorch's in-place add and ReLU on
# the same tensors; and against cuDNN's batch norm followed by the same add and
# ReLU.  PyTorch (CUDA) provides the separate elementwise steps.  The fused
# figures' clock is PyTorch's: on PyTorch tensors fastbn launches on PyTorch's
# current stream.
FUSED_CASES = [case for case in CASES if case[3] == np.float32]
FUSED_IDS = [case[0] for case in FUSED_CASES]
_IMPL = {"fastbn-fused": "fastbn", "cudnn-separate": "cudnn"}


@on_torch_events
@pytest.mark.parametrize("case", FUSED_CASES, ids=FUSED_IDS)
@pytest.mark.parametrize("form", ["fastbn-fused", "fastbn-separate", "cudnn-separate"])
def test_add_relu_forward(benchmark, roofline, case, form):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("no CUDA build of PyTorch (needed for the separate add and ReLU)")
    x, weight, bias, _ = _torch_tensors(torch, case)
    z = torch.randn_like(x)
    axis = 1  # torch tensors are logical NCHW (channels-last in memory for the nhwc case)
    functional = torch.nn.functional
    if form == "fastbn-fused":
        run = lambda: fastbn.forward(x, weight, bias, axis=axis, residual=z, activation="relu")  # noqa: E731
    elif form == "fastbn-separate":
        run = lambda: fastbn.forward(x, weight, bias, axis=axis)[0].add_(z).relu_()  # noqa: E731
    else:
        run = lambda: functional.batch_norm(x, None, None, weight, bias, training=True).add_(z).relu_()  # noqa: E731
    group = f"forward add+relu {case[0]}"
    _time(benchmark, run, group, "forward add+relu", case[0], _IMPL.get(form, form))
    if form == "fastbn-fused":  # statistics read x; the elementwise pass reads x and z and writes y
        _record(benchmark, roofline, 4 * x.numel() * x.element_size())


@on_torch_events
@pytest.mark.parametrize("case", FUSED_CASES, ids=FUSED_IDS)
@pytest.mark.parametrize("form", ["fastbn-fused", "fastbn-separate"])
def test_add_relu_backward(benchmark, roofline, case, form):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("no CUDA build of PyTorch (needed for the separate mask)")
    x, weight, bias, dy = _torch_tensors(torch, case)
    z = torch.randn_like(x)
    y, saved = fastbn.forward(x, weight, bias, residual=z, activation="relu")
    _, plain = fastbn.forward(x, weight, bias)
    if form == "fastbn-fused":
        run = lambda: fastbn.backward(dy, x, weight, saved, y=y)  # noqa: E731
    else:

        def run():
            g = dy * (y > 0)
            return (*fastbn.backward(g, x, weight, plain), g)

    group = f"backward add+relu {case[0]}"
    _time(benchmark, run, group, "backward add+relu", case[0], _IMPL.get(form, form))
    if form == "fastbn-fused":  # the reduction reads dy, x and y (the mask); the elementwise pass reads
        # them again and writes dx and the residual's gradient
        _record(benchmark, roofline, 8 * x.numel() * x.element_size())
