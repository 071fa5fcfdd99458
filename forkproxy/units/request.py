"""The `UnitRequest`: everything forkproxy-units renders units from, and where they go.

A frozen value built by `arguments` from the command line, each field already checked
by `checks`. Holds no logic beyond the names of the files it makes.
"""

from dataclasses import dataclass

PROG = "forkproxy-units"
SYSTEM_EXECUTABLE = "/usr/local/bin/forkproxy"  # where `pip install forkproxy` as root puts it
PACKAGED_EXECUTABLE = "/usr/bin/forkproxy"  # the Debian package's, beside its forkproxy-units
USER_EXECUTABLE = "%h/.local/bin/forkproxy"  # `pip install --user` or pipx; %h is $HOME


@dataclass(frozen=True, slots=True)
class UnitRequest:
    """Everything the units are rendered from, validated."""

    name: str
    target: str
    forkproxy_args: tuple[str, ...] = ()
    listen_stream: tuple[str, ...] = ()
    listen_unix: tuple[str, ...] = ()
    # ListenDatagram= (UDP, unix) and ListenSequentialPacket=: their own flags, so that
    # the kind of each socket is said where it is given.
    listen_datagram: tuple[str, ...] = ()
    listen_unix_datagram: tuple[str, ...] = ()
    listen_sequential_packet: tuple[str, ...] = ()
    socket_user: str | None = None
    socket_group: str | None = None
    socket_mode: int | None = None
    backlog: int | None = None
    accept: bool = False
    max_connections: int | None = None
    metrics: str | None = None
    target_unit: str | None = None
    share_namespace: bool = False
    description: str | None = None
    executable: str | None = None
    user: bool = False

    @property
    def unix_paths(self) -> tuple[str, ...]:
        """Every unix socket address the socket unit listens on."""
        return (*self.listen_unix, *self.listen_unix_datagram, *self.listen_sequential_packet)

    @property
    def service_name(self) -> str:
        return f"{self.name}@.service" if self.accept else f"{self.name}.service"

    @property
    def socket_names(self) -> tuple[str, ...]:
        metrics = (f"{self.name}-metrics.socket",) if self.metrics is not None else ()
        return (f"{self.name}.socket", *metrics)


@dataclass(frozen=True, slots=True)
class Output:
    directory: str | None = None
    force: bool = False
