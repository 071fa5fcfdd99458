"""Socket kinds (SO_TYPE) of listeners and targets, and which may be relayed to which.

A stream listener (TCP, unix stream) relays to stream targets, a datagram listener
(UDP, unix datagram) to datagram targets, a sequential-packet listener to
sequential-packet targets: the relay keeps what the client sends (a byte stream, or
messages with their boundaries), so it never turns one into the other. Pure: never
opens or inspects a socket.
"""

import socket
from collections.abc import Sequence

from forkproxy.errors import UsageError
from forkproxy.settings.address import TargetAddress

STREAM = socket.SOCK_STREAM
DATAGRAM = socket.SOCK_DGRAM
SEQPACKET = socket.SOCK_SEQPACKET

_NAMES: dict[int, str] = {STREAM: "stream", DATAGRAM: "datagram", SEQPACKET: "sequential-packet"}
_RECEIVES: dict[int, str] = {
    STREAM: "stream connections",
    DATAGRAM: "datagrams",
    SEQPACKET: "sequential-packet connections",
}
# How to write a target of each kind, for the hint in an error.
_TARGET_SYNTAX: dict[int, str] = {
    STREAM: "HOST:PORT, /path or @name",
    DATAGRAM: "udp:HOST:PORT, unix-dgram:/path or unix-dgram:@name",
    SEQPACKET: "seqpacket:/path or seqpacket:@name",
}


def kind_name(kind: int) -> str:
    """'stream', 'datagram' or 'sequential-packet' (what SO_TYPE says, in words)."""
    return _NAMES.get(kind, f"type {kind}")


def kind_mismatch(listener_kind: int, targets: Sequence[TargetAddress]) -> str | None:
    """Why `targets` cannot take what a listener of `listener_kind` receives, or None."""
    for target in targets:
        if target.kind != listener_kind:
            return (
                f"it receives {_RECEIVES[listener_kind]} but target '{target.text}' is a "
                f"{kind_name(target.kind)} target (write {_TARGET_SYNTAX[listener_kind]})"
            )
    return None


def check_one_kind(targets: Sequence[TargetAddress], what: str) -> None:
    """UsageError if the targets of one route (or the positional ones) mix kinds."""
    kinds = {target.kind for target in targets}
    if len(kinds) > 1:
        listed = ", ".join(f"'{target.text}' ({kind_name(target.kind)})" for target in targets)
        raise UsageError(f"{what} mix socket kinds: {listed}; give targets of one kind")
