"""Echo backend for the idle and capacity loads: every byte read is written back.

Run as `python -m bench.echo_server --port P`; several can share P through SO_REUSEPORT
when one process's RLIMIT_NOFILE would not hold every connection. Prints `ready` once
listening. Only small pings cross it, so a partial send is not retried. Never connects out.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import signal
import socket
import sys


def serve(host: str, port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    clients: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for fd, _events in poller.poll():
            if fd == listener.fileno():
                _accept_batch(listener, poller, clients)
                continue
            client = clients[fd]
            try:
                data = client.recv(65536)
                if data:
                    client.send(data)
                    continue
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                pass
            poller.unregister(fd)
            del clients[fd]
            client.close()


def _accept_batch(
    listener: socket.socket, poller: select.epoll, clients: dict[int, socket.socket]
) -> None:
    for _ in range(256):
        try:
            client, _address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            # EMFILE: stop watching rather than spin; the client counts missing echoes.
            print(f"echo_server: accept: {error}; no longer accepting", file=sys.stderr)
            poller.unregister(listener.fileno())
            return
        client.setblocking(False)
        clients[client.fileno()] = client
        poller.register(client.fileno(), select.EPOLLIN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.host, args.port)


if __name__ == "__main__":
    main()
