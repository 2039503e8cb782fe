"""Facts about this machine that the CPU plan depends on, read in one place.

Each fact is read once, from Linux's sysfs and the scheduler, with a stated
fallback where it cannot be read (another OS, a container hiding sysfs).
Nothing here imports Numba: ``python -m fastbn plan`` prints these figures,
and the plan (:mod:`fastbn.backends.cpu.plan`) derives its thresholds from
them, so no kernel carries a constant tuned to one machine.

=================  ==============================================  ==========
fact               why the plan needs it                           fallback
=================  ==============================================  ==========
``cores``          reported (the plan's task counts are fixed,     1
                   so results do not depend on it)
``l1d_bytes``      reported; the kernels' 8 KiB scratch fits in    32 KiB
                   any L1d met so far
``l2_bytes``       a core's private cache: fused tasks re-read     512 KiB
                   their channel from it
``l3_bytes``       the last-level cache: larger outputs are        8 MiB
                   written around it (non-temporal stores)
``l3_sharers``     CPUs sharing the L3: a core's share of it       ``cores``
``extensions``     reported: which of avx2, avx512f, avx512_bf16,  none
                   avx512_fp16 ``/proc/cpuinfo`` lists
``vector_bytes``   width of the non-temporal vector stores: 64     32
                   with avx512f, 32 with avx, 16 without (from
                   the same flags)
=================  ==============================================  ==========

Where each fact came from (a sysfs file, ``/proc/cpuinfo``, or the fallback)
is kept in :attr:`Machine.origins`, which ``python -m fastbn plan`` prints.

:func:`memory_bytes` (RAM, or the cgroup's limit) sizes the output pool's cap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

__all__ = ["Machine", "machine", "memory_bytes"]

_CACHE_ROOT = "/sys/devices/system/cpu/cpu0/cache"
_CPUINFO = "/proc/cpuinfo"

#: The vector extensions the report names, in this order, when ``/proc/cpuinfo`` lists them.
EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16")


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the CPU plan knows of the machine (see the module docstring)."""

    model: str
    cores: int
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int
    l3_sharers: int
    #: Which figures came from the fallbacks rather than from the machine.
    guessed: tuple[str, ...] = ()
    #: Which of :data:`EXTENSIONS` the CPU has.
    extensions: tuple[str, ...] = ()
    #: Bytes of one vector store of the non-temporal store path.
    vector_bytes: int = 32
    #: ``(fact, where it was read)`` pairs: a sysfs file, ``/proc/cpuinfo``, or ``"fallback"``.
    origins: tuple[tuple[str, str], ...] = ()

    def origin(self, fact: str) -> str:
        """Where ``fact`` (a field name) was read, or ``"fallback"``; ``"given"`` for a Machine made by hand."""
        return dict(self.origins).get(fact, "given" if not self.origins else "fallback")

    @property
    def core_cache_bytes(self) -> int:
        """A core's share of cache: its L2 plus its share of the L3."""
        return self.l2_bytes + self.l3_bytes // max(1, self.l3_sharers)

    def describe(self) -> str:
        """One line naming the CPU, its cores and its caches."""
        guessed = f" (guessed: {', '.join(self.guessed)})" if self.guessed else ""
        return (
            f"{self.model}, {self.cores} cores; L1d {self.l1d_bytes >> 10} KiB, L2 {self.l2_bytes >> 10} KiB "
            f"per core, L3 {self.l3_bytes >> 20} MiB shared by {self.l3_sharers} CPUs{guessed}"
        )


def parse_size(text: str) -> int:
    """Bytes of a sysfs cache size such as ``"32K"`` or ``"1024K"``."""
    text = text.strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def count_cpus(text: str) -> int:
    """How many CPUs a sysfs list such as ``"0-3,8"`` names."""
    count = 0
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    return count


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _caches(root: str) -> dict[tuple[int, str], tuple[int, int, str]]:
    """(level, type) -> (bytes, sharing CPUs, index folder) of cpu0's caches; empty where sysfs is unreadable."""
    found: dict[tuple[int, str], tuple[int, int, str]] = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return found
    for entry in entries:
        if not entry.startswith("index"):
            continue
        path = os.path.join(root, entry)
        try:
            level = int(_read(os.path.join(path, "level")))
            kind = _read(os.path.join(path, "type"))
            size = parse_size(_read(os.path.join(path, "size")))
            sharers = count_cpus(_read(os.path.join(path, "shared_cpu_list")))
        except (OSError, ValueError):
            continue
        found[level, kind] = (size, max(1, sharers), entry)
    return found


def _cpuinfo(path: str) -> tuple[str | None, set[str] | None]:
    """The model name and the flags of the first CPU in ``path`` (``/proc/cpuinfo``); None where absent."""
    model, flags = None, None
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = set(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return model, flags


def vector_width(flags: set[str] | None) -> int:
    """Bytes of the widest vector store the flags allow: 64 (avx512f), 32 (avx), 16 (sse2 or none); 32 unknown.

    The non-temporal store path (:mod:`fastbn.backends.cpu.nontemporal`)
    streams a line as 64 / this many stores.  Every value is correct (a
    store wider than the compile target's registers is split by LLVM), so a
    kernel cached under another reading still writes the same bytes.
    """
    if flags is None:
        return 32
    if "avx512f" in flags:
        return 64
    if "avx" in flags:
        return 32
    return 16


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_bytes() -> int | None:
    """Physical memory, or the cgroup's memory limit if smaller; None if unknown."""
    sizes: list[int] = []
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = _read(path)
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    sizes = [size for size in sizes if size > 0]
    return min(sizes) if sizes else None


def read(root: str = _CACHE_ROOT, cpuinfo: str = _CPUINFO) -> Machine:
    """Read the machine's facts (:func:`machine` caches this).

    ``root`` is the sysfs cache folder (cpu0's ``cache``), ``cpuinfo`` the
    file with the model name and flags; tests point both at fake trees.
    """
    caches = _caches(root)
    guessed: list[str] = []
    origins: list[tuple[str, str]] = []

    def cache(fact: str, level: int, kinds: tuple[str, ...], fallback: int) -> tuple[int, int | None]:
        for kind in kinds:
            if (level, kind) in caches:
                size, sharers, entry = caches[level, kind]
                origins.append((fact, os.path.join(root, entry, "size")))
                return size, sharers
        guessed.append(f"L{level}")
        origins.append((fact, "fallback"))
        return fallback, None

    cores = _cores()
    l1d, _ = cache("l1d_bytes", 1, ("Data", "Unified"), 32 << 10)
    l2, _ = cache("l2_bytes", 2, ("Unified", "Data"), 512 << 10)
    l3, sharers = cache("l3_bytes", 3, ("Unified",), 8 << 20)
    if sharers is not None:
        origins.append(("l3_sharers", dict(origins)["l3_bytes"].replace("size", "shared_cpu_list")))
    else:
        origins.append(("l3_sharers", "fallback"))
    model, flags = _cpuinfo(cpuinfo)
    origins.append(("model", cpuinfo if model is not None else "fallback"))
    if model is None:
        import platform

        model = platform.processor() or platform.machine() or "unknown CPU"
    origins.append(("extensions", cpuinfo if flags is not None else "fallback"))
    origins.append(("vector_bytes", f"{cpuinfo} flags" if flags is not None else "fallback"))
    return Machine(
        model=model,
        cores=cores,
        l1d_bytes=l1d,
        l2_bytes=l2,
        l3_bytes=l3,
        l3_sharers=sharers or cores,
        guessed=tuple(guessed),
        extensions=tuple(name for name in EXTENSIONS if flags and name in flags),
        vector_bytes=vector_width(flags),
        origins=tuple(origins),
    )


@functools.cache
def machine() -> Machine:
    """This machine's facts, read once per process."""
    return read()
