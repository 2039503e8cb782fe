"""GPU benchmarks: fastbn's CUDA kernels against cuDNN (``torch.nn.functional.batch_norm`` on
CUDA) and against the device-memory roofline.

Run on a machine with an NVIDIA GPU::

    python -m pytest bench/bench_gpu.py --benchmark-only

Every module-level skip below is clean: without a usable GPU (or under the CUDA
simulator) nothing runs; without a CUDA build of PyTorch only the cuDNN
comparisons are skipped.  No figure from this file has been measured on
hardware yet: until someone runs it on a GPU, fastbn's GPU speed is unknown.

What each figure is
-------------------
* ``fastbn`` / ``cudnn``: one training forward, or one backward, after warm-up
  (compilation and cuDNN's autotuning never count), synchronised with the
  device so that the time covers the kernels, not just their launch.
* ``roofline``: a device-to-device copy of the same number of bytes (read +
  write), the fastest any memory-bound kernel can move them.  Each fastbn
  figure also records in ``extra_info`` the bytes its kernels must move at
  least and the copy's time for those bytes.
* ``first call``: compilation of every kernel a forward and backward need,
  measured on its own in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _synchronised(func):
    def run():
        func()
        cuda.synchronize()

    return run


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


def _copy_seconds(nbytes, repeats=20):
    """Median time of a device-to-device copy of ``nbytes`` (read + write): the memory roofline."""
    source = cuda.device_array(nbytes, np.uint8)
    destination = cuda.device_array(nbytes, np.uint8)
    destination.copy_to_device(source)
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        destination.copy_to_device(source)
        cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _record(benchmark, moved_bytes, copied_bytes):
    """extra_info: the bytes the kernels must move at least, and the roofline time for them."""
    copy = _copy_seconds(copied_bytes)
    benchmark.extra_info["min_bytes_moved"] = moved_bytes
    benchmark.extra_info["roofline_ms"] = 1e3 * copy * moved_bytes / (2 * copied_bytes)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fastbn_forward(benchmark, case):
    _, shape, axis, dtype = case
    x, weight, bias, _ = _inputs(shape, axis, dtype)
    x_d, w_d, b_d = _device(x), _device(weight), _device(bias)
    run = _synchronised(lambda: fastbn.forward(x_d, w_d, b_d, axis=axis))
    run()  # warm-up: compiles the kernels
    benchmark.group = f"forward {case[0]}"
    benchmark(run)
    # statistics read x, normalize reads it again and writes y
    _record(benchmark, 3 * x.nbytes, x.nbytes)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fastbn_backward(benchmark, case):
    _, shape, axis, dtype = case
    x, weight, bias, dy = _inputs(shape, axis, dtype)
    x_d, w_d, b_d, dy_d = _device(x), _device(weight), _device(bias), _device(dy)
    _, saved = fastbn.forward(x_d, w_d, b_d, axis=axis)
    run = _synchronised(lambda: fastbn.backward(dy_d, x_d, w_d, saved, axis=axis))
    run()
    benchmark.group = f"backward {case[0]}"
    benchmark(run)
    # the reduction reads dy and x, the elementwise kernel reads both again and writes dx
    _record(benchmark, 5 * x.nbytes, x.nbytes)


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


def _time_with_torch(benchmark, torch, run, group):
    """Warm ``run`` up (compilation, cuDNN heuristics), then time it synchronised with the device."""
    sync = torch.cuda.synchronize
    for _ in range(3):
        run()
    sync()
    benchmark.group = group
    benchmark(lambda: (run(), sync()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cudnn_forward(benchmark, case):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("no CUDA build of PyTorch")
    # float16 input with float32 weight and bias, as for fastbn: cuDNN's mixed-precision mode
    x, weight, bias, _ = _torch_tensors(torch, case)
    functional = torch.nn.functional
    run = lambda: functional.batch_norm(x, None, None, weight, bias, training=True)  # noqa: E731
    _time_with_torch(benchmark, torch, run, f"forward {case[0]}")


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
    _time_with_torch(benchmark, torch, run, f"backward {case[0]}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_roofline_copy(benchmark, case):
    """A device-to-device copy of x's bytes: the memory-bound floor of one read and one write."""
    _, shape, _, dtype = case
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    source = cuda.device_array(nbytes, np.uint8)
    destination = cuda.device_array(nbytes, np.uint8)
    run = _synchronised(lambda: destination.copy_to_device(source))
    run()
    benchmark.group = f"roofline {case[0]}"
    benchmark(run)
    benchmark.extra_info["bytes_moved"] = 2 * nbytes


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
    """Compilation of a forward's and a backward's kernels, in a fresh process (its own figure)."""

    def fresh_process():
        proc = subprocess.run(
            [sys.executable, "-c", _FIRST_CALL.format(dtype=dtype)], capture_output=True, text=True, check=True
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(fresh_process, rounds=1, iterations=1)
    benchmark.group = "first call (compilation)"
    benchmark.extra_info.update(first_call_s=result["first"], second_call_s=result["second"])


# --------------------------------------------------------- fused forms ---
# relu(BN(x) + z) and its backward, fused in fastbn's passes, against the same
# work as separate calls: fastbn's BN, then PyTorch's in-place add and ReLU on
# the same tensors; and against cuDNN's batch norm followed by the same add and
# ReLU.  PyTorch (CUDA) provides the separate elementwise steps.
FUSED_CASES = [case for case in CASES if case[3] == np.float32]
FUSED_IDS = [case[0] for case in FUSED_CASES]


@pytest.mark.parametrize("case", FUSED_CASES, ids=FUSED_IDS)
@pytest.mark.parametrize("form", ["fastbn-fused", "fastbn-separate", "cudnn-separate"])
def test_add_relu_forward(benchmark, case, form):
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
    _time_with_torch(benchmark, torch, run, f"forward add+relu {case[0]}")


@pytest.mark.parametrize("case", FUSED_CASES, ids=FUSED_IDS)
@pytest.mark.parametrize("form", ["fastbn-fused", "fastbn-separate"])
def test_add_relu_backward(benchmark, case, form):
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

    _time_with_torch(benchmark, torch, run, f"backward add+relu {case[0]}")
