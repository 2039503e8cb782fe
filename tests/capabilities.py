"""Code for child processes of the fault tests: dropping root's permission override.

Root ignores permission bits through CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH, CAP_FOWNER); a child
that drops them sees a 0o555 directory refuse writes as any user would.  The child scripts of
tests/test_faults.py and tests/test_precompile.py paste ``DROP_FILE_CAPABILITIES`` into their source.
"""

DROP_FILE_CAPABILITIES = r"""
import ctypes

def drop_file_capabilities():
    # Root ignores permission bits through CAP_DAC_OVERRIDE; without it (and its two relatives) the
    # kernel applies the owner's bits to uid 0 too.  Capabilities are per thread: this one does the I/O.
    libc = ctypes.CDLL(None, use_errno=True)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << 1) | (1 << 2) | (1 << 3)) & 0xFFFFFFFF  # DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
    data[0].effective &= keep; data[0].permitted &= keep; data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
"""
