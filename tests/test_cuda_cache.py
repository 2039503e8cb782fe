"""The CUDA kernels' disk cache, checked without a GPU: every kernel variant has an entry of its own.

Compiling needs a GPU (the cache is filled at a kernel's first launch, for
the device's compute capability), so what is checked here is the part that
decides *which* cached code a launch would get: the index file each
kernel's dispatcher uses and the key of each of its signatures.  Kernel
variants are generated from one Python function per kernel with different
closures (the accumulation type, the ReLU and residual options), so a
collision would hand one variant another's code; and the stamp covers every
source file of the backend, so editing an inlined device function in
another file invalidates the cache.  (On a GPU, ``python -m fastbn
gpu-check`` runs the hardware test that a second process loads what the
first compiled: tests/cuda/test_cuda_hardware.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba_cuda")

from fastbn.backends.cuda import plan, target


class _Codegen:
    """Stands for the CUDA codegen, whose magic tuple names the current device's compute capability."""

    def magic_tuple(self):
        return ("nvptx64-nvidia-cuda", "sm_90", "")


def test_every_kernel_variant_has_a_cache_entry_of_its_own_stamped_with_the_backends_sources():
    entries = set()
    compilations = set()  # (kernel, signature) pairs: float16 and float32 share per-channel kernels
    for dtype in (np.float16, np.float32, np.float64):
        for name, dispatcher, argtypes in plan.signatures(dtype):
            cache = dispatcher._cache
            assert type(cache).__name__ == "_GuardedCache", (name, type(cache).__name__)
            assert cache._cache_file._source_stamp == target._backend_sources_hash(), name
            key = cache._cache._index_key(argtypes, _Codegen())
            entries.add((cache._cache_file._index_path, key))
            compilations.add((id(dispatcher), argtypes))
    assert len(entries) == len(compilations) > 2 * len(plan.signatures(np.float32))


def test_a_failing_cache_turns_into_a_miss_and_then_off(caplog):
    _, dispatcher, argtypes = plan.signatures(np.float32)[0]
    guarded = target._GuardedCache(dispatcher, None)

    class Broken:
        def load_overload(self, sig, context):
            raise EOFError("truncated index")

        def flush(self):
            self.flushed = True

        def save_overload(self, sig, data):
            raise PermissionError("read-only directory")

    broken = guarded._cache = Broken()
    saved = dispatcher._cache
    try:
        with caplog.at_level("WARNING", logger="fastbn.compile"):
            assert guarded.load_overload(argtypes, None) is None and broken.flushed
            guarded.save_overload(argtypes, object())
        assert type(dispatcher._cache).__name__ == "NullCache"
        assert "read-only directory" in dispatcher._fastbn_uncached
        assert [r.message.split(" (")[0] for r in caplog.records] == [
            "CUDA kernel cache unreadable",
            "CUDA kernel cache not writable",
        ]
    finally:
        dispatcher._cache = saved
        dispatcher.__dict__.pop("_fastbn_uncached", None)
