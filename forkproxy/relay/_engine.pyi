# The compiled relay engine (csrc/, its API in csrc/README.md): types for mypy.
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

EVENT_REFUSED_CAP: int
EVENT_REFUSED_SOURCE: int
EVENT_REFUSED_BUSY: int
EVENT_CONNECT_FAILED: int
EVENT_TARGET_FAILED: int
EVENT_ACCEPT_ERROR: int
EVENT_FD_LOW: int
EVENT_RELAY_ERROR: int
EVENT_CONNECT_PAUSED: int
MUTEX_SIZE: int
NO_TOKEN: int
LAYOUT_FIELDS: tuple[str, ...]
PROXY_HEADER_REASONS: tuple[str, ...]
PROXY_HEADER_V2_MAX_LENGTH: int
END_REASONS: tuple[str, ...]
ACCESS_LOG_FIXED: int

class _Target(Protocol):
    @property
    def family(self) -> int: ...
    @property
    def sockaddr(self) -> Any: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...

class Engine:
    def __init__(
        self,
        memory: Any,
        layout: Mapping[str, object] | object,
        slot: int,
        listeners: Sequence[tuple[int, ...]],
        routes: Sequence[object],
        hooks: object,
        *,
        connect_timeout: float = ...,
        idle_timeout: float = ...,
        proxy_protocol: int = ...,
        tcp_options: Sequence[tuple[int, int, int]] = ...,
        pipe_size: int = ...,
        pipe_keep: int = ...,
        fd_ceiling: int = ...,
        queue_on_limit: bool = ...,
        copy_size: int = ...,
    ) -> None: ...
    def fileno(self) -> int: ...
    def dispatch(self) -> None: ...
    def start_accepting(self) -> None: ...
    def stop_accepting(self, *, drain: bool = ...) -> None: ...
    def open_connections(self) -> int: ...
    def holding(self) -> bool: ...
    def set_fd_ceiling(self, fd: int) -> None: ...
    def close_all(self) -> None: ...
    def resolved(self, token: int, addresses: Sequence[tuple[Any, ...]]) -> bool: ...
    def resolve_failed(self, token: int, error: int, text: str = ...) -> bool: ...
    def retry_held(self) -> bool: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def layout(self) -> dict[str, Any]: ...

def encode_proxy_header(version: int, family: int, client: Any, local: Any) -> bytes: ...
def parse_proxy_header(data: bytes) -> tuple[Any, ...]: ...
def format_access_log(
    format: str,
    end_ns: int,
    listener: str | bytes,
    client: str | bytes,
    target: str | bytes,
    worker: int,
    connect_ns: int,
    duration_ns: int,
    bytes_from_client: int,
    bytes_to_client: int,
    end: str,
) -> bytes: ...
def source_row(key: bytes, entries: int) -> int: ...
