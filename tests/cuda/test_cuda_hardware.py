"""Numba device arrays on a real GPU: streams, fastbn's pool, no device synchronisation
(collected only with FASTBN_GPU_TESTS=1; the simulator has no streams to order)."""

from __future__ import annotations

import numpy as np

import fastbn
from fastbn.backends.cuda import context, plan, target

from gpu_arrays import host

cuda = target.cuda


def _x():
    return np.random.default_rng(0).normal(2.0, 3.0, (16, 4, 8, 8)).astype(np.float32)


def test_an_array_made_on_a_stream_is_processed_on_that_stream(monkeypatch):
    monkeypatch.setattr(plan, "LAUNCH_LOG", [])
    monkeypatch.setattr(plan, "LAUNCH_STREAMS", [])
    stream = cuda.stream()
    x = cuda.to_device(_x(), stream=stream)
    y, saved = fastbn.forward(x)
    fastbn.backward(y, x, None, saved)
    handles = {context._handle(s) for s in plan.LAUNCH_STREAMS}
    assert handles == {context._handle(stream)}, handles
    stream.synchronize()
    np.testing.assert_allclose(host(y).mean(axis=(0, 2, 3)), 0, atol=1e-5)


def test_an_interface_naming_a_stream_is_waited_for_on_the_device(monkeypatch):
    """A foreign array whose interface names a stream: launches go to that stream, no host sync."""
    monkeypatch.setattr(plan, "LAUNCH_LOG", [])
    monkeypatch.setattr(plan, "LAUNCH_STREAMS", [])
    stream = cuda.stream()
    device = cuda.to_device(_x(), stream=stream)

    class Foreign:
        def __init__(self):
            self.__cuda_array_interface__ = dict(device.__cuda_array_interface__, stream=context._handle(stream))
            self.shape, self.dtype = device.shape, device.dtype

    driver = target._submodule("cudadrv.driver")

    def host_sync(*args, **kwargs):
        raise AssertionError("a host synchronisation inside fastbn")

    monkeypatch.setattr(driver.Stream, "synchronize", host_sync)
    monkeypatch.setattr(driver.Context, "synchronize", host_sync)
    y, _ = fastbn.forward(Foreign())
    handles = {context._handle(s) for s in plan.LAUNCH_STREAMS}
    monkeypatch.undo()
    assert handles == {context._handle(stream)}, handles
    cuda.synchronize()
    np.testing.assert_allclose(host(y).mean(axis=(0, 2, 3)), 0, atol=1e-5)


def test_a_steady_state_loop_takes_every_buffer_from_the_pool():
    x = cuda.to_device(_x())
    dy = cuda.to_device(np.ones((16, 4, 8, 8), np.float32))
    for _ in range(3):
        y, saved = fastbn.forward(x)
        fastbn.backward(dy, x, None, saved)
        del y, saved
    pool = context.pool_of(cuda.get_current_device().id)
    allocations = pool.allocations
    for _ in range(10):
        y, saved = fastbn.forward(x)
        fastbn.backward(dy, x, None, saved)
        del y, saved
    cuda.synchronize()
    assert pool.allocations == allocations
