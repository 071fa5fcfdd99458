"""What /proc says about forkproxy's processes: descriptors, CPU time, memory, sockets.

Reads only; never signals a process. Used by the fault, leak and security tests and by
`bench.soak` to attribute each relayed TCP connection to the worker that holds it.
"""

import os
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of `pid` refers to ("socket:[123]", "pipe:[45]", a path)."""
    targets = []
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            targets.append(os.readlink(f"{directory}/{name}"))
        except FileNotFoundError:
            continue  # closed while we looked
    return targets


def fd_kinds(pid: int) -> Counter[str]:
    """Open descriptors of `pid` by kind: socket, pipe, anon_inode:[eventfd], a path, ..."""
    kinds: Counter[str] = Counter()
    for target in fd_targets(pid):
        if target.startswith(("socket:", "pipe:")):
            kinds[target.split(":", 1)[0]] += 1
        else:
            kinds[target] += 1
    return kinds


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets `pid` has open."""
    return {
        int(target[len("socket:[") : -1])
        for target in fd_targets(pid)
        if target.startswith("socket:[")
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used (proc(5) fields utime and stime)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One TCP socket of this network namespace."""

    local: tuple[str, int]
    remote: tuple[str, int]
    inode: int


def _proc_address(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word of the address in host byte order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words), int(port, 16)


def _ss_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]").split("%")[0]
    return ("*" if host in ("*", "0.0.0.0", "::") else host), (0 if port == "*" else int(port))


# ss(8) state names and their st column in /proc/net/tcp.
_STATES = {
    "established": "01",
    "syn-sent": "02",
    "syn-recv": "03",
    "fin-wait-1": "04",
    "fin-wait-2": "05",
    "close-wait": "08",
    "last-ack": "09",
    "listening": "0A",
    "closing": "0B",
}
# What a process can hold: every state but TIME_WAIT and CLOSE (no inode) and LISTEN.
OPEN_STATES = tuple(state for state in _STATES if state != "listening")


def tcp_sockets(*states: str) -> list[TcpSocket]:
    """TCP sockets, IPv4 and IPv6, in any of `states` (ss(8) names, "listening" ...).

    Asks the kernel through ss(8) (sock_diag, filtered by state in the kernel): on a busy
    machine /proc/net/tcp lists every TIME_WAIT socket and takes seconds to read.
    """
    if shutil.which("ss") is not None:
        command = ["ss", "-tnHe"]
        for state in states:
            command += ["state", state]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        found = []
        for line in output.splitlines():
            fields = line.split()
            if len(states) > 1:
                fields = fields[1:]  # a State column comes first
            inode = next((int(f[4:]) for f in fields if f.startswith("ino:")), 0)
            found.append(TcpSocket(_ss_address(fields[2]), _ss_address(fields[3]), inode))
        return found
    wanted = {_STATES[state] for state in states}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[3] in wanted:
                        local, remote = _proc_address(fields[1]), _proc_address(fields[2])
                        if local[0] in ("0.0.0.0", "::"):
                            local = ("*", local[1])
                        found.append(TcpSocket(local, remote, int(fields[9])))
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    return found


def unix_listeners() -> dict[int, str]:
    """Listening unix stream sockets by inode: their path ("@name" if abstract, "" if none)."""
    found = {}
    with open("/proc/net/unix") as lines:
        next(lines)
        for line in lines:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]; Flags 00010000 = __SO_ACCEPTCON
            if int(fields[3], 16) & 0x10000 and int(fields[4], 16) == socket.SOCK_STREAM:
                found[int(fields[6])] = fields[7] if len(fields) > 7 else ""
    return found


def owners_of_clients(
    pids: Iterable[int], listen_port: int, sockets: list[TcpSocket] | None = None
) -> dict[int, int]:
    """For connections accepted on `listen_port`: the client's port -> the pid holding it.

    A client socket's peer in the proxy is the accepted socket whose local port is the
    listener's and whose remote port is the client's own; the pid whose fd table holds
    that socket's inode is the worker serving it.
    """
    owner_of_inode = {inode: pid for pid in pids for inode in socket_inodes(pid)}
    owners = {}
    for tcp in tcp_sockets("established") if sockets is None else sockets:
        if tcp.local[1] == listen_port and tcp.inode in owner_of_inode:
            owners[tcp.remote[1]] = owner_of_inode[tcp.inode]
    return owners
