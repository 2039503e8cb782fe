"""Arguments that used to be accepted and then lost an update, aliased another argument or failed deep
inside: each is now refused before any kernel runs, naming the argument, with every array unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn

C = 3


def _batch(shape=(4, C, 5)):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


class ArrayLike:
    """An object NumPy converts by copying, through __array__."""

    def __init__(self, values):
        self.values = np.asarray(values, np.float32)

    def __array__(self, dtype=None, copy=None):
        return self.values.copy()


@pytest.mark.parametrize("make", [list, tuple, ArrayLike], ids=["list", "tuple", "__array__"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_statistics_that_would_be_copied_are_refused(make, which):
    """The update would go into a temporary copy: a TypeError instead, the other statistic untouched."""
    arrays = {"running_mean": np.zeros(C, np.float32), "running_var": np.ones(C, np.float32)}
    kept = arrays["running_var" if which == "running_mean" else "running_mean"]
    before = kept.copy()
    arrays[which] = make([0.0] * C if which == "running_mean" else [1.0] * C)
    with pytest.raises(TypeError, match=f"^{which}: expected a NumPy array or a CPU torch tensor"):
        fastbn.forward(_batch(), **arrays)
    assert np.array_equal(kept, before)


@pytest.mark.parametrize("make", [ArrayLike, "expanded tensor"])
def test_eval_only_reads_the_running_statistics_so_any_array_form_is_taken(make):
    """Eval writes nothing: an __array__ object (or a list) or, as torch takes it, an expanded tensor is read as any
    input; the expanded tensor was refused as "updated in place" by fastbn.torch and fastbn.forward."""
    x = _batch()
    expected, _ = fastbn.forward(x, running_mean=np.zeros(C, np.float32), running_var=np.ones(C, np.float32),
                                 training=False)  # fmt: skip
    if make == "expanded tensor":
        torch = pytest.importorskip("torch")
        ft = pytest.importorskip("fastbn.torch")
        rm, rv = torch.zeros(1).expand(C), torch.ones(1).expand(C)
        y = fastbn.forward(x, running_mean=rm, running_var=rv, training=False)[0]
        xt = torch.from_numpy(x)
        torch.testing.assert_close(ft.batch_norm(xt, rm, rv), torch.nn.functional.batch_norm(xt, rm, rv))
    else:
        y = fastbn.forward(x, running_mean=make([0.0] * C), running_var=make([1.0] * C), training=False)[0]
    np.testing.assert_array_equal(y, expected)


def test_zero_stride_running_statistics_are_refused():
    base = np.zeros(1, np.float32)
    broadcast = np.lib.stride_tricks.as_strided(base, shape=(C,), strides=(0,))
    assert broadcast.flags.writeable
    running_var = np.ones(C, np.float32)
    with pytest.raises(ValueError, match=r"^running_mean: has stride 0"):
        fastbn.forward(_batch(), running_mean=broadcast, running_var=running_var)
    assert base[0] == 0 and np.array_equal(running_var, np.ones(C, np.float32))


@pytest.mark.parametrize("other", ["weight", "bias", "x"])
def test_running_statistics_sharing_memory_with_another_argument_are_refused(other):
    x = _batch((4, C))
    weight, bias = np.ones(C, np.float32), np.zeros(C, np.float32)
    arguments = {"weight": weight, "bias": bias, "x": x}
    running_mean = arguments[other] if other != "x" else x[0]
    running_var = np.ones(C, np.float32)
    snapshot = {name: value.copy() for name, value in arguments.items()}
    with pytest.raises(ValueError, match=f"^running_mean: shares memory with {other}"):
        fastbn.forward(x, weight, bias, running_mean=running_mean, running_var=running_var)
    for name, value in arguments.items():
        assert np.array_equal(value, snapshot[name]), name
    assert np.array_equal(running_var, np.ones(C, np.float32))


def test_interleaved_views_of_one_buffer_are_separate_memory():
    """Views that interleave without sharing an element are fine (the check is exact, not by bounds)."""
    buffer = np.zeros(2 * C, np.float32)
    buffer[1::2] = 1
    _y, _ = fastbn.forward(_batch(), running_mean=buffer[0::2], running_var=buffer[1::2], momentum=1.0)
    assert np.allclose(buffer[0::2], _batch().mean(axis=(0, 2)), atol=1e-6)


def test_masked_arrays_are_refused_rather_than_their_mask_ignored():
    x = np.ma.masked_array(_batch(), mask=np.zeros((4, C, 5), bool))
    with pytest.raises(TypeError, match=r"^x: is a masked array"):
        fastbn.forward(x)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself warns
def test_matrix_input_is_its_plain_array():
    x = np.asmatrix(_batch((6, C)))
    y, _ = fastbn.forward(x, axis=0)
    expected, _ = fastbn.forward(np.asarray(x), axis=0)
    assert type(y) is np.ndarray and np.array_equal(y, expected)


@pytest.mark.parametrize("renorm", [{1.0: 2.0, 3.0: 4.0}, {3.0, 5.0}], ids=["dict", "set"])
def test_renorm_must_be_a_pair(renorm):
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    with pytest.raises(TypeError, match=r"^renorm: expected a pair"):
        fastbn.forward(_batch(), running_mean=rm, running_var=rv, renorm=renorm)
    assert np.array_equal(rm, np.zeros(C)) and np.array_equal(rv, np.ones(C))


def test_layer_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(_batch())
    y = fastbn.BatchNorm(C)(x)
    assert isinstance(y, torch.Tensor)
    expected, _ = fastbn.forward(_batch())
    assert np.array_equal(y.numpy(), expected)


# ------------------------------------------------------------- cache faults ---
_CACHE_PROBE = """
import os, shutil, sys, warnings, numpy as np
warnings.simplefilter("always")
import fastbn
from fastbn.backends.cpu import fused
x = np.random.default_rng(0).standard_normal((8, 3, 5))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y, _ = fastbn.forward(x.astype(np.float32))
    ok = bool(np.allclose(y.mean(axis=(0, 2)), 0, atol=1e-6))
    {extra}
messages = [str(w.message) for w in caught if "kernel cache" in str(w.message)]
print(ok, len(messages), len(fused.forward_train_slab.stats.cache_hits))
"""


def _probe(cache, extra="pass"):
    # FASTBN_SMALL_CALLS=0: the probe's small input takes the full path, whose fused kernel it inspects
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), FASTBN_SMALL_CALLS="0")
    proc = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE.format(extra=extra)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_a_corrupt_cache_warns_once_and_heals(tmp_path):
    cache = tmp_path / "cache"
    assert _probe(cache) == ["True", "0", "0"]  # compiled and cached
    files = [path for path in cache.rglob("*") if path.suffix in (".nbi", ".nbc")]
    assert files
    for path in files:  # truncated writes
        path.write_bytes(path.read_bytes()[:20])
    assert _probe(cache) == ["True", "1", "0"]  # one warning, compiled again
    assert _probe(cache) == ["True", "0", "1"]  # healed: loaded from the cache, no warning


def test_a_cache_directory_that_disappears_mid_run_warns_once(tmp_path):
    """The cache directory is replaced by a file after the first kernels were cached; the next kernels (float64)
    cannot be cached, and run anyway."""
    cache = tmp_path / "cache"
    extra = (
        "shutil.rmtree(os.environ['NUMBA_CACHE_DIR']); open(os.environ['NUMBA_CACHE_DIR'], 'w').close(); "
        "y64, _ = fastbn.forward(x); ok = ok and bool(np.allclose(y64.mean(axis=(0, 2)), 0, atol=1e-12))"
    )
    assert _probe(cache, extra) == ["True", "1", "0"]


# ---------------------------------------------------------- threading layer ---
_OTHER_PARALLEL_CODE_FIRST = """
import warnings, numba, numpy as np
warnings.simplefilter("always")

@numba.njit(parallel=True)
def users_own(a):
    total = 0.0
    for i in numba.prange(a.size):
        total += a[i]
    return total

users_own(np.ones(10))
import fastbn
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fastbn.forward(np.ones((4, 3), np.float32))
print(fastbn.threading_layer(), sum("already started as 'omp'" in str(w.message) for w in caught))
"""


@pytest.mark.parametrize("chosen", [None, "omp"])
def test_an_openmp_layer_started_by_other_code_is_reported(chosen):
    """Numba's layer starts once per process; if other parallel code started GNU OpenMP unasked, fastbn cannot
    replace it and says what that means for fork. A layer the user chose is respected silently."""
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if chosen:
        env["NUMBA_THREADING_LAYER"] = chosen
    proc = subprocess.run(
        [sys.executable, "-c", _OTHER_PARALLEL_CODE_FIRST], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    layer, warned = proc.stdout.split()
    if layer != "omp":
        pytest.skip(f"Numba started {layer!r} for the other code here, not GNU OpenMP")
    assert warned == ("0" if chosen else "1")


# ------------------------------------------------------------ layer threads ---
def test_a_layer_shared_by_threads_loses_no_update():
    import copy
    import threading

    x = _batch((16, C, 30))
    shared, alone = fastbn.BatchNorm(C), fastbn.BatchNorm(C)
    for _ in range(40):
        alone(x)

    def steps():
        for _ in range(10):
            shared(x)

    threads = [threading.Thread(target=steps) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shared.num_batches_tracked == alone.num_batches_tracked == 40
    assert np.array_equal(shared.running_mean, alone.running_mean)
    assert np.array_equal(shared.running_var, alone.running_var)
    twin = copy.deepcopy(shared)  # the lock is per layer, not copied
    assert twin._lock is not shared._lock and np.array_equal(twin(x), shared(x))


# ------------------------------------------------------- meaning, not type ---
def test_negative_variances_are_refused_where_they_are_read():
    x = _batch()
    mean, var = np.zeros(C, np.float32), np.array([1.0, -0.5, 1.0], np.float32)
    with pytest.raises(ValueError, match=r"^var: expected non-negative variances, got -0.5 for channel 1"):
        fastbn.normalize(x, mean, var)
    running_mean, running_var = mean.copy(), var.copy()
    with pytest.raises(ValueError, match=r"^running_var: expected non-negative"):
        fastbn.forward(x, running_mean=running_mean, running_var=running_var, training=False)
    with pytest.raises(ValueError, match=r"^running_var: expected non-negative"):
        fastbn.forward(x, running_mean=running_mean, running_var=running_var, renorm=(3.0, 5.0))
    assert np.array_equal(running_mean, mean) and np.array_equal(running_var, var)
    with pytest.raises(ValueError, match=r"^running_var: expected non-negative"):
        fastbn.fold(np.ones((C, 2), np.float32), None, mean, var, None, None)
    # training without renorm never reads the running variance: it is overwritten, as in PyTorch
    fastbn.forward(x, running_mean=running_mean, running_var=running_var, momentum=1.0)
    assert (running_var > 0).all()
    nan_var = np.array([1.0, np.nan, 1.0], np.float32)  # NaN propagates, as in PyTorch
    assert np.isnan(fastbn.normalize(x, mean, nan_var)[:, 1]).all()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("shape", None, "^saved.shape: expected a tuple of sizes"),
        ("batch_stats", "no", "^saved.batch_stats: expected True or False"),
        ("activation", "gelu", "^saved.activation: expected None or 'relu'"),
        ("count", -1, "^saved.count: expected a non-negative integer"),
        ("r", np.ones(C, np.float32), "^saved.d: expected renorm's r and d together"),
    ],
)
def test_a_tampered_saved_is_refused(field, value, message):
    x = _batch()
    _, saved = fastbn.forward(x)
    with pytest.raises(TypeError, match=message):
        fastbn.backward(np.ones_like(x), x, None, saved._replace(**{field: value}))


def test_a_tampered_saved_is_refused_alike_on_the_small_and_full_paths():
    """(8, 3.0) == (8, 3) in Python: the small lane took a shape the full path refuses."""
    x = _batch()
    _, saved = fastbn.forward(x)
    tampered = saved._replace(shape=(x.shape[0], float(x.shape[1])))
    with pytest.raises(TypeError, match=r"^saved.shape: expected a tuple of sizes"):
        fastbn.backward(np.ones_like(x), x, None, tampered)


class _OneProcess:
    """A process group of one: allgather returns the row sent, allreduce_sum its argument."""

    def allgather(self, vector):
        return np.asarray(vector)[None]

    def allreduce_sum(self, vector):
        return vector


@pytest.mark.parametrize("count", [0, 1, 3])
def test_a_synchronised_saved_counting_fewer_elements_than_this_process_holds_is_refused(count):
    x = _batch()
    _, saved = fastbn.forward(x, process_group=_OneProcess())
    assert saved.count == x.size // C  # the global count, which is this one process's
    with pytest.raises(ValueError, match=rf"^saved.count: {count} elements per channel over all processes, fewer"):
        fastbn.backward(np.ones_like(x), x, None, saved._replace(count=count))


@pytest.mark.parametrize("change", ["negative", "nan", "sum zero", "sum off"])
def test_saved_weights_and_their_sums_must_be_what_forward_kept(change):
    """forward refuses negative or NaN weights; kept in a Saved (tampered), they gave NaN or wrong gradients."""
    x = _batch()
    weights = np.random.default_rng(2).uniform(0.5, 1.0, x.shape).astype(np.float32)
    _, saved = fastbn.forward(x, weights=weights)
    fastbn.backward(np.ones_like(x), x, None, saved)  # as kept: fine
    tampered = {
        "negative": dict(weights=-saved.weights),
        "nan": dict(weights=np.full_like(saved.weights, np.nan)),
        "sum zero": dict(weight_sum=np.zeros_like(saved.weight_sum)),
        "sum off": dict(weight_sum=saved.weight_sum * (1 + 1e-6)),
    }[change]
    field = "weights" if "weights" in tampered else "weight_sum"
    with pytest.raises(ValueError, match=rf"^saved.{field}: "):
        fastbn.backward(np.ones_like(x), x, None, saved._replace(**tampered))
