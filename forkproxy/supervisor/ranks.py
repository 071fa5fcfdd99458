"""Ranks: each worker's place in its generation, which says what datagram listeners it reads.

Datagram listener i (counted among the datagram listeners) is read by the worker of rank
i mod `size` of the current generation, and by no other (ARCHITECTURE.md says why: all
of a client's datagrams must reach the one process that holds its session). A rank
belongs to a slot for the generation's life, so a worker replacing a dead one in its slot
reads what the dead one read. `size` is the number of workers the generation started
with; workers added later (SIGTTIN) get ranks from `size` on and read no datagram
listener (`shared.protocol.reads_datagram_listener` is the worker's side). Bookkeeping
only: never forks or signals.
"""


class Ranks:
    """The ranks of the current generation's slots (the master's; workers get theirs in
    their WorkerSpec)."""

    __slots__ = ("size", "datagram_listeners", "_by_slot")

    def __init__(self, size: int, datagram_listeners: int) -> None:
        self.size = size
        self.datagram_listeners = datagram_listeners
        self._by_slot: dict[int, int] = {}

    def assign(self, slot: int) -> int:
        """The rank of the worker starting in `slot`: the slot's own, else the lowest free."""
        rank = self._by_slot.get(slot)
        if rank is None:
            taken = set(self._by_slot.values())
            rank = next(rank for rank in range(len(taken) + 1) if rank not in taken)
            self._by_slot[slot] = rank
        return rank

    def free(self, slot: int) -> bool:
        """The slot's worker is stopped for good (fewer workers): free its rank. True if
        that rank read a datagram listener, which now needs a new generation to read it."""
        rank = self._by_slot.pop(slot, None)
        return rank is not None and rank < min(self.size, self.datagram_listeners)

    def new_generation(self, size: int) -> None:
        self.size = size
        self._by_slot.clear()

    def assigned(self) -> dict[int, int]:
        """Rank by slot, for a reload's state."""
        return dict(self._by_slot)

    def restore(self, size: int, assigned: dict[int, int]) -> None:
        """The generation a reload's new image goes on with: the ranks it had, so that a
        replacement reads what the worker it replaces read."""
        self.size = size
        self._by_slot = dict(assigned)
