"""futex(2) on uint32 words of the shared mapping, through ctypes: wait, wake, atomic add.

Shared (not FUTEX_PRIVATE) operations, since the waiters are in other processes. Python
has no atomic read-modify-write on shared memory; FUTEX_WAKE_OP does one in the kernel
(`*uaddr2 += oparg` with a locked instruction), so `add` uses it with nobody to wake.
That costs a system call: it is only for the rare path (queue-mode waits, a reaped
worker), never per connection. Declares the calls; never decides anything.
"""

import ctypes
import errno
import os
import platform

FUTEX_WAIT = 0
FUTEX_WAKE = 1
FUTEX_WAKE_OP = 5
_FUTEX_OP_ADD = 1
_WAKE_ALL = 0x7FFFFFFF

# SYS_futex: the generic table's 98 for the newer architectures.
_SYS_FUTEX = {
    "x86_64": 202,
    "i386": 240,
    "i686": 240,
    "armv7l": 240,
    "ppc64le": 221,
    "s390x": 238,
}.get(platform.machine(), 98)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)  # CDLL calls release the GIL while they block
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _encode_add(delta: int) -> int:
    """FUTEX_OP(FUTEX_OP_ADD, delta, FUTEX_OP_CMP_EQ, 0): delta is 12-bit signed."""
    if not -2048 <= delta < 2048:
        raise ValueError(f"futex add of {delta} does not fit 12 bits")
    return (_FUTEX_OP_ADD << 28) | ((delta & 0xFFF) << 12)


def _futex(address: int, op: int, value: int, timeout: object, address2: int, value3: int) -> int:
    result = _syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(address),
        ctypes.c_int(op),
        ctypes.c_int(value),
        timeout,
        ctypes.c_void_p(address2),
        ctypes.c_int(value3),
    )
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"futex: {os.strerror(code)}")
    return int(result)


def add(address: int, delta: int) -> None:
    """Atomically add `delta` to the uint32 at `address` (wrapping), waking nobody."""
    _futex(address, FUTEX_WAKE_OP, 0, ctypes.c_void_p(0), address, _encode_add(delta))


def bump_and_wake(address: int) -> int:
    """Atomically add 1 to the futex word at `address` and wake all its waiters, in one
    call; return how many were woken."""
    return _futex(address, FUTEX_WAKE_OP, _WAKE_ALL, ctypes.c_void_p(0), address, _encode_add(1))


def wait(address: int, expected: int, timeout: float) -> bool:
    """Sleep while the uint32 at `address` holds `expected`, up to `timeout` seconds.

    True when woken or when the word had already changed; False on timeout. A signal
    ends the wait early (True: the caller looks again anyway).
    """
    limit = _Timespec(int(timeout), int(timeout % 1 * 1e9))
    try:
        _futex(address, FUTEX_WAIT, expected & 0xFFFFFFFF, ctypes.byref(limit), 0, 0)
    except OSError as error:
        if error.errno == errno.ETIMEDOUT:
            return False
        if error.errno in (errno.EAGAIN, errno.EINTR):  # changed already; a signal
            return True
        raise
    return True
