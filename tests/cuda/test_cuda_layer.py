"""fastbn.BatchNorm on GPU arrays: it follows its input to the device and matches the CPU layer."""

from __future__ import annotations

import numpy as np

from fastbn import BatchNorm
from fastbn.backends.cuda import target

from gpu_arrays import gpu, host


def test_layer_on_gpu_input_matches_the_cpu_layer():
    rng = np.random.default_rng(3)
    cpu, dev = BatchNorm(3, momentum=None), BatchNorm(3, momentum=None)
    for layer in (cpu, dev):
        layer.weight[:] = [0.5, 1.0, 2.0]
        layer.bias[:] = [0.0, -1.0, 1.0]
    for _step in range(2):
        x = (rng.standard_normal((4, 3, 2)) * 2 + 3).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        y_cpu, y_dev = cpu(x), dev(gpu(x))
        np.testing.assert_allclose(host(y_dev), y_cpu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(host(dev.backward(gpu(dy))), cpu.backward(dy), rtol=1e-4, atol=1e-5)
        for name in ("grad_weight", "grad_bias"):
            np.testing.assert_allclose(host(getattr(dev, name)), getattr(cpu, name), rtol=1e-4, atol=1e-5)
    assert target.is_device_array(dev.running_mean)  # updated in place on the device
    for key, value in cpu.state_dict().items():
        np.testing.assert_allclose(dev.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    dev.eval()
    cpu.eval()
    x = rng.standard_normal((4, 3, 2)).astype(np.float32)
    np.testing.assert_allclose(host(dev(gpu(x))), cpu(x), rtol=1e-5, atol=1e-5)
    # A host input brings the layer back to the host.
    np.testing.assert_allclose(dev(x), cpu(x), rtol=1e-5, atol=1e-5)
    assert isinstance(dev.running_mean, np.ndarray) and isinstance(dev.weight, np.ndarray)
