"""A forked helper process for tests of what processes share (the shared mapping).

The child waits for `start()`, runs one action, reports its integer result on a pipe,
then holds whatever it took until `finish()` (runs `then`, if given, and exits normally)
or `kill()` (SIGKILL).
"""

import os
import signal
from collections.abc import Callable


class Child:
    def __init__(self, action: Callable[[], int], then: Callable[[], object] | None = None) -> None:
        report_read, report_write = os.pipe()
        go_read, go_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery from here on
            status = 0
            try:
                os.close(report_read)
                os.close(go_write)
                os.read(go_read, 1)  # wait for the start signal
                result = action()
                os.write(report_write, result.to_bytes(4, "little", signed=True))
                os.read(go_read, 1)  # hold what it took until told (EOF) or killed
                if then is not None:
                    then()
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        os.close(report_write)
        os.close(go_read)
        self.pid = pid
        self.report = report_read
        self.go = go_write

    def start(self) -> None:
        os.write(self.go, b"g")

    def result(self) -> int:
        data = os.read(self.report, 4)
        assert len(data) == 4, "the child died before reporting"
        return int.from_bytes(data, "little", signed=True)

    def finish(self) -> int:
        """Let it exit; return its wait status."""
        os.write(self.go, b"x")  # not EOF: later children hold copies of this pipe's end
        os.close(self.go)
        os.close(self.report)
        _, status = os.waitpid(self.pid, 0)
        return status

    def kill(self) -> None:
        """SIGKILL it at once, and reap it."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.go)
        os.close(self.report)
