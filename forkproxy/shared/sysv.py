"""SysV semaphore system calls through ctypes, declared once (semget, semop, semctl, ...).

The cross-process counters (admission.py, per_source.py) are built on these; this module
only declares the calls and their constants, and never decides anything.
"""

import ctypes
import os

IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_NOWAIT = 0o4000
IPC_RMID = 0
GETVAL = 12
GETALL = 13
SETVAL = 16
SETALL = 17
SEM_UNDO = 0x1000
SEMVMX = 32767  # the largest value one semaphore holds


class SemBuf(ctypes.Structure):
    _fields_ = (
        ("sem_num", ctypes.c_ushort),
        ("sem_op", ctypes.c_short),
        ("sem_flg", ctypes.c_short),
    )


class Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)
semget = _libc.semget
semget.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
semget.restype = ctypes.c_int
semop = _libc.semop
semop.argtypes = (ctypes.c_int, ctypes.POINTER(SemBuf), ctypes.c_size_t)
semop.restype = ctypes.c_int
semtimedop = _libc.semtimedop
semtimedop.argtypes = (
    ctypes.c_int,
    ctypes.POINTER(SemBuf),
    ctypes.c_size_t,
    ctypes.POINTER(Timespec),
)
semtimedop.restype = ctypes.c_int
semctl = _libc.semctl  # variadic: pass every argument as an explicit ctypes value
semctl.restype = ctypes.c_int


def last_error(call: str) -> OSError:
    """The OSError for the errno the last call through ctypes left."""
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")
