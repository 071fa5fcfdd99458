"""Shared fixtures: real backends and the real forkproxy command."""

import os
import sys
from pathlib import Path

import pytest

# Tests run the code from this checkout; the backends are started as `-m tests.support...`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest_plugins = ["tests.support.nginx", "tests.support.systemd_boot"]


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory for unix sockets (sun_path is 108 bytes)."""
    directory = Path(f"/tmp/fp-{os.getpid()}-{tmp_path_factory.getbasetemp().name}")
    directory.mkdir(exist_ok=True)
    path = Path(tmp_path_factory.mktemp("w", numbered=True))
    short = directory / path.name
    short.mkdir()
    return short
