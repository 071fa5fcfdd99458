"""`pip install .` without a C compiler (CC=false) installs forkproxy with its Python
engine only, and that forkproxy relays; asking it for the compiled engine is a one-line
error."""

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import FORKPROXY, REPO, run_proxy, send_all_then_read

# What the source distribution holds (MANIFEST.in adds csrc/).
SOURCES = ["forkproxy", "csrc", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """forkproxy installed with CC=false into a directory of its own (the PYTHONPATH)."""
    work = tmp_path_factory.mktemp("nocompiler")
    source = work / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    target = work / "site"
    env = {**os.environ, "CC": "false"}
    env.pop("FORKPROXY_NO_EXTENSION", None)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    result = subprocess.run(
        [*pip, str(source)], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    yield target


def _env(site: Path, engine: str = "") -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "FORKPROXY_ENGINE": engine}


def test_no_compiled_engine_is_installed(installed: Path) -> None:
    assert (installed / "forkproxy" / "relay" / "engine.py").exists()
    assert not list(installed.glob("forkproxy/relay/_engine*.so"))
    result = subprocess.run(
        [FORKPROXY, "--version"], env=_env(installed), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("(engine: python)\n")


def test_asking_for_the_compiled_engine_is_a_one_line_error(installed: Path) -> None:
    result = subprocess.run(
        [FORKPROXY, "127.0.0.1:9"],
        env=_env(installed, "c"),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("forkproxy: FORKPROXY_ENGINE=c but the compiled engine")
    assert result.stderr.count("\n") == 1


def test_it_relays(installed: Path, workdir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = target.getsockname()[1]
        env = {"PYTHONPATH": str(installed), "FORKPROXY_ENGINE": ""}
        with run_proxy(["-w", "1", f"127.0.0.1:{port}"], workdir, env=env) as proxy:
            client = proxy.connect()
            target.settimeout(10)
            connection, _ = target.accept()
            with client, connection:
                payload = os.urandom(200_000)
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
                assert send_all_then_read(connection, b"reply") == payload
                assert client.recv(10) == b"reply"
