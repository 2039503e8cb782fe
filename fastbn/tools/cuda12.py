"""CUDA 12's compiler, for the compute capabilities that CUDA 13 no longer targets.

The CUDA 13 toolkit that ``numba-cuda[cu13]`` installs compiles for cc 7.5
and up; CUDA 12's still targets cc 5.0 to 7.2, Volta (cc 7.0) among them.
The developer-facing extra ``fastbn[ptx-cu12]`` therefore installs the
``nvidia-cuda-nvcc-cu12`` wheel (Linux), which carries CUDA 12's libNVVM,
libdevice and ptxas, and
``python -m fastbn ptx`` (:mod:`fastbn.tools.ptx`) compiles those compute
capabilities with it.

The two libNVVMs must never meet in one process: both are ``libnvvm.so.4``
with the same symbols, and numba-cuda keeps one NVVM per process.  So CUDA 12
compiles in a child interpreter, ``python -m fastbn.tools.cuda12 X.Y``, started by
:func:`compile_in_subprocess`, which

1. loads CUDA 12's libNVVM before anything else can load one.  numba-cuda's
   NVVM binding (``cuda.bindings.nvvm``) finds libNVVM through
   cuda-pathfinder, and cuda-pathfinder answers a ``libnvvm.so.4`` already
   loaded in the process before it searches the wheels, where CUDA 13's
   comes first.  ``CUDA_HOME`` and ``CUDA_PATH`` cannot do this: pathfinder
   reads them only after the wheels;
2. runs with ``NUMBA_FORCE_CUDA_CC=X.Y`` in its environment (set by the
   parent).  numba-cuda otherwise maps the compute capability to a target
   through CUDA 13's NVRTC, which does not list it;
3. links CUDA 12's libdevice: :mod:`fastbn.backends.cuda.target` makes numba-cuda
   take the libdevice beside the libNVVM it loaded;
4. checks that numba-cuda's NVVM and libdevice are this wheel's, and that
   no other libNVVM is mapped into the process, and fails otherwise;
5. assembles each kernel's PTX with CUDA 12's ``ptxas -v`` (a subprocess),
   whose report gives registers, spills and shared memory, and whose cubin
   gives the SASS loop count (:mod:`fastbn.tools.loops`);
6. prints its results as one JSON line for the parent.

Nothing here imports numba-cuda; the child reaches it through
:mod:`fastbn.backends.cuda.target` and :mod:`fastbn.tools.nvvm`, after step 1.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from fastbn.tools.nvvm import Result, compile_kernels, parse_cc, resource_report

#: The wheel that carries CUDA 12's NVVM, libdevice and ptxas.
DISTRIBUTION = "nvidia-cuda-nvcc-cu12"

#: Where the wheel keeps them, relative to its ``nvidia/cuda_nvcc`` folder
#: (the layout of a CUDA 12 toolkit root).
_FILES = {
    "nvvm": os.path.join("nvvm", "lib64", "libnvvm.so"),
    "libdevice": os.path.join("nvvm", "libdevice", "libdevice.10.bc"),
    "ptxas": os.path.join("bin", "ptxas"),
}

#: Prefix of the child's one line of results on its standard output.
_MARKER = "fastbn-cuda12-results: "

#: The child keeps CUDA 12's libNVVM loaded here for its whole life.
_LOADED_NVVM: ctypes.CDLL | None = None


@dataclasses.dataclass(frozen=True)
class Toolkit:
    """The CUDA 12 compiler of the installed ``nvidia-cuda-nvcc-cu12`` wheel.

    Attributes
    ----------
    version : str
        Major and minor version, such as ``"12.9"``.
    nvvm, libdevice, ptxas : str
        Absolute paths of libNVVM, libdevice and the ptxas executable.
    ccs : tuple of tuple of int
        The compute capabilities ptxas assembles for, ascending.
    """

    version: str
    nvvm: str
    libdevice: str
    ptxas: str
    ccs: tuple[tuple[int, int], ...]

    @property
    def name(self) -> str:
        """``"CUDA 12.9"``: how output lines name this toolkit."""
        return f"CUDA {self.version}"


@functools.cache
def locate() -> tuple[Toolkit | None, str]:
    """Find the CUDA 12 compiler.

    Returns
    -------
    (Toolkit or None, str)
        The toolkit, or None and a one-line reason naming what to install.
    """
    if not sys.platform.startswith("linux"):
        return None, f"fastbn uses {DISTRIBUTION}'s CUDA 12 compiler on Linux only"
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None, f"install {DISTRIBUTION} (pip install 'fastbn[ptx-cu12]') for CUDA 12's compiler"
    root = str(dist.locate_file(os.path.join("nvidia", "cuda_nvcc")))
    files = {name: os.path.join(root, relative) for name, relative in _FILES.items()}
    missing = [relative for name, relative in _FILES.items() if not os.path.isfile(files[name])]
    if missing:
        return None, f"{DISTRIBUTION} {dist.version} lacks {', '.join(missing)} under {root}"
    try:
        ccs = ptxas_targets(files["ptxas"])
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return None, f"{DISTRIBUTION} {dist.version}: its ptxas does not run ({exc})"
    version = ".".join(dist.version.split(".")[:2])
    return Toolkit(version=version, ccs=ccs, **files), ""


def ptxas_targets(ptxas: str) -> tuple[tuple[int, int], ...]:
    """The compute capabilities ``ptxas`` assembles for, read from its ``--help``.

    Returns
    -------
    tuple of tuple of int
        ``(major, minor)`` of every plain ``sm_XY`` value that ``--gpu-name``
        allows (not the ``a``/``f`` variants), ascending.

    Raises
    ------
    ValueError
        If the help text lists no such value.
    """
    text = subprocess.run([ptxas, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    start = text.find("--gpu-name")
    block = text[start : text.find("Default value", start)] if start >= 0 else ""
    ccs = sorted({(int(digits[:-1]), int(digits[-1])) for digits in re.findall(r"'sm_(\d+)'", block)})
    if not ccs:
        raise ValueError("no sm_XY value under --gpu-name in ptxas --help")
    return tuple(ccs)


def assemble(ptx: str, cc: Sequence[int], ptxas: str) -> tuple[dict[str, int], bytes]:
    """Assemble ``ptx`` for ``sm_XY`` with CUDA 12's ``ptxas -v``; return its resource report and the cubin.

    Returns
    -------
    (dict, bytes)
        ``registers``, ``spill_stores``, ``spill_loads`` and ``shared``, as
        :func:`fastbn.tools.nvvm.resource_report` reads them; and the cubin
        ptxas wrote, for the SASS loop count.

    Raises
    ------
    RuntimeError
        If ptxas rejects the PTX, with the end of its error output.
    """
    with tempfile.TemporaryDirectory(prefix="fastbn-ptxas-") as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as file:
            file.write(ptx)
        target = os.path.join(folder, "kernel.cubin")
        command = [ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", source, "-o", target]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            tail = " | ".join(log.strip().splitlines()[-3:])
            raise RuntimeError(f"ptxas exited with {proc.returncode}: {tail}")
        with open(target, "rb") as file:
            cubin = file.read()
    return resource_report(log), cubin


def compile_in_subprocess(cc: Sequence[int], timeout: float = 900, sass: bool = True) -> list[Result]:
    """Compile every kernel for every dtype on ``cc`` with CUDA 12, in a child interpreter.

    ``sass=False`` passes ``--no-sass`` to the child: no SASS loop count.

    Returns
    -------
    list of tuple
        :func:`fastbn.tools.nvvm.compile_kernels`'s results, as the child sent them.

    Raises
    ------
    RuntimeError
        If the child sent no results (the end of its error output says why).
    """
    label = f"{cc[0]}.{cc[1]}"
    env = dict(os.environ)
    env["NUMBA_FORCE_CUDA_CC"] = label
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    # the child imports this very fastbn, wherever the parent found it:
    # the folder that holds the package, three levels above fastbn/tools/cuda12.py
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "fastbn.tools.cuda12", label, *([] if sass else ["--no-sass"])]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARKER):
            return [tuple(result) for result in json.loads(line[len(_MARKER) :])]
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
    raise RuntimeError(f"the CUDA 12 compiler process exited with {proc.returncode}: {tail}")


def _mapped_nvvms() -> set[str]:
    """Real paths of every libNVVM mapped into this process (Linux ``/proc/self/maps``)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    return {os.path.realpath(path) for path in paths if os.path.basename(path).startswith("libnvvm")}


def _child(argv: Sequence[str]) -> int:
    """``python -m fastbn.tools.cuda12 X.Y [--no-sass]``: compile for one compute capability with CUDA 12."""
    global _LOADED_NVVM
    sass = "--no-sass" not in argv
    argv = [arg for arg in argv if arg != "--no-sass"]
    if len(argv) != 1:
        print("usage: python -m fastbn.tools.cuda12 X.Y [--no-sass] (started by python -m fastbn ptx)", file=sys.stderr)
        return 2
    cc = parse_cc(argv[0])
    forced = os.environ.get("NUMBA_FORCE_CUDA_CC", "")
    if forced.strip() != argv[0].strip():
        print(f"NUMBA_FORCE_CUDA_CC must be {argv[0]} in this process's environment, not {forced!r}", file=sys.stderr)
        return 2
    toolkit, reason = locate()
    if toolkit is None:
        print(reason, file=sys.stderr)
        return 2
    if _mapped_nvvms():
        print(f"a libNVVM was loaded before CUDA 12's: {sorted(_mapped_nvvms())}", file=sys.stderr)
        return 1
    _LOADED_NVVM = ctypes.CDLL(toolkit.nvvm)  # step 1 of the module docstring

    from fastbn.backends.cuda import target

    paths = target.compiler_paths()
    for name in ("nvvm", "libdevice"):
        if not paths[name] or not os.path.samefile(paths[name], getattr(toolkit, name)):
            print(f"numba-cuda took its {name} from {paths[name]}, not {getattr(toolkit, name)}", file=sys.stderr)
            return 1
    results = compile_kernels(cc, functools.partial(assemble, ptxas=toolkit.ptxas), toolkit.name, sass=sass)
    mapped = _mapped_nvvms()
    if mapped != {os.path.realpath(toolkit.nvvm)}:
        print(f"libNVVMs mapped into the CUDA 12 process: {sorted(mapped)}", file=sys.stderr)
        return 1
    print(_MARKER + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
