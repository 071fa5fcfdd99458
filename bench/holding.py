"""Drives `bench.holder` processes: open relayed connections in batches until a count or failure.

Spreads connections over several holder processes because each process has the same
RLIMIT_NOFILE as the proxies. Never reads /proc or decides what a result means.
"""

from __future__ import annotations

import contextlib
import json
import math
import selectors
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import ProcessGroup, Registry

# Each holder stays well below the 20000 fds every process here gets.
PER_HOLDER_LIMIT = 15000
# Stop opening once a batch loses more than this share: the proxy has reached its limit.
STOP_FAILURE_SHARE = 0.05


class HolderError(RuntimeError):
    """A holder process died or did not answer in time."""


@dataclass(slots=True)
class FillResult:
    held: int = 0
    attempted: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    stop_reason: str = ""
    seconds: float = 0.0


class HolderPool:
    """`count` holder processes aimed at one address; stop() ends them by process group."""

    def __init__(self, registry: Registry, workdir: Path, port: int, target_count: int) -> None:
        self.registry = registry
        holders = max(1, math.ceil(target_count / PER_HOLDER_LIMIT))
        self.groups: list[ProcessGroup] = [
            registry.start(
                f"holder-{index}",
                [sys.executable, "-m", "bench.holder", "--port", str(port)],
                workdir / f"holder-{index}.log",
                stdin=subprocess.PIPE,
                stdout_pipe=True,
            )
            for index in range(holders)
        ]
        self.counts = [0] * holders

    def fill(self, target: int, batch: int, batch_timeout: float, deadline: float) -> FillResult:
        """Open connections batch by batch until `target` are held or a batch mostly fails."""
        result = FillResult()
        started = time.monotonic()
        while result.held < target:
            if time.monotonic() >= deadline:
                result.stop_reason = "time limit"
                break
            index = self.counts.index(min(self.counts))
            count = min(batch, target - result.held, PER_HOLDER_LIMIT - self.counts[index])
            if count <= 0:
                result.stop_reason = "holder limit"
                break
            reply = self._ask(index, {"op": "open", "count": count, "timeout": batch_timeout})
            self.counts[index] = int(reply["held"])
            result.held = sum(self.counts)
            result.attempted += count
            result.failed += int(reply["failed"])
            result.errors.update(reply["errors"])
            if int(reply["failed"]) > count * STOP_FAILURE_SHARE:
                result.stop_reason = f"{reply['failed']} of {count} failed in the last batch"
                break
        else:
            result.stop_reason = "target reached"
        result.seconds = time.monotonic() - started
        return result

    def verify(self, timeout: float) -> tuple[int, Counter[str]]:
        """Ping every held connection once more; the number still relaying."""
        errors: Counter[str] = Counter()
        for index in range(len(self.groups)):
            reply = self._ask(index, {"op": "verify", "timeout": timeout})
            self.counts[index] = int(reply["held"])
            errors.update(reply["errors"])
        return sum(self.counts), errors

    def stop(self) -> None:
        for index, group in enumerate(self.groups):
            if group.alive():
                with contextlib.suppress(HolderError):
                    self._ask(index, {"op": "close"})
            self.registry.stop(group)

    def _ask(self, index: int, command: dict[str, Any]) -> dict[str, Any]:
        group = self.groups[index]
        popen = group.popen
        if popen.stdin is None or popen.stdout is None:
            raise HolderError(f"holder {index} has no pipes")
        try:
            popen.stdin.write(json.dumps(command) + "\n")
            popen.stdin.flush()
        except BrokenPipeError as error:
            raise HolderError(f"holder {index} exited: {group.log_tail()}") from error
        timeout = float(command.get("timeout", 5.0)) + 30.0
        with selectors.DefaultSelector() as selector:
            selector.register(popen.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise HolderError(f"holder {index} gave no answer in {timeout:.0f} s")
        line = popen.stdout.readline()
        if not line:
            raise HolderError(f"holder {index} exited: {group.log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        return reply
