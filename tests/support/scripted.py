"""An in-process backend whose connections do what their first line says, step by step.

A client opens with one line, `MODE NAME SIZE\\n`, and the backend answers with the
pseudo-random bytes of `pattern(NAME, SIZE)` (so the client can check every byte):

  stream NAME SIZE  the first half, then waits for `release(NAME)`, the rest, then closes
  reset NAME SIZE   all SIZE bytes, then waits for `release(NAME)`, then resets (RST)
  hold NAME SIZE    all SIZE bytes, then reads until the proxy closes the connection
  sink NAME SIZE    nothing; reads until EOF (`received[NAME]` counts the bytes as they
                    come), then answers the sha256 hex digest of what it read and closes

`ended[NAME]` records how each connection ended on the backend's side ("closed", "eof",
"reset", ...), so a test can see that the proxy closed the target end. A thread per
connection; used by the fault tests, which need to order events across connections.
"""

import hashlib
import random
import socket
import struct
import threading

LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def pattern(name: str, size: int) -> bytes:
    """The bytes a connection named `name` receives: reproducible, different per name."""
    return random.Random(name).randbytes(size)


class ScriptedBackend:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.lock = threading.Lock()
        self.gates: dict[str, threading.Event] = {}
        self.ended: dict[str, str] = {}
        self.received: dict[str, int] = {}
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self.accepter.start()

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        self.gate(name).set()

    def release_all(self) -> None:
        with self.lock:
            gates = list(self.gates.values())
        for gate in gates:
            gate.set()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self.lock:
                self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        name = "?"
        how = "closed"
        try:
            with conn:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = conn.recv(1)
                    if not chunk:
                        return
                    line += chunk
                mode, name, size_text = line.decode().split()
                size = int(size_text)
                data = pattern(name, size)
                gate = self.gate(name)
                if mode == "stream":
                    conn.sendall(data[: size // 2])
                    gate.wait(60)
                    conn.sendall(data[size // 2 :])
                elif mode == "reset":
                    conn.sendall(data)
                    gate.wait(60)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    how = "reset sent"
                elif mode == "hold":
                    conn.sendall(data)
                    while conn.recv(65536):
                        pass
                    how = "eof"
                elif mode == "sink":
                    digest = hashlib.sha256()
                    self.received[name] = 0
                    while chunk := conn.recv(1 << 20):
                        digest.update(chunk)
                        self.received[name] += len(chunk)
                    how = "eof"
                    conn.sendall(digest.hexdigest().encode())
        except ConnectionResetError:
            how = "reset"
        except BrokenPipeError:
            how = "broken pipe"
        except OSError as error:
            how = f"error {error}"
        finally:
            with self.lock:
                self.ended[name] = how

    def close(self) -> None:
        self.release_all()
        self.sock.close()

    def __enter__(self) -> "ScriptedBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_script(client: socket.socket, mode: str, name: str, size: int) -> None:
    client.sendall(f"{mode} {name} {size}\n".encode())


def read_exactly(client: socket.socket, size: int) -> bytes:
    """Up to `size` bytes; fewer if the connection ends first (EOF or reset)."""
    received = bytearray()
    try:
        while len(received) < size:
            chunk = client.recv(min(1 << 20, size - len(received)))
            if not chunk:
                break
            received += chunk
    except ConnectionResetError:
        pass
    return bytes(received)


def read_to_end(client: socket.socket) -> tuple[bytes, str]:
    """Everything until the connection ends, and how: "eof" or "reset"."""
    received = bytearray()
    try:
        while chunk := client.recv(1 << 20):
            received += chunk
    except ConnectionResetError:
        return bytes(received), "reset"
    return bytes(received), "eof"
