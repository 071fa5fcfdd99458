"""The shared mapping itself: a memfd, sized and mapped MAP_SHARED by the master.

The master creates it before the first fork, so every worker has the same pages at the
same address; a memfd rather than SysV IPC or a file, so nothing can outlive the
processes that map it: whatever stops forkproxy, the kernel frees the memory with the
last of them. The master keeps the fd (close-on-exec until the reload work hands it to
a re-executed master, which checks it with `SharedMapping.adopt`). tmpfs pages are
allocated when first touched, so the size is mostly virtual. Knows the header's
identity fields only; what the rest means is layout.py's and its users'.
"""

import ctypes
import mmap
import os

from forkproxy.shared.layout import (
    LAYOUT_VERSION,
    MAGIC,
    MAGIC_VALUE,
    MAPPING_BYTES,
    SOURCE_ENTRIES,
    VERSION,
    WORD,
    mapping_bytes,
)


class LayoutMismatch(Exception):
    """An inherited mapping was made by a forkproxy with another layout."""


class SharedMapping:
    """The memfd (`fd`, owned by the master) and its MAP_SHARED mapping (`memory`)."""

    def __init__(self, fd: int, memory: mmap.mmap) -> None:
        self.fd = fd
        self.memory = memory
        self.size = len(memory)
        self.words = memoryview(memory).cast("q")  # the whole mapping as int64 words
        # A ctypes view of the first byte pins the mapping (an exported buffer), so the
        # addresses handed to pthread and futex calls stay valid while this object lives.
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(memory)
        self.base = ctypes.addressof(self._anchor)

    @classmethod
    def create(cls, source_entries: int) -> "SharedMapping":
        """A new, zeroed mapping whose per-source table has `source_entries` rows.

        Raises OSError (memfd_create, ftruncate or mmap failed: no memory, RLIMIT_FSIZE,
        or no descriptor left).
        """
        size = mapping_bytes(source_entries)
        fd = os.memfd_create("forkproxy", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        mapping = cls(fd, memory)
        words = mapping.words
        words[MAGIC // WORD] = MAGIC_VALUE
        words[VERSION // WORD] = LAYOUT_VERSION
        words[MAPPING_BYTES // WORD] = size
        words[SOURCE_ENTRIES // WORD] = source_entries
        return mapping

    @classmethod
    def adopt(cls, fd: int) -> "SharedMapping":
        """Map an inherited memfd (a re-executed master's), after checking it is one of
        ours with this layout; raises LayoutMismatch otherwise (a restart is needed)."""
        size = os.fstat(fd).st_size
        if size < mapping_bytes(0):
            raise LayoutMismatch(f"the shared memory is {size} bytes, too small for this layout")
        memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        header = memoryview(memory).cast("q")
        try:
            magic, version, recorded = (
                header[MAGIC // WORD],
                header[VERSION // WORD],
                header[MAPPING_BYTES // WORD],
            )
            entries = header[SOURCE_ENTRIES // WORD]
        finally:
            header.release()
        if magic != MAGIC_VALUE or version != LAYOUT_VERSION or recorded != size:
            memory.close()
            raise LayoutMismatch(
                f"the shared memory has layout version {version}, this forkproxy {LAYOUT_VERSION}"
                if magic == MAGIC_VALUE
                else "the inherited descriptor is not forkproxy's shared memory"
            )
        if mapping_bytes(entries) != size:
            memory.close()
            raise LayoutMismatch("the shared memory's size does not match its table")
        return cls(fd, memory)

    def header(self, offset: int) -> int:
        """The int64 header field at byte `offset`."""
        return int(self.words[offset // WORD])

    def set_header(self, offset: int, value: int) -> None:
        self.words[offset // WORD] = value

    def close(self) -> None:
        """Unmap and close the fd (each process its own copy). A view still held elsewhere
        keeps the pages mapped until it goes; the fd is closed regardless."""
        self._anchor = None
        try:
            self.words.release()
            self.memory.close()
        except BufferError:
            pass  # a slot view is still referenced: the mapping goes when it does
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1
