"""systemd unit files for forkproxy, rendered from a command line (`forkproxy-units`).

`forkproxy-units NAME [FLAGS...] [--] TARGET [FORKPROXY-OPTIONS...]` becomes a hardened
NAME.socket + NAME.service pair (NAME@.service with --accept, plus NAME-metrics.socket with
--metrics), printed or written to a directory. This is the one definition of forkproxy's
units: the files in systemd/ are its output. Never talks to systemd (no systemctl, no D-Bus)
and never starts forkproxy.
"""

import dataclasses
import re
import sys

from forkproxy import __version__
from forkproxy.errors import ForkproxyError
from forkproxy.units.arguments import USAGE, default_executable, parse_args, split_args
from forkproxy.units.render import render as render_units
from forkproxy.units.request import PROG, SYSTEM_EXECUTABLE
from forkproxy.units.write import write_units

# C0 and C1 control characters: an error quoting what the user typed stays one line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def run(argv: list[str], program: str = "") -> int:
    """The whole program: 0 on success, 1 with one line on stderr for any error.

    `program` is how forkproxy-units was started (sys.argv[0]): it decides the default
    --executable, which is then written into the units' header command too.
    """
    try:
        flags = split_args(argv)[0]
        if "-h" in flags or "--help" in flags:
            sys.stdout.write(USAGE)
            return 0
        if "--version" in flags:
            print(f"{PROG} {__version__}")
            return 0
        request, output = parse_args(argv)
        executable = default_executable(program)
        if request.executable is None and not request.user and executable != SYSTEM_EXECUTABLE:
            request = dataclasses.replace(request, executable=executable)
        files = render_units(request)
        if output.directory is None:
            print("\n".join(f"==> {name} <==\n{text}" for name, text in files.items()), end="")
            return 0
        for path in write_units(files, output.directory, output.force):
            print(f"wrote {path}")
    except ForkproxyError as e:
        print(f"{PROG}: {_one_line(str(e))}", file=sys.stderr)
        return 1
    systemctl = "systemctl --user" if request.user else "systemctl"
    sockets = " ".join(request.socket_names)
    print(f"next: {systemctl} daemon-reload && {systemctl} enable --now {sockets}")
    return 0


def _one_line(message: str) -> str:
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], message)


def main() -> None:
    sys.exit(run(sys.argv[1:], sys.argv[0]))
