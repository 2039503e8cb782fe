"""The first call, visible and avoidable: compilation is logged (kernel, signature, reason, time), a
missing or unusable cache directory warns once, and ``python -m fastbn precompile`` fills the cache.

The logging and warning tests compile a one-line kernel of this module (no prange: fast to compile)
into a fresh cache directory; the read-only install runs in a child process on a copy of fastbn;
the precompile test compiles the two kernels of one tiny selection, twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest

from fastbn.backends.cpu import jit
from fastbn.tools import cli, precompile

from capabilities import DROP_FILE_CAPABILITIES


def _add_one(x, out):
    for i in range(x.size):
        out[i] = x[i] + 1


def _kernel():
    """A fresh dispatcher of _add_one: its cache is looked up anew on its first call."""
    return jit.kernel(parallel=False)(_add_one)


def _call(kernel, dtype=np.float32):
    x = np.arange(4, dtype=dtype)
    out = np.empty_like(x)
    kernel(x, out)
    assert np.array_equal(out, x + 1)


def _events(caplog):
    events = [(r.fastbn_event, getattr(r, "fastbn_reason", None)) for r in caplog.records if hasattr(r, "fastbn_event")]
    caplog.clear()
    return events


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch, caplog):
    """Kernels made from here on cache into an empty directory; the once-per-process warning is re-armed."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(cache))
    monkeypatch.setattr(jit, "_warned", threading.Event())
    caplog.set_level(logging.DEBUG, logger="fastbn.compile")
    return cache


def test_compiling_is_logged_with_the_kernel_its_signature_the_reason_and_the_time(fresh_cache, caplog, monkeypatch):
    """INFO before and after each compilation, with why the cache did not serve it; DEBUG for a load."""
    _call(_kernel())
    compile_record, compiled_record = [r for r in caplog.records if hasattr(r, "fastbn_event")]
    assert compile_record.levelno == compiled_record.levelno == logging.INFO
    assert compile_record.getMessage() == (
        "compiling CPU kernel test_precompile._add_one (float32, per-channel): no cache entry yet"
    )
    assert compile_record.fastbn_kernel == "test_precompile._add_one"
    assert "float32" in compile_record.fastbn_signature
    assert compiled_record.fastbn_seconds > 0 and compiled_record.fastbn_cache.startswith(str(fresh_cache))
    assert compiled_record.getMessage().startswith(
        "compiled CPU kernel test_precompile._add_one (float32, per-channel) in "
    )
    caplog.clear()

    kernel = _kernel()
    _call(kernel)  # a new process would see this: loaded, not compiled
    [load] = [r for r in caplog.records if hasattr(r, "fastbn_event")]
    assert load.levelno == logging.DEBUG and load.fastbn_event == "load", load.getMessage()
    caplog.clear()
    _call(kernel, np.float64)  # another signature, not in the cache yet
    assert _events(caplog) == [("compile", "no cache entry yet"), ("compiled", None)]

    # fastbn's CPU sources changed: the whole index is stale
    monkeypatch.setattr(jit, "_backend_sources_hash", lambda: b"other sources")
    _call(_kernel())
    assert _events(caplog) == [
        ("compile", "cache stale: fastbn's CPU backend sources changed since it was written"),
        ("compiled", None),
    ]

    # a corrupt data file: compiled again, with one warning
    for path in fresh_cache.rglob("*.nbc"):
        path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(jit.KernelCacheWarning, match="kernel cache on disk failed") as caught:
        _call(_kernel())
    assert len(caught) == 1 and caught[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]
    (event, reason), (compiled, _) = _events(caplog)
    assert event == "compile" and compiled == "compiled", reason
    assert reason.startswith("cache file corrupt or unreadable (ValueError: checksum"), reason


def test_no_writable_cache_directory_warns_once_and_logs_why(tmp_path, monkeypatch, caplog, recwarn):
    """NUMBA_CACHE_DIR is a file and Numba may look nowhere else: caching is off, the first compilation
    warns (naming the directory and the fix), later ones only log."""
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(not_a_directory))
    monkeypatch.setattr(numba.config, "CACHE_LOCATOR_CLASSES", "UserProvidedCacheLocator")
    monkeypatch.setattr(jit, "_warned", threading.Event())
    caplog.set_level(logging.INFO, logger="fastbn.compile")
    kernel = _kernel()
    assert type(kernel._cache).__name__ == "NullCache"
    _call(kernel)
    _call(kernel, np.float64)
    _call(_kernel())
    warned = [w for w in recwarn if issubclass(w.category, jit.KernelCacheWarning)]
    assert len(warned) == 1, [str(w.message) for w in warned]
    message = str(warned[0].message)
    assert f"NUMBA_CACHE_DIR={not_a_directory}" in message and "set NUMBA_CACHE_DIR to a writable directory" in message
    assert "no writable directory for the kernel cache" in message and warned[0].filename == __file__
    assert [reason for event, reason in _events(caplog) if event == "compile"] == [jit._NO_DIRECTORY] * 3


def test_a_numba_cache_dir_that_is_not_a_directory_warns_where_the_cache_went(tmp_path, monkeypatch, caplog):
    """Numba quietly caches elsewhere when NUMBA_CACHE_DIR is unusable; fastbn says so once."""
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(not_a_directory))
    monkeypatch.setattr(numba.config, "CACHE_LOCATOR_CLASSES", "UserProvidedCacheLocator,UserWideCacheLocator")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(jit, "_warned", threading.Event())
    with pytest.warns(jit.KernelCacheWarning) as caught:
        _call(_kernel())
    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        f"fastbn: NUMBA_CACHE_DIR={not_a_directory} is not a writable directory: the kernel cache is in "
        f"{tmp_path / 'xdg' / 'numba'}"
    ), str(caught[0].message)


# A read-only install and home directory, NUMBA_CACHE_DIR unset: Numba finds no cache directory at all.
READ_ONLY_INSTALL = (
    r"""
import ctypes, json, logging, os, sys, warnings

"""
    + DROP_FILE_CAPABILITIES
    + r"""

if os.geteuid() == 0:
    drop_file_capabilities()
try:
    open(os.path.join(os.environ["HOME"], "probe"), "w").close()
    print("RESULT " + json.dumps({"skip": "writes to a read-only directory still succeed here"}))
    sys.exit(0)
except PermissionError:
    pass

class Collect(logging.Handler):
    reasons = []
    def emit(self, record):
        if getattr(record, "fastbn_event", None) == "compile":
            self.reasons.append(record.fastbn_reason)
logging.getLogger("fastbn.compile").addHandler(Collect())
logging.getLogger("fastbn.compile").setLevel(logging.INFO)

import numpy as np
import fastbn
from fastbn.backends.cpu import numerics
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for dtype in (np.float32, np.float64):  # two compilations
        rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
        numerics.update_running(rm, rv, np.ones(3), np.ones(3), 0.1, 4.0)
print("RESULT " + json.dumps({
    "fastbn": fastbn.__file__, "cache": type(numerics.update_running._cache).__name__, "reasons": Collect.reasons,
    "warnings": [(w.category.__name__, str(w.message), w.filename) for w in caught]}))
"""
)


@pytest.mark.skipif(sys.platform != "linux", reason="capabilities as on Linux")
def test_a_read_only_install_without_a_writable_home_warns_once(tmp_path):
    """fastbn installed read-only, a read-only home and NUMBA_CACHE_DIR unset: kernels run uncached, and the
    first compilation warns once, naming the directories tried and NUMBA_CACHE_DIR."""
    import fastbn

    site, home = tmp_path / "site", tmp_path / "home"
    shutil.copytree(os.path.dirname(fastbn.__file__), site / "fastbn", ignore=shutil.ignore_patterns("__pycache__"))
    home.mkdir()
    for folder in (site, home):
        for root, _, files in os.walk(folder):
            for name in files:
                os.chmod(os.path.join(root, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.chmod(root, 0o555)
    env = {key: value for key, value in os.environ.items() if key not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(READ_ONLY_INSTALL)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(tmp_path),
            timeout=300,
        )
    finally:
        for root, _, _ in os.walk(tmp_path):
            os.chmod(root, 0o755)  # let tmp_path be cleaned up
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out["fastbn"].startswith(str(site)), out
    assert out["cache"] == "NullCache" and out["reasons"] == [jit._NO_DIRECTORY] * 2, out
    [(category, message, filename)] = out["warnings"]
    assert category == "KernelCacheWarning" and filename == "<string>", out
    assert "no writable directory for the kernel cache" in message and "NUMBA_CACHE_DIR (not set)" in message
    assert os.path.join(str(site), "fastbn", "backends", "cpu", "__pycache__") in message
    assert os.path.join(str(home), ".cache", "numba") in message, message


def test_cuda_compilations_are_logged_without_a_gpu():
    """The CUDA target's kernels log their compilations too, with the reason (here, a dispatcher without a cache)."""
    target = pytest.importorskip("fastbn.backends.cuda.target")

    class Dispatcher:
        def __init__(self):
            self.overloads = {}
            self.py_func = _add_one

        def compile(self, sig):
            self.overloads[sig] = "kernel"
            return "kernel"

    dispatcher = Dispatcher()
    target._log_compilations(dispatcher)
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("fastbn.compile")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sig = (target.types.float32[:], target.types.float32[:])
        assert dispatcher.compile(sig) == dispatcher.compile(sig) == "kernel"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.fastbn_event for r in records] == ["compile", "compiled"]  # the second call compiled nothing
    assert records[0].getMessage() == (
        "compiling CUDA kernel cuda._add_one (float32, 1-D): first use in this process "
        "(loaded from the disk cache if there)"
    )
    dispatcher._fastbn_uncached = "not cached on disk (no writable directory)"
    records.clear()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        dispatcher.compile((target.types.float64[:],))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records[0].getMessage().endswith(": not cached on disk (no writable directory)")


def test_precompile_options_and_units():
    """Layouts of one kernel layout are one unit; ROWS has no fused plan; bad names exit with status 2."""
    assert precompile._choice("nchw,ncl,nchw", tuple(precompile.LAYOUTS), "--layouts") == ("nchw", "ncl")
    assert precompile._choice("all", precompile.DTYPES, "--dtypes") == precompile.DTYPES
    assert precompile.units(("float32",), ("nchw", "ncl", "nc"), ("moments",), ("none",)) == [
        ("float32", "nchw", "forward-fused"),
        ("float32", "nchw", "forward-streamed"),
        ("float32", "nc", "forward-streamed"),
    ]
    assert precompile.units(("float64",), ("nhwc",), ("backward",), ("none",)) == [
        ("float64", "nhwc", "backward-streamed"),
        ("float64", "nhwc", "small"),  # plain small calls' one-thread kernels
    ]
    assert cli.main(["precompile", "--dtypes", "float8"]) == 2


@pytest.mark.parametrize("layout", ["nchw", "nc"])
def test_the_small_unit_runs_on_both_kernel_layouts(layout):
    """The small unit's calls take no plan, so its name (no strategy suffix) must not be parsed for one:
    the default ``precompile`` failed on NCHW's small unit with an IndexError, and exited with status 1."""
    records, error = precompile._work(("float32", layout, "small"), ("eval",), ("none",), False)
    assert error is None, error
    assert {record["kernel"].split(".")[0] for record in records} <= {"small"}, records


def test_precompile_fills_the_cache_and_a_second_run_compiles_nothing(tmp_path, monkeypatch, capsys):
    """Two layouts (one unit each, two processes writing one cache directory) of normalize: the first run
    compiles its kernels, ordinary and non-temporal stores; the second loads them all."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    first = precompile.precompile(("float32",), ("nchw", "nc"), ("normalize",), ("none",), jobs=2)
    assert first["errors"] == [] and first["uncached"] == [] and first["jobs"] == 2, first
    kernels = sorted(name.split(" ")[0] for name in first["compiled"])
    assert kernels == ["elementwise.normalize_rows"] * 2 + ["elementwise.normalize_slab"] * 2, first["compiled"]
    assert first["loaded"] == [] and first["cache"][0].startswith(str(tmp_path / "cache"))

    assert cli.main(["precompile", "--dtypes", "float32", "--layouts", "nchw,nc", "--ops", "normalize"]) == 0
    out = capsys.readouterr().out
    assert "0 kernels compiled (0.0 s of compilation), 4 loaded from the cache" in out, out


def _compiled_signatures():
    """How many specialisations the CPU kernel dispatchers hold, compiled or loaded from the cache."""
    from fastbn.backends.cpu import elementwise, fused, numerics, reductions, small

    found = 0
    for module in (elementwise, fused, numerics, reductions, small):
        for value in vars(module).values():
            if isinstance(value, numba.core.dispatcher.Dispatcher):
                found += len(value.signatures)
    return found


@pytest.mark.parametrize("path", ["small", "full"])
def test_read_only_per_channel_inputs_reuse_the_kernels_of_writable_ones(path):
    """A read-only weight, bias, running statistic or saved statistic (JAX's, a frozen array) costs no
    compilation of its own: per-channel inputs reach the kernels writable (fastbn.backends.cpu.views.vector)."""
    import fastbn

    full = {"_plan": {}} if path == "full" else {}  # a plan override that changes nothing forces the full path
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def calls(frozen):
        def vec(values):
            out = np.array(values, np.float32)
            out.flags.writeable = not frozen
            return out

        w, b = vec([1.0, 2.0, 3.0]), vec([0.0, 1.0, 0.0])
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        y, saved = fastbn.forward(x, w, b, running_mean=rm, running_var=rv, **full)
        if frozen:
            saved = saved._replace(mean=vec(saved.mean), invstd=vec(saved.invstd))
        grads = fastbn.backward(dy, x, w, saved, **full)
        y_eval, _ = fastbn.forward(x, w, b, running_mean=vec(rm), running_var=vec(rv), training=False, **full)
        return [y, *grads, y_eval]

    writable = calls(False)
    before = _compiled_signatures()
    frozen = calls(True)
    assert _compiled_signatures() == before, "read-only per-channel inputs compiled kernels of their own"
    for a, b in zip(writable, frozen):
        assert np.array_equal(a, b)
