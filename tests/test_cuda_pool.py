"""fastbn's stream-ordered device pool (pure Python: a fake raw allocator stands in for cuMemAlloc)."""

from __future__ import annotations

import gc

import pytest

from fastbn.backends.cuda.pool import MIN_BLOCK, StreamOrderedPool, size_class


class Owner:
    """Stands for the device array over a block: the block returns to the pool when it is collected."""


def _pool(fail_first=0):
    made = []
    failures = [fail_first]

    def raw(nbytes):
        if failures[0]:
            failures[0] -= 1
            raise MemoryError("out of device memory")
        block = bytearray(nbytes)
        made.append(block)
        return block

    return StreamOrderedPool(raw), made


@pytest.mark.parametrize(
    "nbytes, expected",
    [(0, MIN_BLOCK), (1, MIN_BLOCK), (MIN_BLOCK, MIN_BLOCK), (MIN_BLOCK + 1, 2 * MIN_BLOCK), (3000, 4096)],
)
def test_size_classes_are_powers_of_two_from_the_minimum(nbytes, expected):
    assert size_class(nbytes) == expected


def test_a_negative_size_is_refused():
    with pytest.raises(ValueError, match=r"^nbytes: expected a non-negative size, got -1"):
        size_class(-1)


def test_a_released_block_is_reused_on_its_stream_only():
    pool, _ = _pool()
    block, size, release = pool.acquire(1000, stream=7)
    assert size == 1024 and len(block) == 1024
    release()
    release()  # twice is once
    again, _, release_again = pool.acquire(900, stream=7)
    assert again is block and pool.allocations == 1
    other, _, _ = pool.acquire(900, stream=8)  # another stream never takes it: its old work may still run
    assert other is not block and pool.allocations == 2
    release_again()
    assert pool.cached_bytes() == 1024


def test_blocks_return_when_their_owner_is_collected_and_a_steady_loop_allocates_nothing(young_heap):
    pool, _ = _pool()

    def step():
        owners = []
        for nbytes in (64, 4096, 100_000, 64):
            owner = Owner()
            _, _, release = pool.acquire(nbytes, stream=0)
            pool.release_when_collected(owner, release)
            owners.append(owner)
        del owners
        gc.collect()

    step()
    allocations = pool.allocations
    assert allocations == 4
    for _ in range(20):
        step()
    assert pool.allocations == allocations


def test_out_of_memory_empties_the_cache_and_retries_once():
    pool, _ = _pool()
    _, _, release = pool.acquire(MIN_BLOCK, stream=0)
    release()
    assert pool.cached_bytes() == MIN_BLOCK
    failing, _ = _pool(fail_first=1)
    failing._free = pool._free  # the cached block of the first pool
    block, _, _ = failing.acquire(10 * MIN_BLOCK, stream=0)
    assert len(block) == 16 * MIN_BLOCK and failing.cached_bytes() == 0
    never, _ = _pool(fail_first=2)
    with pytest.raises(MemoryError, match="out of device memory"):
        never.acquire(1, stream=0)
