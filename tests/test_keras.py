"""fastbn.keras.BatchNormalization against keras.layers.BatchNormalization, on every Keras backend.

Keras fixes its backend when it is imported, so each backend's battery of
checks runs in one subprocess (tests/keras_worker.py), once per session
(a session-scoped fixture; the first backend's worker warms the kernel
cache, then the other three run at the same time), and every check of
every backend is a test here that fails with the worker's traceback.  The
``numpy`` backend, which fastbn has no adapter for, checks the layer's
refusal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "keras_worker.py")

_spec = importlib.util.spec_from_file_location("keras_worker", WORKER)
assert _spec is not None and _spec.loader is not None
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)  # only its check names: importing it imports no framework

NEEDS = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow", "numpy": None}
BACKENDS = [name for name, module in NEEDS.items() if module is None or importlib.util.find_spec(module) is not None]
CASES = [
    (backend, check)
    for backend in NEEDS
    for check in (_worker.UNSUPPORTED_BACKEND_CHECKS if backend == "numpy" else _worker.CHECKS)
]

# One module fixture starts the backends' workers: every test here on one pytest-xdist worker, so they
# start once, not once per worker that gets a test.
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs keras"),
    pytest.mark.xdist_group("keras"),
]


#: The first worker's check after which the others start: by then it has compiled (and cached) the
#: float32, float16 and float64 kernels that every backend's battery calls.
WARM_AFTER = "float64"


def _text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.fixture(scope="session")  # not torn down when other modules' tests come between these on the worker
def results(tmp_path_factory):
    """Each backend's ``{check: "ok" or traceback}``, or the worker's own failure as a string.

    The first backend's worker runs alone until it has passed :data:`WARM_AFTER`; the others then
    start together and load from the kernel cache what it compiled.  Started at once on a cold cache,
    all four compiled the same kernels side by side, minutes of the suite on two cores.
    """
    logs = tmp_path_factory.mktemp("keras")
    procs, files = {}, {}

    def start(backend):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("FASTBN_KERAS_CHECKS", None)
        out, err = logs / f"{backend}.out", logs / f"{backend}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its own descriptors
            procs[backend] = subprocess.Popen([sys.executable, WORKER, backend], env=env, stdout=stdout, stderr=stderr)
        files[backend] = out, err

    found = {}
    deadline = time.monotonic() + 900
    try:
        first, *rest = BACKENDS
        start(first)
        while procs[first].poll() is None and time.monotonic() < deadline:
            if re.search(rf"^{WARM_AFTER}: ", _text(files[first][1]), re.MULTILINE):
                break
            time.sleep(0.5)
        for backend in rest:
            start(backend)
        for backend, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out, err = (_text(path) for path in files[backend])
            lines = [line for line in out.splitlines() if line.startswith("RESULTS: ")]
            if proc.returncode != 0 or not lines:
                found[backend] = f"worker exited with {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"
            else:
                found[backend] = json.loads(lines[-1][len("RESULTS: ") :])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return found


@pytest.mark.parametrize(("backend", "check"), CASES, ids=[f"{b}-{c}" for b, c in CASES])
def test_keras_layer(results, backend, check):
    if backend not in BACKENDS:
        pytest.skip(f"Keras's {backend} backend needs {NEEDS[backend]}, which is not installed")
    found = results[backend]
    if isinstance(found, str):
        pytest.fail(f"the {backend} worker failed:\n{found}")
    assert check in found, f"the {backend} worker did not run {check}"
    if found[check] != "ok":
        pytest.fail(f"{backend}: {check} failed:\n{found[check]}", pytrace=False)


def test_every_check_is_a_test():
    """The worker's battery and this file's list agree (a check cannot be written and never run)."""
    defined = {name for name in dir(_worker) if callable(getattr(_worker, name)) and not name.startswith("_")}
    helpers = {"np_", "close", "raises", "pair", "value_and_grads", "adapter_has_masks", "main"}
    assert defined - helpers == set(_worker.CHECKS) | set(_worker.UNSUPPORTED_BACKEND_CHECKS)
    assert WARM_AFTER in _worker.CHECKS  # the fixture waits for it


COMPILED_STEP = r"""
import os
os.environ["KERAS_BACKEND"] = "torch"
import numpy as np, torch, keras
from fastbn.keras import BatchNormalization

layer = BatchNormalization()
x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 5, 3)).astype(np.float32))
layer.build(x.shape)
explained = torch._dynamo.explain(lambda t: layer(t, training=True))(x)
breaks = [str(reason) for reason in explained.break_reasons if "fastbn" in str(reason)]
print("BREAKS", len(breaks), breaks[:1])
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_a_training_call_on_the_torch_backend_compiles_without_a_graph_break_in_fastbn():
    """Keras's jit_compile on the torch backend is torch.compile: a Python bool of a tensor (the overflow check)
    and NumPy's product of symbolic sizes broke the graph at every layer in training."""
    out = subprocess.run([sys.executable, "-c", COMPILED_STEP], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BREAKS 0 []" in out.stdout, out.stdout[-3000:]
