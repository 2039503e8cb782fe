"""IEEE arithmetic inside framework host callbacks: subnormals kept, not flushed to zero.

XLA runs ``jax.pure_callback`` functions on a thread whose floating-point
environment flushes subnormal results to zero and treats subnormal inputs as
zero (the x86 MXCSR's FTZ and DAZ bits).  fastbn's kernels then lose values
they compute exactly elsewhere: a float32 channel whose standard deviation
is near 2.4e38 has an invstd of about 4e-39, a subnormal, which became 0 and
turned every output of the channel into 0 (or NaN).  :func:`ieee_subnormals`
runs a host function in the default environment (``fesetenv(FE_DFL_ENV)``:
round to nearest, no flush-to-zero) and restores the caller's afterwards.
The parallel kernels' worker threads take the environment of the thread that
starts them, so they follow.  Where the C library's ``fenv`` functions are not
found (not glibc), the function runs in the caller's environment as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ieee_subnormals"]

_F = TypeVar("_F", bound=Callable[..., Any])

# glibc's FE_DFL_ENV is the pointer value -1 (x86-64 and AArch64 alike).
_FE_DFL_ENV = ctypes.c_void_p(-1)
# Larger than any platform's fenv_t (32 bytes on x86-64, 8 on AArch64).
_ENV_BYTES = 256


@functools.cache
def _libm() -> Any:
    """glibc's libm, or None where the environment cannot be switched this way."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.fegetenv.argtypes = lib.fesetenv.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return lib


def ieee_subnormals(func: _F) -> _F:
    """``func`` run in the default floating-point environment, the caller's restored after it returns or raises."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        lib = _libm()
        env = ctypes.create_string_buffer(_ENV_BYTES)
        if lib is None or lib.fegetenv(env) != 0:
            return func(*args, **kwargs)
        lib.fesetenv(_FE_DFL_ENV)
        try:
            return func(*args, **kwargs)
        finally:
            lib.fesetenv(env)

    return run  # type: ignore[return-value]
