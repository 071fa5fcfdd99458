"""A minimal socket activator: run a command with given fds passed as in sd_listen_fds(3).

    python -m tests.support.activate FD[:NAME] ... -- COMMAND [ARGS...]

The fds (inherited from the test, which bound them) become 3, 4, ... and
LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES are set before exec, so the pid is the command's.
The test binds the sockets itself, so there is no free-port race.
"""

import fcntl
import os
import sys


def main() -> None:
    separator = sys.argv.index("--")
    specs = sys.argv[1:separator]
    command = sys.argv[separator + 1 :]
    sources: list[int] = []
    names: list[str] = []
    for spec in specs:
        fd_text, _, name = spec.partition(":")
        # Copies above 3+n, close-on-exec: the dup2s below cannot clobber a source.
        sources.append(fcntl.fcntl(int(fd_text), fcntl.F_DUPFD_CLOEXEC, 3 + len(specs)))
        names.append(name or "unknown")
    for index, fd in enumerate(sources):
        os.dup2(fd, 3 + index, inheritable=True)
    for spec in specs:  # as systemd: only 3 .. 3+n-1 reach the command, no stray copies
        fd = int(spec.partition(":")[0])
        if fd >= 3 + len(specs):
            os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(sources))
    os.environ["LISTEN_FDNAMES"] = ":".join(names)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
