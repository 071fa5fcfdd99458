"""A real systemd, booted as PID 1 of namespaces of its own, for tests that need a service
manager: `systemctl start` of generated units with their whole sandbox applied, reloads,
socket units of any kind.

No systemd need run on the host (a container's PID 1 may be anything else): the fixture
starts the host's /lib/systemd/systemd with unshare(1) in new PID, mount, network, UTS,
IPC and cgroup namespaces, as a container manager does (`container=forkproxy-test`):

- a cgroup2 hierarchy of its own: a new child of the host's cgroup2 mount (on a hybrid
  host /sys/fs/cgroup/unified) that a cgroup namespace shows as its root. That is all
  DynamicUser=, IPAddressDeny= (BPF) and the file system sandbox need; no v1 controller
  is touched, so the test's own memory limits hold for everything inside.
- units only from a directory of the test's (SYSTEMD_UNIT_PATH): stub sysinit, basic,
  sockets and shutdown targets and the host's journald units. Nothing of the host's boot
  runs (no udev, tmpfiles, sysctl, getty), so the host is not changed.
- tmpfs on /run, /tmp, /var/tmp and /var/lib/systemd; /sys and /proc/sys read-only.
- a network namespace with only lo, so fixed ports (8080) never clash with anything.
- /usr/local/bin on a tmpfs holding `forkproxy`: a launcher for this checkout, run by a
  Python outside /root and /home (ProtectHome= hides those) that has forkproxy's
  dependencies.

The test's directory is inside at /run/fp-test. PID 1 says READY=1 on the test's notify
socket once booted. The test reaches in with nsenter(1) (`systemctl`, `journalctl`),
through /proc/PID/root, and with sockets made in the network namespace (`socket`,
`listener`). Stopping kills PID 1, which ends everything in its namespaces; then the
cgroup is removed. Should the test process die first, PID 1 is killed all the same
(setpriv --pdeathsig, unshare --kill-child). `unavailable()` says why a host cannot do
this (the fixture skips).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import REPO, wait_until

SYSTEMD_CANDIDATES = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
HOST_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")
JOURNALD_UNITS = (
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald.service",
)
INSIDE = "/run/fp-test"  # the test's directory, seen from inside
BOOT_TARGET = "forkproxy-test.target"
_STUB_TARGETS = ("sysinit.target", "basic.target", "sockets.target", "shutdown.target")
_BOOT_TIMEOUT = 60.0
_COMMAND_TIMEOUT = 60.0
_DEPENDENCIES = (
    "import sys, uvloop, prometheus_client, setproctitle; sys.exit(sys.version_info < (3, 10))"
)

# Run by unshare as the namespaces' PID 1 before it becomes systemd ($2); $1 is the test's
# directory, holding the launcher to install as /usr/local/bin/forkproxy.
_INNER = f"""\
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir {INSIDE}
mount --bind "$1" {INSIDE}
for dir in /tmp /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs "$dir"; done
mount -t tmpfs -o mode=0755 tmpfs /var/lib/systemd
umount -l /sys/fs/cgroup
mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -t tmpfs -o mode=0755 tmpfs /usr/local/bin
cp {INSIDE}/forkproxy /usr/local/bin/forkproxy
chmod 0755 /usr/local/bin/forkproxy
mount --bind {INSIDE}/console /dev/console
exec env -i container=forkproxy-test SYSTEMD_UNIT_PATH={INSIDE}/units \\
    NOTIFY_SOCKET={INSIDE}/notify "$2" --unit={BOOT_TARGET} --log-target=journal \\
    --log-level=info --show-status=no
"""
# Run by the host shell: into the new cgroup, then into the namespaces.
_OUTER = """\
echo $$ > "$1/cgroup.procs"
shift
exec unshare --cgroup --mount --pid --fork --kill-child=SIGKILL --uts --ipc --net \\
    --mount-proc sh -c "$@"
"""
# Makes a socket inside the network (and mount) namespace and sends it back on fd `back`.
_MAKE_SOCKET = """\
import json, os, socket, sys
family, kind, address, listen, back = json.loads(sys.argv[1])
made = socket.socket(family, kind)
if address is not None:
    if family == socket.AF_UNIX:
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
        made.bind(address)
        os.chmod(address, 0o666)
    else:
        made.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        made.bind(tuple(address))
if listen:
    made.listen(16)
socket.send_fds(socket.socket(fileno=back), [b"x"], [made.fileno()])
"""


def unavailable() -> str | None:
    """Why a systemd cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting systemd needs root"
    for tool in ("unshare", "nsenter", "sh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if _systemd() is None:
        return "systemd is not installed"
    if _cgroup2_mount() is None:
        return "no cgroup2 file system is mounted"
    if _python() is None:
        return (
            "no Python outside /root and /home with uvloop, prometheus_client and "
            "setproctitle to run forkproxy under DynamicUser=yes and ProtectHome=yes"
        )
    if not _readable_by_all(REPO / "forkproxy" / "cli.py"):
        return f"{REPO} is not readable by other users (forkproxy runs as a dynamic user)"
    hidden = ("/root/", "/home/", "/run/", "/tmp/", "/var/tmp/")
    if str(REPO.resolve()).startswith(hidden):
        return f"{REPO} is in a directory that the units' sandbox or the boot hides"
    return None


class BootedSystemd:
    """systemd running as PID 1 of its own namespaces; see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory  # at INSIDE, seen from inside
        self.units = directory / "units"
        self.cgroup = Path(_cgroup2_mount() or "/") / f"forkproxy-test-{os.getpid()}-{id(self)}"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0  # PID 1 inside, as the host sees it
        self._log = directory / "boot.log"

    # -- life --------------------------------------------------------------------------

    def boot(self) -> None:
        systemd, python = _systemd(), _python()
        assert systemd is not None and python is not None
        self.units.mkdir()
        for name in _STUB_TARGETS:
            _write(self.units / name, f"[Unit]\nDescription={name} (test boot)\n")
        _write(self.units / "system.slice", "[Unit]\nDescription=System Slice\n")
        journald = _host_units(JOURNALD_UNITS)
        for path in journald:
            shutil.copy(path, self.units)
        wants = " ".join(path.name for path in journald if path.suffix == ".socket")
        _write(self.units / BOOT_TARGET, f"[Unit]\nDescription=forkproxy tests\nWants={wants}\n")
        launcher = self.directory / "forkproxy"
        # The booted systemd starts forkproxy with a clean environment: the relay engine
        # the test runs on (tests/conftest.py) is set by the launcher.
        engine = os.environ.get("FORKPROXY_ENGINE")
        choose = (
            "" if engine is None else f"os.environ.setdefault('FORKPROXY_ENGINE', {engine!r})\n"
        )
        launcher.write_text(
            f"#!{python} -I\nimport os, sys\n{choose}sys.path.insert(0, {str(REPO)!r})\n"
            "from forkproxy.cli import main\nmain()\n"
        )
        (self.directory / "console").write_text("")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.directory / "notify"))
        self.cgroup.mkdir()
        # Should the test process die, setpriv's SIGKILL ends unshare, and unshare's
        # --kill-child PID 1 and with it the namespace.
        orphan_guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        with notify, open(self._log, "wb") as log:
            self.process = subprocess.Popen(
                [*orphan_guard, "sh", "-c", _OUTER, "sh", str(self.cgroup), _INNER, "sh",
                 str(self.directory), systemd],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            self._wait_ready(notify)
        self.pid = _only_child(self.process.pid)

    def _wait_ready(self, notify: socket.socket) -> None:
        assert self.process is not None
        notify.settimeout(0.5)
        deadline = time.monotonic() + _BOOT_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return
            if self.process.poll() is not None:
                break
        raise RuntimeError(f"systemd did not boot: {self._log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # the kernel kills the rest of the namespace
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=_COMMAND_TIMEOUT)
        self.process = None
        if self.cgroup.exists():
            wait_until(self._remove_cgroup, _COMMAND_TIMEOUT, f"removing {self.cgroup}")

    def _remove_cgroup(self) -> bool:
        for path in sorted(self.cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
        with contextlib.suppress(OSError):
            self.cgroup.rmdir()
        return not self.cgroup.exists()

    # -- reaching in -------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in the mount, PID and network namespaces (root's, unsandboxed)."""
        done = subprocess.run(
            ["nsenter", f"--target={self.pid}", "--mount", "--pid", "--net", "--", *argv],
            capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", "--no-ask-password", *args, check=check)

    def journal(self, *units: str) -> str:
        selected = [f"--unit={unit}" for unit in units]
        return self.run("journalctl", "--no-pager", "-o", "cat", *selected, check=False).stdout

    def install(self, files: dict[str, str]) -> None:
        """Unit files (name to text; 'unit.d/x.conf' for a drop-in), then daemon-reload."""
        for name, text in files.items():
            _write(self.units / name, text)
        self.systemctl("daemon-reload")

    def path(self, inside: str) -> Path:
        """A path inside the mount namespace, as the host reaches it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def socket(
        self, family: int, kind: int = socket.SOCK_STREAM, bind: object = None, listen: bool = False
    ) -> socket.socket:
        """A socket made in the network namespace (bound to a path of its mount namespace
        for AF_UNIX, mode 0666, so that a dynamic user may connect)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            spec = json.dumps([int(family), int(kind), bind, listen, theirs.fileno()])
            done = subprocess.run(
                ["nsenter", f"--target={self.pid}", "--mount", "--net", "--",
                 sys.executable, "-c", _MAKE_SOCKET, spec],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=_COMMAND_TIMEOUT, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise AssertionError(f"cannot make socket {spec} inside: {done.stderr}")
            theirs.close()
            _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        return socket.socket(fileno=fds[0])

    def listener(self, target: str) -> socket.socket:
        """A listening socket at a forkproxy target: IPV4:PORT, [IPV6]:PORT or /path."""
        if target.startswith("/"):
            return self.socket(socket.AF_UNIX, bind=target, listen=True)
        host, _, port = target.rpartition(":")
        if host.startswith("["):
            return self.socket(socket.AF_INET6, bind=[host[1:-1], int(port)], listen=True)
        return self.socket(socket.AF_INET, bind=[host, int(port)], listen=True)


@pytest.fixture
def systemd_boot() -> Iterator[BootedSystemd]:
    """A freshly booted systemd; skips where it cannot run."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    # Short: the notify socket's path must fit sun_path.
    directory = Path(tempfile.mkdtemp(prefix="fp-boot-"))
    directory.chmod(0o755)
    booted = BootedSystemd(directory)
    try:
        booted.boot()
        yield booted
    finally:
        booted.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _systemd() -> str | None:
    return next((path for path in SYSTEMD_CANDIDATES if os.access(path, os.X_OK)), None)


def _cgroup2_mount() -> str | None:
    """Where the host's cgroup2 hierarchy is mounted, if it is writable here."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            if after.split()[0] == "cgroup2":
                mount_point = before.split()[4]
                return mount_point if os.access(mount_point, os.W_OK) else None
    return None


def _python() -> str | None:
    """A Python that a sandboxed forkproxy can run: outside /root and /home, with its
    dependencies (Debian's python3-uvloop etc., or this venv's base interpreter)."""
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3"]
    for candidate in dict.fromkeys(candidates):
        if candidate.startswith(("/root/", "/home/")) or not os.access(candidate, os.X_OK):
            continue
        done = subprocess.run(
            [candidate, "-I", "-c", _DEPENDENCIES], capture_output=True, timeout=60, check=False
        )
        if done.returncode == 0:
            return candidate
    return None


def _readable_by_all(path: Path) -> bool:
    path = path.resolve()
    if not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


def _host_units(names: tuple[str, ...]) -> list[Path]:
    for directory in HOST_UNIT_DIRS:
        paths = [Path(directory, name) for name in names]
        if all(path.exists() for path in paths):
            return paths
    return []


def _only_child(pid: int) -> int:
    """unshare --fork's child: the namespaces' PID 1."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"unshare ({pid}) has children {children}, expected one")
    return int(children[0])


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
