"""Faults from outside fastbn: a cache directory that becomes read-only, corrupt cache files, memory
exhaustion, signals during a call, and forks taken while other threads run kernels.

Each fault runs in a child process (it could damage the process it hits, and Numba's threading layer is
chosen once per process).  The children share one kernel cache, warmed once per module, except where
the cache is the subject; each child reports one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from capabilities import DROP_FILE_CAPABILITIES

# The module's warm kernel cache is built once: every test here on one pytest-xdist worker.
pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="fork, setrlimit and capabilities as on Linux"),
    pytest.mark.xdist_group("faults"),
]

# Shapes (N, C, H, W) float32.  All take the streamed SLAB plan here (fewer kernels to compile);
# MEDIUM's output (1 MiB) comes from the output pool; BIG's (256 MiB) is written with
# non-temporal stores, its channels (64 MiB) are too large for the fused plan on any machine, and
# its statistics kernel allocates 2 x 2 MiB of scratch (16 bytes per 1 KiB of x) in the calling thread.
TINY, SMALL, MEDIUM, BIG = (16, 8, 16, 16), (8, 8, 32, 32), (32, 8, 32, 32), (65536, 4, 16, 16)

PRELUDE = f"""
import hashlib, json, os, sys, warnings
import numpy as np
import fastbn
TINY, SMALL, MEDIUM, BIG = {TINY}, {SMALL}, {MEDIUM}, {BIG}

def batch(shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(np.float32)

def big_batch():
    x = np.ones(BIG, np.float32)
    x[::2] = 3.0
    return x

def train(x):
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    y, _ = fastbn.forward(x, running_mean=rm, running_var=rv)
    return y, rm, rv

def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]

def cache_warnings(caught):
    return [str(w.message) for w in caught if "kernel cache" in str(w.message)]

def report(**fields):
    print("RESULT " + json.dumps(fields), flush=True)

def wait_child(pid, timeout):
    # The forked child's exit code (negative: killed by that signal), or "hung" (then it is killed).
    import signal, time
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.002)
"""


def _env(**extra):
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    # These probes test the full path's machinery (its kernels' cache files, its output pool, the parallel
    # layer under fork and signals) with small inputs, which plain calls would otherwise run serially.
    env["FASTBN_SMALL_CALLS"] = "0"
    env.update({key: value for key, value in extra.items() if value is not None})
    return env


def run_child(code, timeout=120, **env):
    """Run PRELUDE + code in a fresh interpreter; return its RESULT, failing on a crash, hang or error."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


WARM = """
out = {}
for name, shape in (("tiny", TINY), ("small", SMALL), ("medium", MEDIUM)):
    for _ in range(2):  # a fresh output, then a recycled one
        y, rm, rv = train(batch(shape))
    out[name] = digest(y, rm, rv)
    x = batch(shape)
    mean, var = fastbn.moments(x)
    fastbn.normalize(x, mean, var)
big = big_batch()
train(big)
train(big)  # its output recycled from the pool
report(**out)
"""


@pytest.fixture(scope="session")  # kept when other modules' tests come between these on the worker
def warm(tmp_path_factory):
    """A kernel cache holding every kernel these tests run, and the digests of (y, running_mean, running_var)."""
    cache = tmp_path_factory.mktemp("warm-cache")
    digests = run_child(WARM, timeout=900, NUMBA_CACHE_DIR=str(cache))
    return types.SimpleNamespace(cache=cache, digests=digests)


def _copy_cache(warm, destination, remove=()):
    shutil.copytree(warm.cache, destination)
    for kernel in remove:
        files = list(destination.rglob(f"{kernel}-*"))
        assert files, kernel
        for path in files:
            path.unlink()
    return destination


# ---------------------------------------------------- cache: read-only mid-run ---
READ_ONLY_MID_RUN = (
    """
import ctypes
import logging
from fastbn.backends.cpu import elementwise, numerics
cache = os.environ["NUMBA_CACHE_DIR"]

class Lines(logging.Handler):
    lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

logging.getLogger("fastbn.compile").addHandler(Lines())
logging.getLogger("fastbn.compile").setLevel(logging.INFO)

def listing():
    return sorted(os.path.relpath(os.path.join(d, f), cache) for d, _, fs in os.walk(cache) for f in fs)

"""
    + DROP_FILE_CAPABILITIES
    + """

x = batch(SMALL)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mean, var = fastbn.moments(x)  # loaded from the cache
    y0 = fastbn.normalize(x, mean, var)  # compiled, and saved while the directory is writable
    before = listing()
    for d, _, fs in os.walk(cache):  # the fault
        os.chmod(d, 0o555)
        for f in fs:
            os.chmod(os.path.join(d, f), 0o444)
    if os.geteuid() == 0:
        drop_file_capabilities()
    try:
        open(os.path.join(cache, "probe"), "w").close()
        report(skip="writes to a 0o555 directory still succeed here")
        sys.exit(0)
    except PermissionError:
        pass
    warned_before = len(cache_warnings(caught))
    del Lines.lines[:]
    y, rm, rv = train(x)  # its kernels were removed from the cache: compiled, and cannot be saved
    again = train(x)
    after = listing()
x64 = x.astype(np.float64)
ref0 = (x64 - mean.astype(np.float64)[:, None, None]) / np.sqrt(var.astype(np.float64)[:, None, None] + 1e-5)
report(warned_before=warned_before, messages=cache_warnings(caught), digest=digest(y, rm, rv),
       digest_again=digest(*again), normalize_ok=bool(np.allclose(y0, ref0, atol=1e-5)),
       before=before, after=after, log=Lines.lines,
       caches={k.py_func.__name__: type(k._cache).__name__
               for k in (numerics.forward_coefficients, numerics.update_running, elementwise.normalize_slab)},
       compiled={k.py_func.__name__: len(k.stats.cache_misses)
                 for k in (numerics.forward_coefficients, numerics.update_running)})
"""
)


def test_a_cache_directory_made_read_only_mid_run_warns_once_and_kernels_run_uncached(warm, tmp_path):
    """The process has used and written the cache; then writes to it fail (permission bits that bind even
    root, its file capabilities dropped).  The kernels compiled after that run uncached: one warning for the
    process, correct results, nothing written."""
    removed = ("elementwise.normalize_slab", "numerics.forward_coefficients", "numerics.update_running")
    cache = _copy_cache(warm, tmp_path / "cache", remove=removed)
    try:
        out = run_child(READ_ONLY_MID_RUN, NUMBA_CACHE_DIR=str(cache))
    finally:
        for path in [cache, *cache.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out["warned_before"] == 0
    assert len(out["messages"]) == 1 and "PermissionError" in out["messages"][0], out["messages"]
    assert out["normalize_ok"] and any("normalize_slab" in name for name in out["before"])
    assert out["digest"] == out["digest_again"] == warm.digests["small"]
    assert out["after"] == out["before"], "nothing may be written once the directory is read-only"
    assert out["compiled"]["update_running"] == 1 and out["caches"]["update_running"] == "NullCache", out
    # forward_coefficients runs in the streamed plan (SMALL's here); the same holds for it
    assert out["caches"]["forward_coefficients"] == (
        "NullCache" if out["compiled"]["forward_coefficients"] else "_FallbackCache"
    ), out
    assert out["caches"]["normalize_slab"] == "_FallbackCache", out  # saved before the fault
    # The log tells what happened: update_running's save failed, and caching is off for it.
    failed = [line for line in out["log"] if line.startswith("saving CPU kernel numerics.update_running")]
    assert len(failed) == 1 and "failed (PermissionError" in failed[0], out["log"]


# ---------------------------------------------------- cache: corrupt files ---
CACHE_PROBE = """
from fastbn.backends.cpu import numerics
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y, rm, rv = train(batch(SMALL))
    again = train(batch(SMALL))
kernel = numerics.update_running
report(messages=cache_warnings(caught), digest=digest(y, rm, rv), digest_again=digest(*again),
       hits=len(kernel.stats.cache_hits), misses=len(kernel.stats.cache_misses))
"""


def _flip(path, where):
    data = bytearray(path.read_bytes())
    start = data.index(b"\x7fELF")  # the kernel's object code, inside the pickle
    position = start + 9 if where == "elf-padding" else start + (len(data) - start) // 4
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


# kind: (what is done to update_running's index (.nbi) and data file (.nbc), warnings expected)
CORRUPTIONS = {
    "index truncated": (lambda index, data: index.write_bytes(index.read_bytes()[: index.stat().st_size // 2]), 1),
    "index and data empty": (lambda index, data: (index.write_bytes(b""), data.write_bytes(b"")), 1),
    "data garbage": (lambda index, data: data.write_bytes(random.Random(0).randbytes(data.stat().st_size)), 1),
    # an ELF header byte that no loader reads: only a checksum notices it (before one, the kernel loaded)
    "data bit flipped in ELF padding": (lambda index, data: _flip(data, "elf-padding"), 1),
    # in the object code (before checksums, of 30 random one-bit flips in a data file 5 crashed the
    # process, SIGSEGV or SIGABRT, and 17 went unnoticed; this one crashed it here)
    "data bit flipped in object code": (lambda index, data: _flip(data, "code"), 1),
    # Numba itself takes an index entry naming a missing file for a miss: compiled and saved, silently
    "data file missing": (lambda index, data: data.unlink(), 0),
    # an intact file in another entry's place (files swapped or renumbered): its checksum holds, the key it
    # was saved under does not (before the key was checked, another signature's code was called: TypeError)
    "data file of another kernel": (
        lambda index, data: shutil.copyfile(min(data.parent.glob("numerics.forward_coefficients-*.nbc")), data),
        1,
    ),
}


def test_corrupt_cache_files_of_each_kind_warn_once_give_correct_results_and_heal(warm, tmp_path):
    """One kernel's cache files damaged in each of these ways (kinds that tests/test_robustness.py does not
    cover: it truncates every file to 20 bytes): the process warns once (an index naming a missing data
    file is Numba's silent miss), compiles that kernel, gives bit-for-bit the results of a clean cache, and
    the next process loads the rewritten entry without a warning."""
    caches = {}
    for number, (kind, (corrupt, _)) in enumerate(CORRUPTIONS.items()):
        cache = _copy_cache(warm, tmp_path / f"cache{number}")
        (index,) = cache.rglob("numerics.update_running-*.nbi")
        (data,) = cache.rglob("numerics.update_running-*.nbc")
        corrupt(index, data)
        caches[kind] = cache

    def probe(kind):
        return run_child(CACHE_PROBE, NUMBA_CACHE_DIR=str(caches[kind]))

    with ThreadPoolExecutor(2) as pool:  # two cores: two children at a time
        first = dict(zip(caches, pool.map(probe, caches)))
        second = dict(zip(caches, pool.map(probe, caches)))
    expected = warm.digests["small"]
    failures = {}
    for kind, (_, warnings_expected) in CORRUPTIONS.items():
        got, healed = first[kind], second[kind]
        if not (
            len(got["messages"]) == warnings_expected
            and got["misses"] == 1
            and got["hits"] == 0
            and got["digest"] == got["digest_again"] == expected
        ):
            failures[kind] = ("corrupt run", got)
        elif not (
            healed["messages"] == [] and healed["hits"] == 1 and healed["misses"] == 0 and healed["digest"] == expected
        ):
            failures[kind] = ("next process", healed)
    assert not failures, failures


def test_a_memory_error_while_loading_a_kernel_is_not_taken_for_a_corrupt_cache():
    """Out of memory while reading a cached kernel: the call fails with the MemoryError and the cache is left
    alone (rewriting its index would throw a good cache away, and compiling needs far more memory)."""
    from fastbn.backends.cpu import jit

    class Exhausted:
        flushed = False

        def load_overload(self, sig, target_context):
            raise MemoryError

        def flush(self):
            Exhausted.flushed = True

    dispatcher = types.SimpleNamespace(_cache=None)
    cache = jit._FallbackCache(dispatcher, Exhausted())
    with pytest.raises(MemoryError):
        cache.load_overload(None, None)
    assert not Exhausted.flushed and dispatcher._cache is None


# ---------------------------------------------------------- memory exhaustion ---
MEMORY = """
import re, resource, traceback

def address_space():
    return int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10

x = big_batch()
reference = digest(*train(x))  # warms the kernels (compiling needs memory), for a fresh output
assert digest(*train(x)) == reference  # and for a recycled one: its block is now in the pool
small = batch(SMALL)  # made before any limit: the point is that a smaller call works under it
small_reference = digest(*train(small))
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
out = {}
# The output is recycled from the pool; the margin is just under the first array of scratch (2 MiB and a
# page: it cannot be mapped).  Raising the MemoryError, the interpreter itself may then map a new 1 MiB
# arena of small objects (CPython 3.10+), which stays: the smaller call below has the rest, 992 KiB, for
# its output and its digest's copy (2 x 260 KiB).
cases = {"scratch": (lambda: None, (2 << 20) - (32 << 10)),
         "output": (fastbn.empty_cache, 64 << 20)}  # far less than the 256 MiB output
for case, (prepare, margin) in cases.items():
    prepare()
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + margin, hard))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    try:
        fastbn.forward(x, running_mean=rm, running_var=rv)
        out[case] = {"raised": None}
    except Exception as exc:  # noqa: BLE001 - reported
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        out[case] = {"raised": type(exc).__name__, "message": str(exc), "where": frame.name,
                     "file": os.path.basename(frame.filename)}
    out[case]["unchanged"] = rm.tobytes() == np.zeros(4, np.float32).tobytes() and \\
        rv.tobytes() == np.ones(4, np.float32).tobytes()
    out[case]["smaller_call_ok"] = digest(*train(small)) == small_reference  # under the limit
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
out["big_again_ok"] = digest(*train(x)) == reference
report(**out)
"""


def test_memory_exhaustion_is_a_memory_error_with_running_statistics_unchanged(warm):
    """With the address space limited after warm-up: the statistics kernel's scratch that cannot be
    allocated (the output recycled from the pool), and an output that cannot be mapped, are each a
    MemoryError (no crash), the running statistics are bit-for-bit untouched, a smaller call works under
    the limit, and the big one once it is lifted.  (glibc's mmap threshold is fixed so that freed scratch
    is unmapped rather than kept in its heap, where the limit would never see the next allocation.)"""
    out = run_child(MEMORY, NUMBA_CACHE_DIR=str(warm.cache), MALLOC_MMAP_THRESHOLD_="131072", FASTBN_POOL_BYTES="1G")
    output, scratch = out["output"], out["scratch"]
    assert output["raised"] == "MemoryError" and output["file"] == "alloc.py", output
    assert scratch["raised"] == "MemoryError" and scratch["where"] == "_launch", scratch  # inside a kernel
    for case in (output, scratch):
        assert case["unchanged"] and case["smaller_call_ok"], case
    assert out["big_again_ok"]


SWEEP = """
import re, resource

def address_space():
    return int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10

soft, hard = resource.getrlimit(resource.RLIMIT_AS)
counts = {"correct": 0, "MemoryError": 0, "WRONG": 0, "HALF-UPDATED": 0}
for shape in ((8, 64, 300), (16, 8, 64, 64), (4096, 96)):  # fused tasks, streamed pieces, rows blocks
    x = batch(shape)
    # Three calls compile every variant the loop below meets (a fresh output, then recycled ones):
    # compiling under the limit would abort in LLVM, which is the README's stated exception.
    reference = [digest(*train(x)) for _ in range(3)][-1]
    base = address_space()
    for margin in range(0, 24 << 20, 96 << 10):
        rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
        resource.setrlimit(resource.RLIMIT_AS, (base + margin, hard))
        try:
            y, _ = fastbn.forward(x, running_mean=rm, running_var=rv)
        except MemoryError:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            untouched = rm.tobytes() == np.zeros_like(rm).tobytes() and rv.tobytes() == np.ones_like(rv).tobytes()
            counts["MemoryError" if untouched else "HALF-UPDATED"] += 1
            continue
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        counts["correct" if digest(y, rm, rv) == reference else "WRONG"] += 1
report(counts=counts)
"""


def test_every_address_space_limit_gives_the_right_answer_or_a_memory_error(warm):
    """A sweep of address-space limits, 96 KiB apart from the current size up, over the three kernel
    families that allocate per task (fused SLAB tasks, streamed pieces, ROWS blocks): each call is bit-
    for-bit right or a MemoryError with the running statistics untouched; never a silently wrong or
    half-written answer, never a crash."""
    counts = run_child(SWEEP, NUMBA_CACHE_DIR=str(warm.cache))["counts"]
    assert counts["WRONG"] == counts["HALF-UPDATED"] == 0 and counts["correct"] > 0, counts


# ----------------------------------------------------------------- signals ---
SIGNALS = """
import signal, threading
from fastbn.backends.cpu import alloc

class Alarm(Exception):
    pass

def raise_alarm(signum, frame):
    raise Alarm

def send_sigint(signum, frame):
    os.kill(os.getpid(), signal.SIGINT)  # handled by Python's default SIGINT handler: KeyboardInterrupt

signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored

x = batch(MEDIUM)
y_ref, after_mean, after_var = train(x)
before_mean, before_var = np.zeros(8, np.float32), np.ones(8, np.float32)
rm, rv = before_mean.copy(), before_var.copy()
delays = [20e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1600e-6, 5e-3, 20e-3]  # the last: most calls complete
counts = {}
for handler, expected in ((raise_alarm, Alarm), (send_sigint, KeyboardInterrupt)):
    signal.signal(signal.SIGALRM, handler)
    for i in range(1400):
        rm[...] = before_mean
        rv[...] = before_var
        y = None
        try:
            signal.setitimer(signal.ITIMER_REAL, delays[i % len(delays)])
            try:
                y, _ = fastbn.forward(x, running_mean=rm, running_var=rv)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except expected:
            pass
        updated = rm.data == after_mean.data and rv.data == after_var.data
        untouched = rm.data == before_mean.data and rv.data == before_var.data
        if y is not None:
            kind = "completed" if updated and y.data == y_ref.data else "completed WRONG"
        else:
            kind = "interrupted, " + ("updated" if updated else "untouched" if untouched else "HALF-UPDATED")
        key = f"{expected.__name__}: {kind}"
        counts[key] = counts.get(key, 0) + 1
# The layer: its count is stored after the kernel updated the statistics, so an interrupt in between must
# not leave them apart (the layer puts the statistics back, tests/test_layer.py).
layer_counts = {}
signal.signal(signal.SIGALRM, raise_alarm)
for i in range(700):
    layer = fastbn.BatchNorm(8)
    y = None
    try:
        signal.setitimer(signal.ITIMER_REAL, delays[i % len(delays)])
        try:
            y = layer(x)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Alarm:
        pass
    count = layer.num_batches_tracked
    updated = layer.running_mean.data == after_mean.data and layer.running_var.data == after_var.data
    untouched = layer.running_mean.data == before_mean.data and layer.running_var.data == before_var.data
    kind = "updated" if count == 1 and updated else "untouched" if count == 0 and untouched else "APART"
    key = ("completed " if y is not None else "interrupted ") + kind
    layer_counts[key] = layer_counts.get(key, 0) + 1
signal.signal(signal.SIGALRM, signal.SIG_DFL)
stats = alloc.POOL.stats()  # every pool block here is 2 MiB
later = [digest(*train(x)) == digest(y_ref, after_mean, after_var) for _ in range(50)]
stats_later = alloc.POOL.stats()
pid = os.fork()  # the fork waits for every launch lock: none may be left held
if pid == 0:
    os._exit(0 if digest(*train(x)) == digest(y_ref, after_mean, after_var) else 3)
child = wait_child(pid, 30)
result = []
# A daemon thread: one that hangs (Numba's start-up lock left held by an interrupted call, once) is reported.
thread = threading.Thread(target=lambda: result.append(digest(*train(x)) == digest(y_ref, after_mean, after_var)),
                          daemon=True)
thread.start(); thread.join(30)
report(counts=counts, layer_counts=layer_counts, free_bytes=stats["free_bytes"], free_blocks=stats["free_blocks"],
       later_ok=all(later), recycled=stats_later["hits"] - stats["hits"], fork_child=child, thread_ok=result == [True])
"""


def test_signals_during_training_calls_leave_running_statistics_whole_and_later_calls_correct(warm):
    """A Python signal handler that raises (an exception of its own, or KeyboardInterrupt from a real
    SIGINT) at 20 us - 20 ms into a training forward, 2800 times: each call either completes correctly or
    raises, with the running statistics untouched or fully updated (Numba code cannot be interrupted, and
    the update is one kernel); afterwards the output pool's books balance, it still recycles, and calls,
    a thread's call and a fork are correct."""
    out = run_child(SIGNALS, timeout=300, NUMBA_CACHE_DIR=str(warm.cache))
    counts = out["counts"]
    assert not [key for key in counts if "WRONG" in key or "HALF" in key], counts
    layer_counts = out["layer_counts"]
    assert not [key for key in layer_counts if "APART" in key], layer_counts  # count and statistics together
    assert layer_counts.get("completed updated", 0) > 0, layer_counts
    for name in ("Alarm", "KeyboardInterrupt"):
        assert counts.get(f"{name}: completed", 0) > 0 and counts.get(f"{name}: interrupted, untouched", 0) > 0, counts
    assert out["free_bytes"] == out["free_blocks"] * (2 << 20), out
    assert out["later_ok"] and out["recycled"] >= 49, out
    assert out["fork_child"] == 0 and out["thread_ok"], out


# ------------------------------------------------------ fork, threads, layers ---
FORKS = """
import threading, multiprocessing
layer = os.environ.get("FAULTS_LAYER")
if layer == "omp-started-elsewhere":
    import numba
    @numba.njit(parallel=True)
    def users_own(a):
        total = 0.0
        for i in numba.prange(a.size):
            total += a[i]
        return total
    users_own(np.ones(10))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    reference = digest(*train(batch(TINY)))
omp_warning = sum("already started as 'omp'" in str(w.message) for w in caught)

def check():
    return digest(*train(batch(TINY))) == reference

stop, errors, calls = threading.Event(), [], [0]
def worker():
    while not stop.is_set():
        if not check():
            errors.append("wrong")
        calls[0] += 1
threads = [threading.Thread(target=worker) for _ in range(4)]
for thread in threads:
    thread.start()
children = {}
for _ in range(int(os.environ["FAULTS_FORKS"])):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if all(check() for _ in range(3)) else 3)
    outcome = wait_child(pid, 5)
    children[str(outcome)] = children.get(str(outcome), 0) + 1
    if outcome == "hung":
        break

def digest_of_call(_):
    return digest(*train(batch(TINY)))

pool_ok = None
if not layer.startswith("omp"):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool_ok = pool.map_async(digest_of_call, range(4)).get(timeout=60) == [reference] * 4
stop.set()
for thread in threads:
    thread.join(60)
report(layer=fastbn.threading_layer(), children=children, pool_ok=pool_ok, thread_errors=len(errors),
       thread_calls=calls[0], omp_warning=omp_warning)
"""


@pytest.mark.parametrize("layer", ["tbb", "workqueue", "omp", "omp-started-elsewhere"])
def test_forks_while_threads_run_kernels(warm, layer):
    """Four threads run kernels while the main thread forks children that run kernels themselves, and then
    a multiprocessing 'fork' Pool does.  tbb (the default) and workqueue are fork-safe as documented:
    every child exits 0 with correct results (before fastbn held forks back until running kernels finished,
    typically 1 in 12-50 of these children hung in TBB, at worst 1 in 6).  GNU OpenMP is documented
    unsafe: a child that runs a kernel is killed; when other code started it unasked, fastbn warns once."""
    forks = {"tbb": 60, "workqueue": 20}.get(layer, 3)
    chosen = {"tbb": None, "workqueue": "workqueue", "omp": "omp", "omp-started-elsewhere": None}[layer]
    out = run_child(
        FORKS,
        timeout=300,
        NUMBA_CACHE_DIR=str(warm.cache),
        NUMBA_THREADING_LAYER=chosen,
        FAULTS_LAYER=layer,
        FAULTS_FORKS=str(forks),
    )
    if layer.startswith("omp") and out["layer"] != "omp":
        pytest.skip(f"Numba started {out['layer']!r} here, not GNU OpenMP")
    assert out["thread_errors"] == 0 and out["thread_calls"] > 0, out
    if layer.startswith("omp"):
        # "Terminating: fork() called from a process already using GNU OpenMP, this is unsafe."
        assert out["children"] == {str(-signal.SIGTERM): forks}, out
        assert out["omp_warning"] == (1 if layer == "omp-started-elsewhere" else 0), out
    else:
        assert out["layer"] == layer and out["children"] == {"0": forks}, out
        assert out["pool_ok"] and out["omp_warning"] == 0, out
