"""The UDP benchmark keeps working: one short round, forkproxy against direct."""

import shutil
import subprocess
import sys

import pytest

from tests.support.proxy import REPO


def test_bench_udp_smoke() -> None:
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "bench.udp", "--rounds", "1", "--duration", "1"]
        + ["--contenders", "direct,forkproxy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[-2:]}
    assert set(rows) == {"direct", "forkproxy"}
    assert int(rows["forkproxy"][1].replace(",", "")) > 0  # exchanges/s through forkproxy
