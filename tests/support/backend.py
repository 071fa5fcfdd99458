"""Real backend servers for integration tests, run as their own process.

    python -m tests.support.backend MODE ADDRESS

MODE:
  echo     every byte read is written back; EOF is passed on after the last byte
  digest   reads to EOF, then replies "<sha256 hex> <length>\\n" and closes
  greet    sends "+" on accept, then holds the connection until the client closes;
           records every connection: see `CountingBackend` for the in-process version
  source:N sends N pseudo-random bytes (seeded by N) then closes

ADDRESS: tcp:HOST:PORT, tcp6:HOST:PORT (PORT 0 picks a free one), unix:/path, abstract:name.
Prints "READY <address>" on stdout once listening (address as a forkproxy target).
"""

import hashlib
import random
import socket
import sys
import threading


def listen(address: str) -> tuple[socket.socket, str]:
    kind, _, rest = address.partition(":")
    if kind in ("tcp", "tcp6"):
        host, _, port = rest.rpartition(":")
        family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        bound = sock.getsockname()
        target = f"[{bound[0]}]:{bound[1]}" if kind == "tcp6" else f"{bound[0]}:{bound[1]}"
    elif kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(rest)
        target = rest
    elif kind == "abstract":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind("\0" + rest)
        target = "@" + rest
    else:
        raise SystemExit(f"unknown address kind {kind!r}")
    sock.listen(1024)
    return sock, target


def serve_echo(conn: socket.socket) -> None:
    while True:
        data = conn.recv(1 << 18)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def serve_digest(conn: socket.socket) -> None:
    digest = hashlib.sha256()
    length = 0
    while True:
        data = conn.recv(1 << 18)
        if not data:
            break
        digest.update(data)
        length += len(data)
    conn.sendall(f"{digest.hexdigest()} {length}\n".encode())


def serve_greet(conn: socket.socket) -> None:
    conn.sendall(b"+")
    while conn.recv(65536):
        pass


def pseudo_random(length: int) -> bytes:
    """The bytes `source:N` sends: reproducible, so the receiver can check them."""
    return random.Random(length).randbytes(length)


def main() -> None:
    mode, address = sys.argv[1], sys.argv[2]
    if mode.startswith("source:"):
        payload = pseudo_random(int(mode.split(":", 1)[1]))

        def serve_source(conn: socket.socket) -> None:
            conn.sendall(payload)

        handler = serve_source
    else:
        handler = {"echo": serve_echo, "digest": serve_digest, "greet": serve_greet}[mode]
    sock, target = listen(address)
    print(f"READY {target}", flush=True)

    def run(conn: socket.socket) -> None:
        with conn:
            try:
                handler(conn)
            except OSError:
                pass

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=run, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
