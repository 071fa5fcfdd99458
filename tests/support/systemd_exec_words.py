"""Split an ExecStart= line the way systemd does, with systemd's own code.

Calls `extract_first_word()` from the host's libsystemd-shared with the flags that
config_parse_exec() uses for arguments (unquote and C-unescape). The library is private to
systemd, so its flag values are probed rather than assumed; `split_exec_words` is None when
the library or a known flag layout is not found.
"""

import ctypes
import glob
from collections.abc import Callable

_LIBRARY_GLOBS = (
    "/usr/lib/systemd/libsystemd-shared-*.so",
    "/usr/lib/*/systemd/libsystemd-shared-*.so",
    "/usr/lib64/systemd/libsystemd-shared-*.so",
    "/lib/systemd/libsystemd-shared-*.so",
)
_EXTRACT_CUNESCAPE = 1 << 1  # the same in every systemd version
# EXTRACT_UNQUOTE moved from bit 4 to 5 when EXTRACT_KEEP_QUOTE took bit 4 (v248).
_UNQUOTE_CANDIDATES = (1 << 5, 1 << 4)


def _load() -> Callable[[str], list[str]] | None:
    paths = sorted(path for pattern in _LIBRARY_GLOBS for path in glob.glob(pattern))
    if not paths:
        return None
    library = ctypes.CDLL(paths[-1])
    libc = ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]
    extract = library.extract_first_word
    pointer = ctypes.POINTER(ctypes.c_void_p)
    extract.argtypes = [pointer, pointer, ctypes.c_char_p, ctypes.c_int]
    extract.restype = ctypes.c_int

    def split(line: str, flags: int) -> list[str]:
        buffer = ctypes.create_string_buffer(line.encode())
        cursor = ctypes.c_void_p(ctypes.addressof(buffer))
        words: list[str] = []
        while True:
            word = ctypes.c_void_p()
            result = extract(ctypes.byref(cursor), ctypes.byref(word), None, flags)
            if result < 0:
                raise ValueError(f"extract_first_word() failed ({result}) on {line!r}")
            if result == 0:
                return words
            assert word.value is not None
            words.append(ctypes.string_at(word.value).decode())
            libc.free(word)

    for unquote in _UNQUOTE_CANDIDATES:
        flags = _EXTRACT_CUNESCAPE | unquote
        try:
            if split('"a b" c\\x41', flags) == ["a b", "cA"]:
                return lambda line: split(line, flags)
        except ValueError:
            continue
    return None


split_exec_words = _load()
