"""An in-process backend that counts: connections now, at peak, and in total.

Each connection is greeted with b"+" (so a client knows it reached the backend) and held
until the client closes it (or greeted and echoed, as the `greeting` and `echo` given).
Used to check the global connection cap from the backend's side: the peak never exceeds
the cap, and refused clients never arrive.
"""

import socket
import threading


class CountingBackend:
    def __init__(self, greeting: bytes = b"+", echo: bool = False) -> None:
        self.greeting = greeting
        self.echo = echo
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.total = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.current += 1
                self.total += 1
                self.peak = max(self.peak, self.current)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.sendall(self.greeting)
            while data := conn.recv(65536):
                if self.echo:
                    conn.sendall(data)
        except OSError:
            pass
        finally:
            # Counted gone before the close: the proxy frees a unit of the cap only once
            # this close reaches it, so the next client it admits can never be counted
            # while this one still is (the peak never lags behind the cap).
            with self.lock:
                self.current -= 1
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()

    def __enter__(self) -> "CountingBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def outcome(sock: socket.socket) -> str:
    """'admitted' if the backend greeted us, 'refused' if the proxy closed us first."""
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return "refused"
    return "admitted" if data == b"+" else "refused"
