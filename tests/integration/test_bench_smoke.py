"""The benchmark runner keeps working: its smoke mode (forkproxy vs direct, a few seconds)."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.proxy import REPO

TOOLS = ("wrk", "iperf3", "nginx", "systemd-socket-activate", "prlimit", "strace")


def test_bench_compare_smoke() -> None:
    missing = [
        tool for tool in TOOLS if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}")
    ]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"benchmark tools missing: {', '.join(missing)}")
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
