"""`systemd-analyze verify` and `security` on unit files, without a running systemd.

System units are checked inside a throwaway root (`--root=`): a copy of the host's unit
directory, so that sockets.target and friends resolve as on a real machine; stub
executables at /usr/local/bin/forkproxy, /usr/sbin/nginx and /usr/bin/kill, so that the
units' real ExecStart= and ExecReload= commands are checked, unchanged (systemd looks a
bare `kill` up in its own search path, inside the root); and a stub nginx.service, so
that the nginx examples verify on machines without nginx. User units cannot use --root,
so they are checked with HOME pointing at a directory holding ~/.local/bin/forkproxy.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
_HOST_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")
_STUB = "#!/bin/sh\nexit 0\n"
_NGINX_STUB = """\
[Unit]
Description=stub nginx for verifying the forkproxy examples

[Service]
Type=forking
ExecStart=/usr/sbin/nginx
"""
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) ")
_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Analysis:
    returncode: int
    output: str  # stdout and stderr together: empty means no warnings

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.output.strip()


def system_root(base: Path) -> Path:
    """A root for `--root=` whose units go to `unit_dir(root)`."""
    root = base / "root"
    host_units = next(Path(d) for d in _HOST_UNIT_DIRS if Path(d, "sockets.target").exists())
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")  # absolute alias links resolve inside the root
    for executable in ("usr/local/bin/forkproxy", "usr/sbin/nginx", "usr/bin/kill"):
        _write_stub(root / executable)
    unit_dir(root).mkdir(parents=True)
    (unit_dir(root) / "nginx.service").write_text(_NGINX_STUB)
    return root


def unit_dir(root: Path) -> Path:
    return root / "etc/systemd/system"


def user_home(base: Path) -> Path:
    """A HOME holding ~/.local/bin/forkproxy, where generated user units look for it."""
    home = base / "home"
    _write_stub(home / ".local/bin/forkproxy")
    return home


def verify_system(root: Path, units: list[str]) -> Analysis:
    return _run(["verify", "--man=no", f"--root={root}", *units], {})


def verify_user(home: Path, unit_files: list[Path]) -> Analysis:
    runtime = home / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(home / ".config"),
    }
    return _run(["--user", "verify", "--man=no", *map(str, unit_files)], env)


def security_exposure(root: Path, unit: str) -> tuple[float, str]:
    """The overall exposure figure of `systemd-analyze security --offline=yes`, and its report."""
    analysis = _run(["security", "--offline=yes", "--no-pager", f"--root={root}", unit], {})
    match = _EXPOSURE.search(analysis.output)
    if analysis.returncode != 0 or match is None:
        raise AssertionError(f"systemd-analyze security failed:\n{analysis.output}")
    return float(match.group(1)), analysis.output


def _run(args: list[str], env: dict[str, str]) -> Analysis:
    assert SYSTEMD_ANALYZE is not None
    # Our own log level, so that an inherited SYSTEMD_LOG_LEVEL=err cannot hide warnings.
    full_env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0", **env}
    done = subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )
    return Analysis(done.returncode, done.stdout)


def _write_stub(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_STUB)
    path.chmod(0o755)
