"""PyTorch CUDA tensors through fastbn, on a real GPU (collected only with FASTBN_GPU_TESTS=1).

What a PyTorch program expects of a CUDA op: it runs on the tensor's device
and on torch's current stream, its memory comes from torch's caching
allocator, it never synchronises the device, it can be captured in a CUDA
graph, and it keeps the memory format.  Each test below checks one of those
against ``torch.nn.functional.batch_norm`` (cuDNN) as the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("this PyTorch has no CUDA device", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

import fastbn  # noqa: E402
import fastbn.torch as fbt  # noqa: E402
from fastbn.backends.cuda import context, plan  # noqa: E402

DEVICE = torch.device("cuda", 0)
SHAPE = (4, 3, 5, 6)


def _inputs(dtype=torch.float32, memory_format=torch.contiguous_format, device=DEVICE):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=generator) * 2 + 1).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    weight = torch.rand(SHAPE[1], generator=generator).to(device) + 0.5
    bias = torch.randn(SHAPE[1], generator=generator).to(device)
    return x, weight, bias


def _reference(x, weight, bias):
    rm = torch.zeros(x.shape[1], device=x.device)
    rv = torch.ones(x.shape[1], device=x.device)
    y = F.batch_norm(x.float(), rm, rv, weight, bias, training=True, momentum=0.1, eps=1e-5)
    return y.to(x.dtype), rm, rv


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"]
)
def test_forward_matches_cudnn_and_keeps_the_memory_format(memory_format):
    x, weight, bias = _inputs(memory_format=memory_format)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y, saved = fastbn.forward(x, weight, bias, running_mean=rm, running_var=rv)
    expected, e_rm, e_rv = _reference(x, weight, bias)
    assert isinstance(y, torch.Tensor) and y.device == x.device
    assert y.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm, e_rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, e_rv, rtol=1e-5, atol=1e-6)
    # Saved keeps the backend's device arrays (fastbn.torch's operators turn them into tensors).
    assert context.target.is_device_array(saved.mean)
    mean = torch.as_tensor(saved.mean, device=x.device)
    torch.testing.assert_close(mean, x.float().mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_permuted_tensor():
    x, weight, bias = _inputs()
    permuted = x.permute(0, 2, 3, 1)  # channels on the last axis, strides not contiguous in any order fastbn has
    y, _ = fastbn.forward(permuted, weight, bias, axis=-1)
    expected, _, _ = _reference(permuted.permute(0, 3, 1, 2).contiguous(), weight, bias)
    torch.testing.assert_close(y.permute(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4)


def test_launches_go_to_torchs_current_stream_and_the_caching_allocator(monkeypatch):
    """On a side stream: every launch on it; memory from torch's allocator, none from fastbn's pool."""
    log = []
    monkeypatch.setattr(plan, "LAUNCH_LOG", log)
    monkeypatch.setattr(plan, "LAUNCH_STREAMS", [])
    x, weight, bias = _inputs()
    side = torch.cuda.Stream()
    pool_allocations = context.pool_of(0).allocations
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        produced = x * 1.0  # made on the side stream: fastbn must be ordered after it
        dy = torch.ones(SHAPE, device=DEVICE)
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        y, saved = fastbn.forward(produced, weight, bias)
        dx, _, _ = fastbn.backward(dy, produced, weight, saved)
        after = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.current_stream().wait_stream(side)
    handles = {context._handle(stream) for stream in plan.LAUNCH_STREAMS}
    assert log and handles == {side.cuda_stream}, handles
    assert after > before, "outputs and workspaces should come from torch's caching allocator"
    assert context.pool_of(0).allocations == pool_allocations
    expected, _, _ = _reference(x, weight, bias)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(dx).all()


def test_steady_state_loop_allocates_nothing_new_from_the_device():
    """After warm-up, a training step reuses torch's cached blocks: its reserved memory stays put."""
    x, weight, bias = _inputs()
    for _ in range(3):
        y, saved = fastbn.forward(x, weight, bias)
        fastbn.backward(torch.ones_like(y), x, weight, saved)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for _ in range(20):
        y, saved = fastbn.forward(x, weight, bias)
        fastbn.backward(torch.ones_like(y), x, weight, saved)
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() == reserved


def test_cuda_graph_capture_and_replay():
    """A forward captured in a CUDA graph replays to the same result on new input in the same memory."""
    x, weight, bias = _inputs()
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile and load the kernels outside the capture
        for _ in range(2):
            fastbn.forward(static_x, weight, bias)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, _ = fastbn.forward(static_x, weight, bias)
    new = x * 3 - 2
    static_x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    expected, _, _ = _reference(new, weight, bias)
    torch.testing.assert_close(static_y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_tensor_on_the_second_device_runs_there():
    device = torch.device("cuda", 1)
    x, weight, bias = _inputs(device=device)
    y, _ = fastbn.forward(x, weight, bias)
    assert y.device == device
    torch.testing.assert_close(y, _reference(x, weight, bias)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"^weight: is on cuda:0 but x is on cuda:1"):
        fastbn.forward(x, weight.to(DEVICE), bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_autograd_through_fastbn_torch_matches_torch(dtype):
    x, weight, bias = _inputs(dtype=dtype)
    weight, bias = weight.to(dtype if dtype == torch.float64 else torch.float32), bias.to(weight.dtype)
    tolerance = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    results = []
    for function in (fbt.batch_norm, F.batch_norm):
        inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        rm, rv = torch.zeros(3, device=DEVICE, dtype=weight.dtype), torch.ones(3, device=DEVICE, dtype=weight.dtype)
        y = function(inputs[0], rm, rv, inputs[1], inputs[2], training=True)
        grads = torch.autograd.grad((y.float() * torch.arange(y.numel(), device=DEVICE).view(y.shape)).sum(), inputs)
        results.append((y, rm, rv, *grads))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=tolerance, atol=tolerance * 10)


def test_batchnorm_module_on_cuda_matches_torchs():
    torch.manual_seed(0)
    ours, theirs = fbt.BatchNorm2d(3).to(DEVICE), torch.nn.BatchNorm2d(3).to(DEVICE)
    x, _, _ = _inputs()
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_cupy_arrays_run_on_cupys_stream_and_pool():
    cupy = pytest.importorskip("cupy")
    x = cupy.asarray(np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32))
    stream = cupy.cuda.Stream(non_blocking=True)
    stream.wait_event(cupy.cuda.get_current_stream().record())  # x's copy ran on the null stream
    with stream:
        y, _ = fastbn.forward(x)
        mean = y.mean(axis=(0, 2, 3))
    stream.synchronize()
    assert isinstance(y, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(mean), 0, atol=1e-5)
