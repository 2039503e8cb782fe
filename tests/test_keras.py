"""fastbn.keras.BatchNormalization against keras.layers.BatchNormalization, on every Keras backend.

Keras fixes its backend when it is imported, so each backend's battery of
checks runs in one subprocess (tests/keras_worker.py); the four run at the
same time, once per session (a module-scoped fixture), and every check of
every backend is a test here that fails with the worker's traceback.  The
``numpy`` backend, which fastbn has no adapter for, checks the layer's
refusal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

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


@pytest.fixture(scope="session")  # not torn down when other modules' tests come between these on the worker
def results():
    """Each backend's ``{check: "ok" or traceback}``, or the worker's own failure as a string."""
    procs = {}
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("FASTBN_KERAS_CHECKS", None)
        procs[backend] = subprocess.Popen(
            [sys.executable, WORKER, backend],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    found = {}
    try:
        for backend, proc in procs.items():
            out, err = proc.communicate(timeout=600)
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
