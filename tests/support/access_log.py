"""Reading forkproxy's access log back in tests: logfmt or JSON lines as dicts."""

import json
import shlex
from pathlib import Path

from tests.support.proxy import wait_until


def read_log(path: Path) -> list[dict[str, object]]:
    """The lines of a logfmt or JSON access log so far, each as a dict (none if no file)."""
    if not path.exists():
        return []
    lines: list[dict[str, object]] = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
        else:
            lines.append(dict(field.partition("=")[::2] for field in shlex.split(line)))
    return lines


def wait_for_lines(path: Path, count: int) -> list[dict[str, object]]:
    """Exactly `count` lines, once that many have come."""
    wait_until(lambda: len(read_log(path)) >= count, 15, f"{count} access log lines")
    lines = read_log(path)
    assert len(lines) == count, lines
    return lines
