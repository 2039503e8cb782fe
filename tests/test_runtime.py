"""Start-up, thread safety, fork safety and the on-disk kernel cache.

Most of these run a fresh Python in a subprocess: Numba's threading layer is
chosen once per process, and fork behaviour must be seen from a clean parent.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, env_extra=None, prefix=(), cwd=None, timeout=600):
    """Run ``code`` in a fresh interpreter; return its stdout, failing on error."""
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


# A workload touching both layouts, all dtypes and every public function.
WORKLOAD = """
import numpy as np, fastbn

def workload(seed):
    rng = np.random.default_rng(seed)
    out = []
    for shape, axis in [((6, 5, 7, 3), 1), ((6, 7, 3, 5), -1), ((40, 9), 1)]:
        for dtype in (np.float16, np.float32, np.float64):
            x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            c = shape[axis]
            sdt = np.float64 if dtype == np.float64 else np.float32
            rm, rv = np.zeros(c, sdt), np.ones(c, sdt)
            y, saved = fastbn.forward(x, running_mean=rm, running_var=rv, axis=axis)
            dx, dw, db = fastbn.backward(dy, x, None, saved, axis=axis)
            ye, se = fastbn.forward(x, running_mean=rm, running_var=rv, training=False, axis=axis)
            dxe, _, _ = fastbn.backward(dy, x, None, se, axis=axis)
            m, v = fastbn.moments(x, axis=axis)
            out += [y, dx, dw, db, rm, rv, ye, dxe, m, v, fastbn.normalize(x, m, v, axis=axis)]
    return out
"""


def test_import_compiles_nothing_and_imports_no_framework():
    out = run_python(
        """
        import sys
        import fastbn
        heavy = [m for m in ("numba", "torch", "jax", "cupy", "tensorflow") if m in sys.modules]
        print(heavy)
        """
    )
    assert out.strip() == "[]"


def test_default_threading_layer_is_tbb_when_tbb_is_installed():
    pytest.importorskip("importlib.metadata")
    from importlib import metadata

    try:
        metadata.version("tbb")
    except metadata.PackageNotFoundError:
        pytest.fail("the tbb wheel is a dependency of fastbn on this platform and must be installed")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fastbn, numpy as np; fastbn.moments(np.ones((4, 2))); print(fastbn.threading_layer())",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tbb"


def test_borrowed_views_read_and_write_the_callers_arrays():
    """jit.borrowed gives back its value (an array without its reference count, None and scalars as they
    are), and kept keeps a kernel's own allocation alive for borrowed views of it: a prange kernel that
    writes through borrowed views of its arguments and reads a borrowed scratch gets the plain answer on
    every element, including a whole-array store after the loop (which Numba's dead-code elimination
    dropped before it knew the copy aliases the argument)."""
    import numba
    import numpy as np
    from numba import prange

    from fastbn.backends.cpu.jit import borrowed, kept

    @numba.njit(parallel=True)
    def scaled_row_sums(x, nothing, factor, out, total):
        x = borrowed(x)
        nothing = borrowed(nothing)
        factor = borrowed(factor)
        out = borrowed(out)
        total = borrowed(total)
        for r in prange(x.shape[0]):
            owner = np.empty(x.shape[1])
            scratch = borrowed(owner)
            for i in range(x.shape[1]):
                scratch[i] = x[r, i] * factor
            out[r] = scratch[1:].sum() + scratch[0] + (0.0 if nothing is None else 1.0)
            x[r, 0] = -1.0
            kept(owner)
        sums = np.zeros(2)
        sums[0] = out.sum()
        sums[1] = factor
        total[:] = sums
        return factor

    x = np.arange(64 * 37, dtype=np.float64).reshape(64, 37)
    want = x.sum(axis=1) * 3.0
    out = np.zeros(64)
    total = np.zeros(2)
    assert scaled_row_sums(x, None, 3.0, out, total) == 3.0
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(total, [want.sum(), 3.0])
    assert (x[:, 0] == -1.0).all() and x[0, 1] == 1.0


def test_concurrent_threads_match_sequential():
    namespace = {}
    exec(WORKLOAD, namespace)
    workload = namespace["workload"]
    expected = [workload(seed) for seed in range(4)]
    results = {}
    errors = []

    def worker(index):
        try:
            for repeat in range(3):
                seed = (index + repeat) % 4
                results[(index, repeat)] = (seed, workload(seed))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 24
    for seed, arrays in results.values():
        for got, want in zip(arrays, expected[seed]):
            assert got.tobytes() == want.tobytes()


def test_a_serial_call_switches_the_thread_count_without_numbas_start_up_locks(monkeypatch):
    """A small call runs its kernels on one thread (passes.serial_if_small) and restores the thread's
    count after, without numba.get_num_threads/set_num_threads: those take Numba's start-up locks at
    every call, one of them a multiprocessing lock whose Python-level __enter__ a signal handler's
    exception can interrupt once the lock is taken, leaving it held, and every other thread that asks
    Numba for its thread count waits forever (tests/test_faults.py's signal probe saw it)."""
    import numba
    from numba.np.ufunc import parallel

    from fastbn.backends.cpu import passes, threads

    threads.configure()
    before = numba.get_num_threads()

    def start_up(*args):
        raise AssertionError("Numba's start-up (and its locks) ran during a call")

    monkeypatch.setattr(parallel, "_launch_threads", start_up)
    try:
        with passes.serial_if_small(0):
            inside = threads.thread_count()
        after = threads.thread_count()
    finally:
        monkeypatch.undo()
    assert inside == 1 and after == before == numba.get_num_threads()


FORK_CHILD = (
    WORKLOAD
    + """
import multiprocessing as mp, sys
from concurrent.futures import ProcessPoolExecutor

def child_digest(seed):
    return [a.tobytes() for a in workload(seed)]

if __name__ == "__main__":
    parent = [a.tobytes() for a in workload(0)]   # the parent uses fastbn first
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        children = list(pool.map(child_digest, [0, 0, 1]))
    assert children[0] == parent and children[1] == parent, "forked child differs"
    p = ctx.Process(target=workload, args=(2,))
    p.start(); p.join(300)
    assert p.exitcode == 0, p.exitcode
    import fastbn
    print(fastbn.threading_layer(), "ok")
"""
)


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_forked_child_can_use_fastbn(tmp_path, layer):
    script = tmp_path / "fork_child.py"
    script.write_text(FORK_CHILD)
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    expected_layer = "tbb" if layer == "default" else layer
    assert proc.stdout.split() == [expected_layer, "ok"]


def test_workqueue_fallback_is_thread_safe():
    # With the workqueue layer (what fastbn uses when TBB cannot be loaded),
    # concurrent launches abort the process unless fastbn serialises them.
    out = run_python(
        WORKLOAD
        + """
import threading
expected = workload(0)
bad = []
def worker():
    for _ in range(3):
        got = workload(0)
        if any(g.tobytes() != w.tobytes() for g, w in zip(got, expected)):
            bad.append(1)
threads = [threading.Thread(target=worker) for _ in range(6)]
[t.start() for t in threads]; [t.join() for t in threads]
print(fastbn.threading_layer(), len(bad))
""",
        env_extra={"NUMBA_THREADING_LAYER": "workqueue"},
    )
    assert out.split() == ["workqueue", "0"]


def test_torch_dataloader_workers_can_use_fastbn():
    torch = pytest.importorskip("torch")
    del torch
    out = run_python(
        """
        import numpy as np, torch, fastbn
        class Data(torch.utils.data.Dataset):
            def __len__(self): return 4
            def __getitem__(self, i):
                x = np.arange(24, dtype=np.float32).reshape(4, 3, 2) * (i + 1)
                y, _ = fastbn.forward(x)
                return torch.from_numpy(y)
        fastbn.forward(np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None])
        loader = torch.utils.data.DataLoader(Data(), batch_size=2, num_workers=2,
                                             multiprocessing_context="fork")
        batches = [b for b in loader]
        print(len(batches), bool(torch.isfinite(torch.cat(batches)).all()))
        """
    )
    assert out.split() == ["2", "True"]


CACHE_PROBE = """
import os
os.environ["FASTBN_SMALL_CALLS"] = "0"  # the small input takes the full path, whose fused kernel is inspected
import numpy as np, fastbn, fastbn.backends.cpu.fused as cpu
x = np.random.default_rng(0).standard_normal((8, 3, 5)).astype(np.float32)
y, saved = fastbn.forward(x)
ref = (x - x.mean((0, 2), keepdims=True)) / np.sqrt(x.var((0, 2), keepdims=True) + 1e-5)
assert np.allclose(y, ref, atol=1e-5)
print(cpu.forward_train_slab.stats.cache_hits.__len__(), cpu.forward_train_slab.stats.cache_misses.__len__())
"""


def test_cache_dir_missing_is_created_and_reused(tmp_path):
    cache = tmp_path / "does" / "not" / "exist"
    env = {"NUMBA_CACHE_DIR": str(cache)}
    first = run_python(CACHE_PROBE, env).split()
    assert first == ["0", "1"]  # compiled, no hit
    assert any(p.suffix == ".nbi" for p in cache.rglob("*")), "no index written"
    second = run_python(CACHE_PROBE, env).split()
    assert second == ["1", "0"]  # loaded from disk, nothing compiled


def test_cache_dir_that_cannot_be_created_breaks_nothing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run_python(CACHE_PROBE, {"NUMBA_CACHE_DIR": str(blocker / "cache")})


def test_read_only_install_and_cache_breaks_nothing(tmp_path):
    # A read-only copy of the package, a read-only cache dir and a read-only
    # home: every Numba cache locator fails, so fastbn must compile uncached.
    package = tmp_path / "site" / "fastbn"
    shutil.copytree(os.path.join(REPO, "fastbn"), package, ignore=shutil.ignore_patterns("__pycache__"))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    for path in [readonly, *package.rglob("*"), package, package.parent]:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    prefix = ()
    if os.geteuid() == 0:
        # root ignores permission bits; in a new user namespace it does not.
        unshare = shutil.which("unshare")
        assert unshare, "util-linux 'unshare' is needed to test read-only directories as root"
        prefix = (unshare, "--user")
    env = {
        "PYTHONPATH": str(package.parent),
        "NUMBA_CACHE_DIR": str(readonly / "cache"),
        "HOME": str(readonly),
        "XDG_CACHE_HOME": str(readonly),
    }
    try:
        out = run_python(
            CACHE_PROBE + "print(fastbn.__file__)\nprint(cpu.forward_train_slab._cache.__class__.__name__)",
            env,
            prefix,
            cwd=tmp_path,  # not the repository, whose fastbn/ would shadow the copy
        ).split()
    finally:
        for path in [readonly, package.parent, package, *package.rglob("*")]:
            path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)
    assert out[2].startswith(str(package)), out
    assert out[:2] == ["0", "1"], out
    assert out[2].startswith(str(package))
    assert out[3] == "NullCache", "expected caching to be switched off, not to fail"
    assert not any(readonly.iterdir())
