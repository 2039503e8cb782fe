"""The CPU plan as a value: chosen from a table of cases, printed by ``python -m fastbn plan``, and
exactly what the kernels then run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn._layout import ROWS, SLAB
from fastbn.backends.cpu import passes, plan
from fastbn.backends.cpu.machine import Machine, read
from fastbn.tools.plan import SMALL_PATH

# A machine with round figures, so the table does not depend on the one running the tests:
# budget (1 MiB + 8 MiB / 2) * 2 / 3 = 3.33 MiB; non-temporal from 8 MiB of output.
FACTS = Machine(model="test", cores=2, l1d_bytes=32 << 10, l2_bytes=1 << 20, l3_bytes=8 << 20, l3_sharers=2)

# (operation, layout, kernel shape, itemsize, out_fresh, masked) -> (layout, strategy, group, nontemporal)
CASES = [
    # long runs (16 KiB), channels of 1 MiB: fused into memory in use, streamed into a fresh output
    (("forward_train", SLAB, (64, 16, 4096), 4, False, False), (SLAB, "fused", 1, True)),
    (("forward_train", SLAB, (64, 16, 4096), 4, True, False), (SLAB, "streamed", 0, True)),
    (("backward_train", SLAB, (64, 16, 4096), 4, False, False), (SLAB, "fused", 1, True)),
    # backward behind a ReLU reads three tensors: 3 MiB still fits, a 4x larger batch does not
    (("backward_train", SLAB, (64, 16, 4096), 4, False, True), (SLAB, "fused", 1, True)),
    (("backward_train", SLAB, (256, 16, 4096), 4, False, True), (SLAB, "streamed", 0, True)),
    # statistics alone stream; so do short runs (784-byte 14 x 14 images)
    (("moments", SLAB, (64, 16, 4096), 4, False, False), (SLAB, "streamed", 0, False)),
    (("forward_train", SLAB, (256, 16, 196), 4, False, False), (SLAB, "streamed", 0, False)),
    # few channels and a long batch: the fused plan's tasks are too few, the streamed pieces win
    (("forward_train", SLAB, (64, 2, 4096), 4, False, False), (SLAB, "streamed", 0, False)),
    # a tiny batch: one piece, so the fused plan's channels keep more cores busy
    (("moments", SLAB, (8, 3, 5), 4, False, False), (SLAB, "fused", 1, False)),
    # channels last streams; one channel of ROWS runs as a SLAB run
    (("forward_train", ROWS, (100_000, 64), 4, False, False), (ROWS, "streamed", 0, True)),
    (("forward_train", ROWS, (5000, 1), 4, False, False), (SLAB, "streamed", 0, False)),
    # small outputs stay in cache
    (("normalize", SLAB, (4, 8, 100), 2, False, False), (SLAB, "streamed", 0, False)),
    (("backward_sums", SLAB, (64, 16, 4096), 4, False, False), (SLAB, "streamed", 0, False)),
]


@pytest.mark.parametrize("arguments, expected", CASES)
def test_plan_table(arguments, expected):
    operation, layout, shape, itemsize, out_fresh, masked = arguments
    chosen = plan.choose(operation, layout, shape, itemsize, out_fresh=out_fresh, masked=masked, facts=FACTS)
    assert (chosen.layout, chosen.strategy, chosen.group, chosen.nontemporal) == expected, chosen.describe()
    assert chosen.reasons and all(isinstance(reason, str) for reason in chosen.reasons)


def test_overrides_force_fields_and_bad_ones_name_the_argument():
    forced = plan.choose(
        "forward_train",
        SLAB,
        (64, 16, 4096),
        4,
        out_fresh=True,
        override={"strategy": "fused", "nontemporal": False},
        facts=FACTS,
    )
    assert (forced.strategy, forced.group, forced.nontemporal) == ("fused", 1, False)
    with pytest.raises(ValueError, match=r"^_plan: unknown plan field"):
        plan.choose("moments", SLAB, (4, 3, 5), 4, override={"speed": "max"})
    with pytest.raises(ValueError, match=r"^_plan: .*has no fused plan"):
        plan.choose("forward_train", ROWS, (100, 8), 4, override={"strategy": "fused"})
    with pytest.raises(ValueError, match=r"^_plan: nontemporal must be"):
        fastbn.forward(np.ones((4, 3), np.float32), _plan={"nontemporal": "yes"})


def test_machine_facts_from_sysfs_and_the_fallbacks(tmp_path):
    for index, (level, kind, size, shared) in enumerate(
        [
            (1, "Data", "48K", "0"),
            (1, "Instruction", "32K", "0"),
            (2, "Unified", "2048K", "0"),
            (3, "Unified", "105M", "0-55"),
        ]
    ):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (folder / name).write_text(f"{value}\n")
    facts = read(str(tmp_path))
    assert (facts.l1d_bytes, facts.l2_bytes, facts.l3_bytes, facts.l3_sharers) == (48 << 10, 2 << 20, 105 << 20, 56)
    assert facts.guessed == ()
    missing = read(str(tmp_path / "nowhere"))
    assert missing.guessed == ("L1", "L2", "L3") and missing.l3_bytes == 8 << 20


def _run_logged(call):
    passes.LAUNCH_LOG = []
    try:
        result = call()
        return result, passes.LAUNCH_LOG
    finally:
        passes.LAUNCH_LOG = None


def _printed_plans(text):
    """The plans ``python -m fastbn plan`` printed, as {(operation, first line): kernels line}."""
    lines = text.splitlines()
    return [
        (lines[i].strip(), lines[i + 1].strip())
        for i in range(len(lines) - 1)
        if lines[i + 1].strip().startswith("kernels:")
    ]


# Shapes whose outputs come from the pool (>= 1 MiB, so a first call and a call in a loop can plan
# differently) and small ones, in both layouts.
PLAN_CASES = [
    ((64, 16, 32, 32), 1, np.float32),
    ((4, 5, 6), 1, np.float64),
    ((64, 16, 16, 40), -1, np.float32),
    ((3000, 1), 1, np.float16),
]


@pytest.mark.parametrize("dims, axis, dtype", PLAN_CASES)
def test_printed_plan_is_what_the_kernels_ran(dims, axis, dtype):
    """`python -m fastbn plan` prints, for each call, the plan the public function then runs: the same
    plan value, and the kernels it names are the kernels launched, in order."""
    label = "x".join(map(str, dims)) + (f"@{axis}" if axis != 1 else "")
    printed = subprocess.run(
        [sys.executable, "-m", "fastbn", "plan", label, np.dtype(dtype).name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    printed_plans = _printed_plans(printed)
    small = SMALL_PATH in printed  # then plain forward and backward calls launch no plan at all
    x = np.random.default_rng(0).standard_normal(dims).astype(dtype)
    params = np.float64 if dtype == np.float64 else np.float32
    channels = dims[axis]
    rm, rv = np.zeros(channels, params), np.ones(channels, params)
    calls = [
        lambda: fastbn.forward(x, running_mean=rm, running_var=rv, axis=axis),
        lambda: fastbn.forward(x, running_mean=rm, running_var=rv, axis=axis, training=False),
        lambda: fastbn.moments(x, axis=axis),
    ]
    fastbn.empty_cache()  # the first call maps fresh memory; later ones recycle the previous output
    seen = []
    for _ in range(2):
        for call in calls:
            result, log = _run_logged(call)
            del result
            if small and call is not calls[2]:  # moments has no small path
                assert log == [], "a small plain call launched a plan's kernels"
                continue
            plans = {id(p): p for _, p in log}
            assert len(plans) == 1, "one plan per call"
            (ran,) = plans.values()
            assert tuple(name for name, _ in log) == ran.kernels()
            seen.append(ran)
        y, saved = fastbn.forward(x, running_mean=rm, running_var=rv, axis=axis)
        grads, log = _run_logged(lambda: fastbn.backward(np.ones_like(x), x, None, saved, axis=axis))  # noqa: B023 - called at once, in this iteration
        del y, grads
        if small:
            assert log == [], "a small plain backward launched a plan's kernels"
            continue
        (ran,) = {id(p): p for _, p in log}.values()
        assert tuple(name for name, _ in log) == ran.kernels()
        seen.append(ran)
    for ran in seen:
        first, kernels = ran.describe().splitlines()[:2]
        assert (first.strip(), kernels.strip()) in printed_plans, (ran.describe(), printed)


# ------------------------------------------------ machine constants from the machine (issue 17, item 6) ---
def _fake_machine(root, caches, flags):
    """A sysfs cache folder with ``caches`` ((level, type, size, shared_cpu_list) each) and a cpuinfo with ``flags``."""
    sysfs = root / "cache"
    sysfs.mkdir()
    for index, (level, kind, size, shared) in enumerate(caches):
        folder = sysfs / f"index{index}"
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (folder / name).write_text(f"{value}\n")
    cpuinfo = root / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Fake CPU 9000\nflags\t\t: " + " ".join(flags) + "\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: sse2\n"
    )
    return str(sysfs), str(cpuinfo)


def test_machine_reads_extensions_vector_width_and_where_each_fact_came_from(tmp_path):
    sysfs, cpuinfo = _fake_machine(
        tmp_path,
        [(1, "Data", "48K", "0"), (2, "Unified", "2048K", "0"), (3, "Unified", "64M", "0-7")],
        ["fpu", "sse2", "avx", "avx2", "avx512f", "avx512_fp16"],
    )
    facts = read(sysfs, cpuinfo)
    assert facts.model == "Fake CPU 9000"  # the first CPU's, not the last one's
    assert facts.extensions == ("avx2", "avx512f", "avx512_fp16")
    assert facts.vector_bytes == 64
    assert facts.origin("l2_bytes") == f"{sysfs}/index1/size"
    assert facts.origin("l3_sharers") == f"{sysfs}/index2/shared_cpu_list" and facts.l3_sharers == 8
    assert facts.origin("vector_bytes").startswith(cpuinfo)
    # without AVX-512 the stores are 32 bytes, without AVX 16; the derived constants follow the caches
    for flags, width in ((["sse2", "avx", "avx2"], 32), (["sse2"], 16)):
        folder = tmp_path / f"w{width}"
        folder.mkdir()
        assert read(*_fake_machine(folder, [(1, "Data", "32K", "0")], flags)).vector_bytes == width
    assert plan.stream_chunk(facts) == 2048  # 48 KiB / 16 = 3072, rounded down to a power of two
    assert plan.nontemporal_bytes(facts) == 64 << 20
    assert plan.fuse_bytes(facts) == ((2 << 20) + (64 << 20) // 8) * 2 // 3


def test_machine_fallbacks_are_stated_when_sysfs_and_cpuinfo_are_absent(tmp_path):
    facts = read(str(tmp_path / "no-sysfs"), str(tmp_path / "no-cpuinfo"))
    assert facts.guessed == ("L1", "L2", "L3")
    assert (facts.l1d_bytes, facts.l2_bytes, facts.l3_bytes, facts.l3_sharers) == (
        32 << 10,
        512 << 10,
        8 << 20,
        facts.cores,
    )
    assert facts.extensions == () and facts.vector_bytes == 32
    assert all(facts.origin(name) == "fallback" for name in ("l1d_bytes", "l3_bytes", "extensions", "vector_bytes"))
    assert plan.stream_chunk(facts) == 2048 and plan.nontemporal_bytes(facts) == 8 << 20


@pytest.mark.parametrize(
    "l1d, chunk", [(16 << 10, 1024), (32 << 10, 2048), (64 << 10, 4096), (1 << 10, 512), (1 << 20, 8192)]
)
def test_stream_chunk_is_half_the_l1d_in_float64_within_bounds(l1d, chunk):
    facts = Machine(model="t", cores=2, l1d_bytes=l1d, l2_bytes=1 << 20, l3_bytes=8 << 20, l3_sharers=2)
    assert plan.stream_chunk(facts) == chunk


def test_plan_prints_the_constants_it_resolved_and_from_where(tmp_path):
    from fastbn.tools import plan as plan_tool

    sysfs, cpuinfo = _fake_machine(tmp_path, [(1, "Data", "64K", "0"), (3, "Unified", "16M", "0-1")], ["avx", "avx2"])
    lines = "\n".join(plan_tool.constants(read(sysfs, cpuinfo)))
    assert f"L1d 64 KiB: {sysfs}/index0/size" in lines
    assert "L2 512 KiB per core: fallback" in lines  # no L2 in the fake tree
    assert f"L3 16 MiB shared by 2 CPUs: {sysfs}/index1/size" in lines
    assert "non-temporal vector store 32 bytes: " + cpuinfo in lines and "vector extensions avx2:" in lines
    assert "non-temporal scratch chunk 4096 elements" in lines and "non-temporal stores from 16 MiB" in lines
    # the command prints this machine's, which are what the kernels were compiled with
    from fastbn.backends.cpu import nontemporal
    from fastbn.backends.cpu.machine import machine

    text = plan_tool.report((8, 4, 6, 6), 1, np.float32)
    assert "Machine constants" in text and f"non-temporal scratch chunk {plan.STREAM_CHUNK} elements" in text
    assert plan.stream_chunk(machine()) == plan.STREAM_CHUNK and machine().vector_bytes == nontemporal._VECTOR_BYTES
    assert f"non-temporal vector store {machine().vector_bytes} bytes" in text


def test_stream_copy_writes_the_same_bytes_at_every_vector_width(monkeypatch):
    """The vector width is compiled into the kernels and a kernel cached on disk keeps the width it was compiled
    with: every width the machine can report must write the same bytes (here compiled afresh, uncached)."""
    import numba

    from fastbn.backends.cpu import nontemporal

    rng = np.random.default_rng(3)
    src = rng.standard_normal(1000).astype(np.float32)
    for width in (16, 32, 64):
        monkeypatch.setattr(nontemporal, "_VECTOR_BYTES", width)
        copy = numba.njit(nontemporal.stream_copy.py_func)
        for start, stop in ((0, 1000), (3, 517), (16, 16), (1, 2)):
            dst = np.zeros(1000, np.float32)
            copy(dst[start:stop], src[start:stop])
            expected = np.zeros(1000, np.float32)
            expected[start:stop] = src[start:stop]
            assert np.array_equal(dst, expected), (width, start, stop)
